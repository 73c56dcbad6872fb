#!/bin/bash
# Install, upgrade, check, roll back or remove compute-broker as a systemd service.
#
#   sudo deploy/install.sh [install]      # from a checkout of the repository; run it again after
#                                         # editing the config, and for every upgrade
#   sudo deploy/install.sh check          # `compute-broker check` with the service's credentials
#   sudo deploy/install.sh run ARGS...    # `compute-broker ARGS` as the service user, likewise
#   sudo deploy/install.sh rollback [RELEASE]   # back to the previous (or the named) release
#   sudo deploy/install.sh releases       # list the installed releases
#   sudo deploy/install.sh tcl-client     # only the Tcl client, for a lab machine
#   sudo deploy/install.sh uninstall      # PURGE=yes also removes the config, credentials, user
#
# Every run is idempotent: what is already in place is left as it is, and the service is
# restarted only when its release or unit changed. docs/deployment.md walks through a first
# deployment. Settings come from the environment (`sudo env LAB_CIDR=10.1.0.0/16 deploy/...`):
#
#   PREFIX=/opt/compute-broker      releases/<name>/ (a virtualenv each), current -> the one in
#                                   use, previous -> the one before, clients -> current/clients
#   ETC_DIR=/etc/compute-broker     config.yaml, and aws-credentials when not an instance role
#   UNIT_DIR=/etc/systemd/system    SERVICE=compute-broker    SERVICE_USER=compute-broker
#   PYTHON=python3 (3.11 or newer)  EXTRAS=monitoring         CONSTRAINTS=<checkout>/constraints.txt
#   WHEEL=                          install this wheel instead of the checkout's code
#   RELEASE=                        the release's name; default: the version, plus +g<commit>
#                                   in a git checkout (so every commit is a release of its own)
#   CREDENTIALS=auto                auto: the credentials file if it exists, else an instance
#                                   role; file: require the file (a template is written);
#                                   role: ignore the file
#   LAB_CIDR= WORKER_CIDR=          only for the firewall lines printed at the end
#   PURGE=no                        uninstall: also remove ETC_DIR and the user
#   ROOT=                           a directory standing for / (the tests; not for production)
set -euo pipefail
shopt -s inherit_errexit
umask 022

PREFIX=${PREFIX:-/opt/compute-broker}
ETC_DIR=${ETC_DIR:-/etc/compute-broker}
UNIT_DIR=${UNIT_DIR:-/etc/systemd/system}
SERVICE=${SERVICE:-compute-broker}
SERVICE_USER=${SERVICE_USER:-compute-broker}
PYTHON=${PYTHON:-python3}
EXTRAS=${EXTRAS-monitoring}
WHEEL=${WHEEL:-}
RELEASE=${RELEASE:-}
CREDENTIALS=${CREDENTIALS:-auto}
LAB_CIDR=${LAB_CIDR:-<lab CIDR>}
WORKER_CIDR=${WORKER_CIDR:-<workers CIDR>}
PURGE=${PURGE:-no}
ROOT=${ROOT:-}
# The checkout (or the installed release) this script is in: the code, unit, clients it installs.
SOURCE=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CONSTRAINTS=${CONSTRAINTS:-$SOURCE/constraints.txt}

# Exit statuses, as the broker's: 78 (EX_CONFIG) the setup needs a person, 75 (EX_TEMPFAIL)
# AWS could not be asked (from `compute-broker check`), 1 anything else.
EX_CONFIG=78

# Paths as the system sees them (written into the unit and the symlinks) ...
config=$ETC_DIR/config.yaml
credentials_file=$ETC_DIR/aws-credentials
unit=$UNIT_DIR/$SERVICE.service
dropin=$UNIT_DIR/$SERVICE.service.d/aws-credentials.conf
# ... and where this script reaches them (under ROOT in the tests).
R_PREFIX=$ROOT$PREFIX
R_CONFIG=$ROOT$config

# State the steps leave for the later ones (functions set these instead of returning a status,
# because bash ignores `set -e` inside a function called from an `if`, `&&` or `||`).
credentials_mode=role # role | file
credentials_ready=yes
config_fresh=no
switched=no
unit_changed=no
build_dir=

cleanup() { if [[ -n $build_dir ]]; then rm -rf "$build_dir"; fi; }
trap cleanup EXIT

say() { printf '%s\n' "$*"; }
die() {
    printf 'install.sh: %s\n' "$1" >&2
    exit "${2:-1}"
}

usage() {
    sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
}

# The broker's own commands run with a clean environment, as under systemd: a
# COMPUTE_BROKER_* or AWS_* variable in root's shell must not make a check pass that the
# service would fail.
broker() {
    local release=$1
    shift
    env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 \
        "$R_PREFIX/releases/$release/bin/compute-broker" "$@"
}

check_settings() {
    local name value
    for name in PREFIX ETC_DIR UNIT_DIR; do
        value=${!name}
        [[ $value =~ ^/[A-Za-z0-9._/-]*$ ]] ||
            die "$name=$value: an absolute path of A-Za-z0-9._/- only"
    done
    for name in SERVICE SERVICE_USER; do
        value=${!name}
        [[ $value =~ ^[a-z_][a-z0-9_-]*$ ]] || die "$name=$value: a name of a-z0-9_- only"
    done
    case $CREDENTIALS in
    auto | file | role) ;;
    *) die "CREDENTIALS=$CREDENTIALS: auto, file or role" ;;
    esac
    if [[ -z $ROOT && $(id -u) -ne 0 ]]; then
        die "run as root (sudo): it creates a user and writes $PREFIX, $ETC_DIR and $UNIT_DIR"
    fi
}

# --- the steps -------------------------------------------------------------------------------

check_python() {
    command -v "$PYTHON" >/dev/null ||
        die "$PYTHON not found: apt-get install python3 python3-venv (Python 3.11 or newer)"
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
        die "$("$PYTHON" -V 2>&1) is too old: compute-broker needs 3.11 or newer (Debian 12, Ubuntu 24.04), or set PYTHON=python3.11"
    "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null ||
        die "$PYTHON cannot create a virtualenv: apt-get install python3-venv"
}

user_exists() {
    if [[ -n $ROOT ]]; then
        grep -q "^$SERVICE_USER:" "$ROOT/etc/passwd" 2>/dev/null
    else
        getent passwd "$SERVICE_USER" >/dev/null
    fi
}

root_option() { if [[ -n $ROOT ]]; then printf '%s\n' --root "$ROOT"; fi; }

ensure_user() {
    if user_exists; then return 0; fi
    local options
    mapfile -t options < <(root_option)
    useradd "${options[@]}" --system --user-group --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin "$SERVICE_USER"
    say "user: $SERVICE_USER created (a system user: no home, no login)"
}

git_here() { git -c "safe.directory=$SOURCE" -C "$SOURCE" "$@" 2>/dev/null; }

# RELEASE, else the version of what is installed, +g<commit> in a git checkout.
release_name() {
    if [[ -n $RELEASE ]]; then
        printf '%s\n' "$RELEASE"
        return
    fi
    local version commit
    if [[ -n $WHEEL ]]; then
        version=$(basename "$WHEEL" | cut -d- -f2)
    else
        version=$("$PYTHON" -c 'import sys, tomllib
print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' "$SOURCE/pyproject.toml")
        if commit=$(git_here rev-parse --short=12 HEAD); then
            version=$version+g$commit
            if [[ -n $(git_here status --porcelain --untracked-files=no) ]]; then
                version=$version.dirty
                say "note: the checkout has uncommitted changes; an installed release of this name is kept as it is (RELEASE=NAME installs them as a new one)" >&2
            fi
        fi
    fi
    printf '%s\n' "$version"
}

# The shipped unit with this installation's paths and user: it runs the release in `current`.
render_unit() {
    local release=$1 template=$SOURCE/systemd/compute-broker.service
    [[ -f $template ]] || die "$template not found"
    say "# Installed by deploy/install.sh (release $release). Change it with a drop-in"
    say "# (systemctl edit $SERVICE): the next install replaces this file."
    sed -e '/^# Installed by deploy\/install\.sh/d' \
        -e '/^# (systemctl edit .*): the next install replaces this file\.$/d' \
        -e "s|/opt/compute-broker/venv/|$PREFIX/current/|g" \
        -e "s|/opt/compute-broker|$PREFIX|g" \
        -e "s|/etc/compute-broker|$ETC_DIR|g" \
        -e "s|^User=compute-broker\$|User=$SERVICE_USER|" \
        -e "s|^Group=compute-broker\$|Group=$SERVICE_USER|" "$template"
}

# releases/RELEASE: a virtualenv with compute-broker (the checkout's or WHEEL) installed with
# the constraints, plus the Tcl client, the unit, this script and the constraints. release.txt,
# written last, marks a complete release: an interrupted one is built again from scratch.
ensure_release() {
    local release=$1
    local dir=$R_PREFIX/releases/$release
    if [[ -f $dir/release.txt ]]; then return 0; fi
    [[ -f $CONSTRAINTS ]] || die "$CONSTRAINTS not found"
    local unit_text
    unit_text=$(render_unit "$release")
    grep -q "^ExecStart=$PREFIX/current/bin/compute-broker .*$config" <<<"$unit_text" ||
        die "systemd/compute-broker.service: its ExecStart= no longer runs $PREFIX/current/bin/compute-broker with $config; deploy/install.sh needs updating"
    say "release $release: creating $PREFIX/releases/$release"
    rm -rf "$dir"
    mkdir -p "$R_PREFIX/releases"
    "$PYTHON" -m venv "$dir" || die "$PYTHON -m venv failed: apt-get install python3-venv"
    local target
    if [[ -n $WHEEL ]]; then
        target=$WHEEL
    else
        # Build from a copy: nothing is written into the checkout, and no stale setuptools
        # build/ directory can put modules deleted since into the release.
        build_dir=$(mktemp -d)
        tar -C "$SOURCE" --exclude=./.git --exclude=./.venv --exclude=./build --exclude=./dist \
            --exclude='*.egg-info' --exclude=__pycache__ --exclude='.*_cache' -cf - . |
            tar -C "$build_dir" -xf -
        target=$build_dir
    fi
    if [[ -n $EXTRAS ]]; then target="$target[$EXTRAS]"; fi
    "$dir/bin/python" -m pip install --quiet --no-input --disable-pip-version-check \
        -c "$CONSTRAINTS" "$target" ||
        die "pip install failed; the next run builds release $release again"
    mkdir -p "$dir/clients/tcl" "$dir/deploy" "$dir/systemd"
    cp "$SOURCE/clients/tcl/pkgIndex.tcl" "$SOURCE/clients/tcl/compute_broker.tcl" \
        "$SOURCE/clients/tcl/README.md" "$dir/clients/tcl/"
    cp "${BASH_SOURCE[0]}" "$dir/deploy/install.sh"
    cp "$CONSTRAINTS" "$dir/constraints.txt"
    printf '%s\n' "$unit_text" >"$dir/systemd/compute-broker.service"
    {
        say "release: $release"
        say "version: $(broker "$release" --version)"
        say "source: ${WHEEL:-$SOURCE}"
        say "python: $("$dir/bin/python" -V 2>&1)"
        say "installed: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    } >"$dir/release.txt.new"
    mv "$dir/release.txt.new" "$dir/release.txt"
}

# LINK -> TARGET (relative to LINK's directory), replaced atomically.
point() {
    local link=$1 target=$2
    if [[ -L $link && $(readlink "$link") == "$target" ]]; then return 0; fi
    ln -sfn "$target" "$link.new"
    mv -T "$link.new" "$link"
}

current_release() {
    if [[ -L $R_PREFIX/current ]]; then basename "$(readlink "$R_PREFIX/current")"; fi
}

previous_release() {
    if [[ -L $R_PREFIX/previous ]]; then basename "$(readlink "$R_PREFIX/previous")"; fi
}

# current -> releases/RELEASE and previous -> the release current was; sets `switched`.
switch_to() {
    local release=$1 old
    old=$(current_release)
    switched=no
    if [[ $old == "$release" ]]; then return 0; fi
    if [[ -n $old ]]; then point "$R_PREFIX/previous" "releases/$old"; fi
    point "$R_PREFIX/current" "releases/$release"
    switched=yes
    say "current: releases/$release${old:+ (previous: releases/$old)}"
}

# $PREFIX/clients/tcl is the Tcl client of the current release.
ensure_clients_link() {
    local link=$R_PREFIX/clients
    if [[ -d $link && ! -L $link ]]; then
        rm -rf "$link" # a copy `tcl-client` made before the broker was installed here
    fi
    point "$link" current/clients
}

# Writes the config from `compute-broker sample-config` if there is none; sets `config_fresh`.
ensure_config() {
    local release=$1
    config_fresh=no
    mkdir -p "$ROOT$ETC_DIR"
    if [[ -e $R_CONFIG ]]; then return 0; fi
    broker "$release" sample-config >"$R_CONFIG.new"
    chmod 0640 "$R_CONFIG.new"
    chown "root:$SERVICE_USER" "$R_CONFIG.new"
    mv "$R_CONFIG.new" "$R_CONFIG"
    config_fresh=yes
    say "config: $config written from \`compute-broker sample-config\` (root:$SERVICE_USER 0640)"
}

# Sets credentials_mode (role or file) and credentials_ready. The file stays root's (0600);
# systemd hands the service a copy (LoadCredential=), so the service user never reads it.
ensure_credentials() {
    local target=$ROOT$credentials_file
    if [[ -e $ROOT$ETC_DIR/aws.env ]]; then
        say "note: $ETC_DIR/aws.env is no longer read: put its keys into $credentials_file ([default], aws_access_key_id = ..., aws_secret_access_key = ...) and the region into config.yaml's region:, then delete it" >&2
    fi
    case $CREDENTIALS in
    role) credentials_mode=role ;;
    file) credentials_mode=file ;;
    auto) if [[ -e $target ]]; then credentials_mode=file; else credentials_mode=role; fi ;;
    esac
    credentials_ready=yes
    if [[ $credentials_mode == role ]]; then return 0; fi
    if [[ ! -e $target ]]; then
        (
            umask 077
            cat >"$target" <<EOF
# The broker's AWS key (AWS shared-credentials format): an IAM user limited to the policy in
# docs/deployment.md. Root-only (0600): systemd passes a copy to the service (LoadCredential=).
# On EC2 prefer an instance role: then delete this file and run deploy/install.sh again.
[default]
aws_access_key_id =
aws_secret_access_key =
EOF
        )
        say "credentials: $credentials_file written (a template, root-only)"
    fi
    chown root:root "$target"
    chmod 0600 "$target"
    if ! grep -Eq '^[[:space:]]*aws_access_key_id[[:space:]]*=[[:space:]]*[^[:space:]]' "$target"; then
        credentials_ready=no
    fi
}

# `compute-broker ARGS` as the service runs it: as its user, with its credentials. A transient
# unit NAME gets the credentials file through LoadCredential= exactly as the service does
# (/run/credentials/UNIT is the documented path of a system service's credentials).
run_as_service() {
    local release=$1 name=$2
    shift 2
    local transient=$SERVICE-$name
    local run=(systemd-run --quiet --wait --pipe --collect "--unit=$transient"
        -p "User=$SERVICE_USER" -p "Group=$SERVICE_USER")
    if [[ $credentials_mode == file ]]; then
        run+=(-p "LoadCredential=aws:$ROOT$credentials_file"
            "--setenv=AWS_SHARED_CREDENTIALS_FILE=/run/credentials/$transient.service/aws")
    fi
    "${run[@]}" "$R_PREFIX/releases/$release/bin/compute-broker" "$@"
}

# Writes TEXT to the system path TARGET unless it holds it already; sets `unit_changed`.
put() {
    local text=$1 target=$ROOT$2
    if [[ -f $target && $(<"$target") == "$text" ]]; then return 0; fi
    mkdir -p "$(dirname "$target")"
    printf '%s\n' "$text" >"$target.new"
    chmod 0644 "$target.new"
    mv "$target.new" "$target"
    unit_changed=yes
}

dropin_text() {
    cat <<EOF
# Written by deploy/install.sh: the broker's AWS key, $credentials_file (root-only, 0600).
# systemd reads it when the service starts and hands the service a private read-only copy in
# its credentials directory (%d); the service user never reads a file of root's. Without the
# file (an instance role) deploy/install.sh removes this drop-in.
[Service]
LoadCredential=aws:$credentials_file
Environment=AWS_SHARED_CREDENTIALS_FILE=%d/aws
EOF
}

# The unit of the release in `current` and the credentials drop-in; daemon-reload if changed.
install_unit() {
    unit_changed=no
    put "$(<"$R_PREFIX/current/systemd/compute-broker.service")" "$unit"
    if [[ $credentials_mode == file ]]; then
        put "$(dropin_text)" "$dropin"
    elif [[ -e $ROOT$dropin ]]; then
        rm -f "$ROOT$dropin"
        rmdir "$(dirname "$ROOT$dropin")" 2>/dev/null || true
        unit_changed=yes
    fi
    if [[ $unit_changed == yes ]]; then systemctl daemon-reload; fi
}

listen_port() {
    env -i "$R_PREFIX/current/bin/python" -c 'import sys
from broker.config_load import load_config
print(load_config(sys.argv[1], {}).listen_port)' "$R_CONFIG" 2>/dev/null || echo 9000
}

print_next_steps() {
    local port credentials
    port=$(listen_port)
    credentials="the instance role"
    if [[ $credentials_mode == file ]]; then credentials="$credentials_file (LoadCredential=)"; fi
    cat <<EOF

$SERVICE runs release $(current_release) ($PREFIX/current).
  config:      $config
  credentials: $credentials
  Tcl client:  $PREFIX/clients/tcl
               (a script: lappend auto_path $PREFIX/clients/tcl; or TCLLIBPATH=$PREFIX/clients/tcl)

Firewall: only the lab's clients and the workers' watchdogs may reach port $port (the broker
asks for no password: whoever reaches it can launch workers), e.g. with ufw:
  ufw allow from $LAB_CIDR to any port $port proto tcp
  ufw allow from $WORKER_CIDR to any port $port proto tcp

Check it:
  systemctl status $SERVICE
  journalctl -u $SERVICE -p warning
  sudo $PREFIX/current/deploy/install.sh check
  printf 'STATUS\\n' | nc -N 127.0.0.1 $port

Roll back: sudo $PREFIX/current/deploy/install.sh rollback
EOF
}

# --- the commands ----------------------------------------------------------------------------

cmd_install() {
    check_settings
    [[ -n $WHEEL || -f $SOURCE/pyproject.toml ]] ||
        die "nothing to install here: run it from a checkout of the repository, or give WHEEL="
    check_python
    ensure_user
    local release old
    release=$(release_name)
    [[ $release =~ ^[A-Za-z0-9][A-Za-z0-9._+-]*$ ]] || die "RELEASE=$release: A-Za-z0-9._+- only"
    ensure_release "$release"
    old=$(current_release)
    # The first release is current at once (nothing runs yet): the command is then at
    # $PREFIX/current/bin/compute-broker while the config is edited.
    if [[ -z $old ]]; then switch_to "$release"; fi
    ensure_clients_link
    ensure_config "$release"
    ensure_credentials
    local config_ok=yes
    if [[ $config_fresh == no ]]; then
        broker "$release" check-config --aws "$R_CONFIG" >/dev/null || config_ok=no
    fi
    if [[ $config_fresh == yes || $config_ok == no || $credentials_ready == no ]]; then
        local credentials_step="Credentials: the instance role, or an IAM user's key in $credentials_file."
        if [[ $credentials_mode == file ]]; then
            credentials_step="Fill in the key in $credentials_file."
        fi
        cat >&2 <<EOF

Not started: the setup needs you.
  1. Edit $config: region, ami_id, subnet_id (or subnets),
     security_group_ids, key_name, broker_addresses (docs/deployment.md, "The config").
     This checks it: $PREFIX/current/bin/compute-broker check-config --aws $config
  2. $credentials_step
  3. Run $0 again.
EOF
        exit $EX_CONFIG
    fi
    say "setup: compute-broker setup (as $SERVICE_USER, with the service's credentials)"
    local status=0
    run_as_service "$release" setup setup --config "$R_CONFIG" || status=$?
    if [[ $status -ne 0 ]]; then
        die "compute-broker setup failed (above); release $(current_release) stays current" "$status"
    fi
    say "check: compute-broker check (as $SERVICE_USER, with the service's credentials)"
    run_as_service "$release" check check --config "$R_CONFIG" || status=$?
    if [[ $status -ne 0 ]]; then
        die "compute-broker check failed (above); release $(current_release) stays current" "$status"
    fi
    local old_previous
    old_previous=$(previous_release)
    switch_to "$release"
    local restart=$switched
    install_unit
    if [[ $unit_changed == yes ]]; then restart=yes; fi
    systemctl enable --quiet "$SERVICE"
    if [[ $restart == no ]]; then
        systemctl start "$SERVICE"
    elif ! systemctl restart "$SERVICE"; then
        if [[ $switched == yes && -n $old ]]; then
            say "$SERVICE did not start with release $release: back to release $old" >&2
            switch_to "$old"
            if [[ -n $old_previous ]]; then
                point "$R_PREFIX/previous" "releases/$old_previous"
            else
                rm -f "$R_PREFIX/previous"
            fi
            install_unit
            systemctl restart "$SERVICE" || true
        fi
        die "$SERVICE did not start: journalctl -u $SERVICE -n 30"
    fi
    print_next_steps
}

cmd_check() {
    check_settings
    local release
    release=$(current_release)
    [[ -n $release ]] || die "nothing installed in $PREFIX"
    ensure_credentials
    [[ $credentials_ready == yes ]] || die "fill in the key in $credentials_file" $EX_CONFIG
    run_as_service "$release" check check --config "$R_CONFIG"
}

# Any compute-broker command as the service would run it (stop-all, setup --events-queue ...).
cmd_run() {
    check_settings
    [[ $# -gt 0 ]] || die "run: which compute-broker command? (e.g. run stop-all --dry-run --config $config)" 2
    local release
    release=$(current_release)
    [[ -n $release ]] || die "nothing installed in $PREFIX"
    ensure_credentials
    [[ $credentials_ready == yes ]] || die "fill in the key in $credentials_file" $EX_CONFIG
    run_as_service "$release" run "$@"
}

cmd_rollback() {
    check_settings
    local target=${1:-} now
    now=$(current_release)
    [[ -n $now ]] || die "nothing installed in $PREFIX"
    if [[ -z $target ]]; then
        target=$(previous_release)
        [[ -n $target ]] || die "no previous release to roll back to ($0 releases lists them)"
    fi
    [[ -f $R_PREFIX/releases/$target/release.txt ]] || die "no release $target in $PREFIX/releases"
    [[ $target != "$now" ]] || die "release $target is current already"
    broker "$target" check-config --aws "$R_CONFIG" >/dev/null ||
        die "release $target does not accept $config (above): fix the config first" $EX_CONFIG
    ensure_credentials
    switch_to "$target"
    install_unit
    systemctl restart "$SERVICE" || die "$SERVICE did not start: journalctl -u $SERVICE -n 30"
    say "rolled back to release $target; \`$0 rollback\` again returns to $now"
}

cmd_releases() {
    local now previous dir name mark
    now=$(current_release)
    previous=$(previous_release)
    for dir in "$R_PREFIX"/releases/*/; do
        [[ -f $dir/release.txt ]] || continue
        name=$(basename "$dir")
        mark=" "
        if [[ $name == "$previous" ]]; then mark="-"; fi
        if [[ $name == "$now" ]]; then mark="*"; fi
        say "$mark $name"
    done
}

cmd_tcl_client() {
    local target=$R_PREFIX/clients
    if [[ -L $target ]]; then
        say "the broker installed here provides $PREFIX/clients/tcl already"
        return 0
    fi
    mkdir -p "$target/tcl"
    cp "$SOURCE/clients/tcl/pkgIndex.tcl" "$SOURCE/clients/tcl/compute_broker.tcl" \
        "$SOURCE/clients/tcl/README.md" "$target/tcl/"
    say "Tcl client: $PREFIX/clients/tcl (lappend auto_path $PREFIX/clients/tcl, or TCLLIBPATH=$PREFIX/clients/tcl)"
}

cmd_uninstall() {
    check_settings
    systemctl disable --now --quiet "$SERVICE" || true
    rm -f "$ROOT$unit" "$ROOT$dropin"
    rmdir "$(dirname "$ROOT$dropin")" 2>/dev/null || true
    systemctl daemon-reload
    rm -rf "$R_PREFIX"
    say "removed $unit and $PREFIX"
    if [[ $PURGE == yes ]]; then
        rm -rf "${ROOT:?}$ETC_DIR"
        if user_exists; then
            local options
            mapfile -t options < <(root_option)
            userdel "${options[@]}" "$SERVICE_USER"
        fi
        say "removed $ETC_DIR and the user $SERVICE_USER"
    else
        say "kept $ETC_DIR and the user $SERVICE_USER (PURGE=yes removes them)"
    fi
    say "The pool's workers power themselves off within orphan_timeout; the table stays (docs/deployment.md, \"Uninstalling\")."
}

case ${1:-install} in
install) cmd_install ;;
check) cmd_check ;;
run) cmd_run "${@:2}" ;;
rollback) cmd_rollback "${2:-}" ;;
releases) cmd_releases ;;
tcl-client) cmd_tcl_client ;;
uninstall) cmd_uninstall ;;
-h | --help | help) usage ;;
*)
    usage >&2
    exit 2
    ;;
esac
