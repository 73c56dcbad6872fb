"""`compute-broker serve` fails fast: what it needs from AWS is checked before it listens or
tells systemd it is ready, and every refusal is one line and an exit status systemd can act on
(78: do not restart; 75: try again later; 1: the port is taken)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from broker.checks import EXIT_CONFIG
from broker.sandbox import SandboxResources

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 60

pytestmark = pytest.mark.slow  # every test runs `compute-broker` as a process


def config_file(tmp_path: Path, resources: SandboxResources, **overrides: Any) -> Path:
    config = {
        "pool_name": f"startup-{uuid.uuid4().hex[:8]}",
        "ami_id": resources.ami_id,
        "security_group_ids": [resources.security_group_id],
        "key_name": resources.key_name,
        "subnet_id": resources.subnet_id,
        "region": "us-east-1",
        "registry": "memory",
        "log_format": "json",
        **overrides,
    }
    path = tmp_path / f"config-{uuid.uuid4().hex[:8]}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def broker(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "broker", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip


@pytest.fixture
def env(aws_env: dict[str, str]) -> dict[str, str]:
    """The session's moto cloud, and nothing of the developer's AWS setup."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "COMPUTE_BROKER_"))}
    return {**base, **aws_env, "AWS_CONFIG_FILE": os.devnull}


def serve(config: Path, env: dict[str, str], port: int = 0) -> subprocess.CompletedProcess[str]:
    return broker(
        "serve", "--config", str(config), "--host", "127.0.0.1", "--port", str(port), env=env
    )


def test_check_passes_every_check_against_a_set_up_cloud(
    tmp_path: Path, resources: SandboxResources, env: dict[str, str]
) -> None:
    """`compute-broker check`: one `ok` line per check and exit 0 when everything is there."""
    result = broker("check", "--config", str(config_file(tmp_path, resources)), env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert {"region", "credentials", "launch"} <= {line.split()[1].rstrip(":") for line in lines}
    assert all(line.startswith("ok ") for line in lines)


def test_serve_without_credentials_exits_78_with_one_line_and_never_listens(
    tmp_path: Path, resources: SandboxResources, env: dict[str, str]
) -> None:
    """No credentials anywhere in the chain: one FAIL line naming them, exit 78, no
    `listening on` (systemd never hears READY=1)."""
    no_keys = {
        k: v for k, v in env.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    }
    no_keys["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull
    result = serve(config_file(tmp_path, resources), no_keys)
    assert result.returncode == EXIT_CONFIG
    assert result.stdout == ""
    failed = [line for line in result.stderr.splitlines() if line.startswith("FAIL")]
    assert len(failed) == 1
    assert failed[0].startswith("FAIL credentials:")


def test_serve_without_the_registry_table_exits_78_naming_the_table(
    tmp_path: Path, resources: SandboxResources, env: dict[str, str]
) -> None:
    """registry: dynamodb with a table that does not exist: one FAIL line naming it and the
    setup command that creates it; nothing listens."""
    table = f"absent-{uuid.uuid4().hex[:8]}"
    config = config_file(tmp_path, resources, registry="dynamodb", registry_table=table)
    result = serve(config, env)
    assert result.returncode == EXIT_CONFIG
    assert result.stdout == ""
    failed = [line for line in result.stderr.splitlines() if line.startswith("FAIL")]
    assert len(failed) == 1
    assert failed[0].startswith("FAIL table:")
    assert table in failed[0]
    assert "compute-broker setup" in failed[0]


def test_serve_on_a_taken_port_says_so_in_one_line(
    tmp_path: Path, resources: SandboxResources, env: dict[str, str]
) -> None:
    """A port already in use: one line naming the address, exit 1 (systemd may retry), no
    traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = serve(config_file(tmp_path, resources), env, port)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if not line.startswith("{")]
    assert [f"cannot listen on 127.0.0.1:{port}: Address already in use"] == errors
    assert "Traceback" not in result.stderr


def test_serve_refuses_a_network_address_without_access_control(
    tmp_path: Path, resources: SandboxResources, env: dict[str, str]
) -> None:
    """listen_host 0.0.0.0 with no tokens, address roles or allowlist: one line saying how to
    fix it, exit 78, nothing listens (insecure: true is the operator saying they mean it)."""
    config = config_file(
        tmp_path, resources, listen_host="0.0.0.0", listen_port=0, worker_watchdog=False
    )
    result = broker("serve", "--config", str(config), env=env)
    assert result.returncode == EXIT_CONFIG
    assert result.stdout == ""
    errors = [line for line in result.stderr.splitlines() if not line.startswith("{")]
    assert len(errors) == 1
    assert errors[0].startswith("refusing to listen on 0.0.0.0 without access control")
