"""The documents say what the code does: README, protocol.md, the systemd unit, CI."""

from __future__ import annotations

import configparser
import re
from pathlib import Path

from broker.config_docs import reference_markdown
from broker.protocol import HELP_TEXT

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_readme_config_reference_is_the_generated_one() -> None:
    """README's key table is generated from the schema (regenerate: see the failure)."""
    block = re.search(
        r"<!-- config-reference:start -->\n(.*)\n<!-- config-reference:end -->", README, re.S
    )
    assert block is not None
    expected = reference_markdown().split("## Keys\n", 1)[1].strip()
    assert block.group(1) == expected, (
        "README.md's config table is stale: paste the '## Keys' table of "
        "`compute-broker config-reference` between the config-reference markers"
    )


def test_readme_has_the_two_newcomer_commands_and_ci_runs_the_test_one() -> None:
    """One command starts the sandbox broker, one runs the tests; .ci/run runs pytest too."""
    commands = re.findall(r"^    (python3 -m venv .venv && .*)$", README, re.M)
    assert len(commands) == 2
    serve, test = commands
    assert serve.endswith("compute-broker serve --sandbox")
    assert test.endswith(".venv/bin/pytest")
    ci = (ROOT / ".ci" / "run").read_text()
    assert "\n.venv/bin/pytest\n" in ci


def test_help_line_in_protocol_md_and_readme_is_the_servers() -> None:
    """The netcat sessions show the HELP reply the server really sends."""
    for doc in (README, (ROOT / "protocol.md").read_text()):
        assert HELP_TEXT in doc


def test_systemd_unit_runs_the_console_script_as_a_notify_service() -> None:
    """The unit uses Type=notify and the installed console script with a config file."""
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(ROOT / "systemd" / "compute-broker.service")
    service = unit["Service"]
    assert service["Type"] == "notify"
    assert re.fullmatch(r"/\S+/bin/compute-broker serve --config /\S+\.yaml", service["ExecStart"])
    assert "ExecStartPre" not in service  # serve checks itself: RestartPreventExitStatus works
    assert service["RestartPreventExitStatus"] == "78"
    assert service["KillSignal"] == "SIGTERM"
    assert service["NoNewPrivileges"] == "yes"
