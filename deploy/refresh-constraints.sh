#!/bin/bash
# Regenerate constraints.txt: the versions `pip install '.[monitoring]'` picks today in a fresh
# virtualenv, every runtime dependency (and the monitoring extra's) pinned with ==.
#
#   deploy/refresh-constraints.sh            # from the repository root or anywhere
#   PYTHON=python3.12 deploy/refresh-constraints.sh
#
# Review the diff, run tests/test_deploy.py (it installs with the new pins), commit.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

"$python" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install --quiet --disable-pip-version-check "$repo[monitoring]"
python_version=$("$work/venv/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
{
    echo "# Known-good versions of compute-broker's runtime dependencies and the monitoring"
    echo "# extra's, for deployments: deploy/install.sh installs with \`pip install -c constraints.txt\`."
    echo "# Made by deploy/refresh-constraints.sh: \`pip freeze\` of a fresh virtualenv after"
    echo "# \`pip install '.[monitoring]'\` (Python $python_version). Refresh: run it again, review the"
    echo "# diff, run tests/test_deploy.py (it installs with these pins and fails on an unpinned one)."
    "$work/venv/bin/python" -m pip freeze --disable-pip-version-check --exclude compute-broker
} >"$repo/constraints.txt.new"
mv "$repo/constraints.txt.new" "$repo/constraints.txt"
echo "wrote $repo/constraints.txt"
