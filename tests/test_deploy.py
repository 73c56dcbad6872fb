"""deploy/install.sh, run whole in a temporary root with everything but systemd itself.

The virtualenv and `pip install` of this working tree are real (offline with the pip cache);
`systemctl`, `systemd-run`, `useradd`, `userdel` and `chown` are stubs on PATH that record
their calls. The `systemd-run` stub does what systemd does for the script's transient units:
it copies each `LoadCredential=` file into a private directory standing for
/run/credentials/UNIT and runs the command with a clean environment (plus only the sandbox
cloud's endpoint), so `compute-broker setup` and `check` really reach the moto server with the
credentials the service would have, and only those.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import pytest

if TYPE_CHECKING:
    from broker.sandbox import MotoHandle

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "deploy" / "install.sh"
PREFIX = "/opt/compute-broker"
ETC = "/etc/compute-broker"
UNIT = "/etc/systemd/system/compute-broker.service"
DROPIN = "/etc/systemd/system/compute-broker.service.d/aws-credentials.conf"
INSTALL_TIMEOUT = 600  # a venv and a pip install from the cache: about a minute here

# One stub program for every command, told apart by the name it is called by.
STUB = r'''#!{python}
import json, os, shutil, subprocess, sys, tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SERVICE_ENV = json.loads((HERE / "service-env.json").read_text())
name, args = Path(sys.argv[0]).name, sys.argv[1:]
with open(HERE / "calls.jsonl", "a") as log:
    log.write(json.dumps([name, *args]) + "\n")


def root_of(args):
    """useradd/userdel --root R NAME: the stubs only ever touch R/etc/passwd."""
    if "--root" not in args:
        sys.exit(f"stub {{name}}: refusing to change this machine's users (no --root)")
    return Path(args[args.index("--root") + 1])


if name == "useradd":
    passwd = root_of(args) / "etc" / "passwd"
    passwd.parent.mkdir(parents=True, exist_ok=True)
    with open(passwd, "a") as file:
        file.write(f"{{args[-1]}}:x:998:998::/nonexistent:/usr/sbin/nologin\n")
elif name == "userdel":
    passwd = root_of(args) / "etc" / "passwd"
    lines = passwd.read_text().splitlines(keepends=True)
    passwd.write_text("".join(l for l in lines if not l.startswith(args[-1] + ":")))
elif name == "systemctl":
    flag = HERE / "fail-next-restart"
    if args and args[0] == "restart" and flag.exists():
        flag.unlink()
        sys.exit(1)
elif name == "systemd-run":
    unit, credentials, setenv, command = None, {{}}, {{}}, list(args)
    while command and command[0].startswith("-"):
        option = command.pop(0)
        if option in ("-p", "--property"):
            key, _, value = command.pop(0).partition("=")
            if key == "LoadCredential":
                credential, _, path = value.partition(":")
                credentials[credential] = path
        elif option.startswith("--unit="):
            unit = option.split("=", 1)[1] + ".service"
        elif option.startswith("--setenv="):
            key, _, value = option.split("=", 1)[1].partition("=")
            setenv[key] = value
    directory = Path(tempfile.mkdtemp(prefix="credentials-"))
    for credential, path in credentials.items():
        shutil.copyfile(path, directory / credential)  # fails, as systemd would, if missing
    run_dir = f"/run/credentials/{{unit}}"
    env = {{"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/nonexistent", **SERVICE_ENV}}
    if credentials:
        env["CREDENTIALS_DIRECTORY"] = str(directory)
    for key, value in setenv.items():
        env[key] = value.replace(run_dir, str(directory))
    status = subprocess.run(command, env=env).returncode
    shutil.rmtree(directory)
    sys.exit(status)
'''
STUBBED = ("systemctl", "systemd-run", "useradd", "userdel", "chown")


@attrs.frozen
class Run:
    """One run of the script: its exit status, output and the stubbed calls it made."""

    status: int
    output: str
    calls: list[list[str]]

    def called(self, command: str) -> list[list[str]]:
        return [call[1:] for call in self.calls if call[0] == command]


@attrs.define
class Site:
    """A temporary root the script installs into, with its stubs."""

    root: Path
    stubs: Path
    service_env: dict[str, str] = attrs.Factory(dict)

    def path(self, system_path: str) -> Path:
        return self.root / system_path.lstrip("/")

    def run(self, *args: str, **settings: str) -> Run:
        calls = self.stubs / "calls.jsonl"
        calls.write_text("")
        (self.stubs / "service-env.json").write_text(json.dumps(self.service_env))
        env = {
            "PATH": f"{self.stubs}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
            "HOME": os.environ.get("HOME", "/root"),  # the pip cache
            "LANG": "C.UTF-8",
            "ROOT": str(self.root),
            **{key: value for key, value in os.environ.items() if key.startswith("PIP_")},
            **settings,
        }
        done = subprocess.run(
            ["bash", str(SCRIPT), *args],
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=INSTALL_TIMEOUT,
        )
        recorded = [json.loads(line) for line in calls.read_text().splitlines()]
        return Run(done.returncode, done.stdout + done.stderr, recorded)

    def link(self, name: str) -> str:
        return os.readlink(self.path(f"{PREFIX}/{name}"))

    def snapshot(self) -> dict[str, tuple[Any, ...]]:
        """Every path under the root: kind, mode, size, mtime (a rewrite changes it), target."""
        found: dict[str, tuple[Any, ...]] = {}
        for directory, dirs, files in os.walk(self.root):
            for name in dirs + files:
                path = Path(directory) / name
                info = path.lstat()
                target = os.readlink(path) if path.is_symlink() else None
                found[str(path.relative_to(self.root))] = (
                    stat.S_IFMT(info.st_mode),
                    stat.S_IMODE(info.st_mode),
                    info.st_size,
                    info.st_mtime_ns,
                    target,
                )
        return found


def make_site(tmp_path: Path) -> Site:
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    program = stubs / "stub.py"
    program.write_text(STUB.format(python=sys.executable))
    program.chmod(0o755)
    for name in STUBBED:
        (stubs / name).symlink_to(program)
    root = tmp_path / "root"
    root.mkdir()
    return Site(root=root, stubs=stubs)


def set_keys(text: str, **values: str) -> str:
    """The sample config with `key: value` lines replaced (each key must be there)."""
    for key, value in values.items():
        text, count = re.subn(rf"(?m)^{key}: .*$", f"{key}: {value}", text)
        assert count == 1, key
    return text


@attrs.frozen
class Deployed:
    """The site after a first run (which stops for the edits), the edits, and a second run."""

    site: Site
    first: Run
    second: Run
    table: str
    sample: str


@pytest.fixture(scope="module")
def deployed(
    moto_server: MotoHandle, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployed]:
    from broker import sandbox

    site = make_site(tmp_path_factory.mktemp("deploy"))
    site.service_env = {
        "AWS_ENDPOINT_URL": moto_server.endpoint_url,
        "AWS_EC2_METADATA_DISABLED": "true",  # no instance role: the file is the only way
        "AWS_CONFIG_FILE": os.devnull,
    }
    first = site.run()
    config = site.path(f"{ETC}/config.yaml")
    sample = config.read_text()
    resources = sandbox.prepare_resources("us-east-1")
    table = f"deploy-{uuid.uuid4().hex[:8]}"
    config.write_text(
        set_keys(
            sample,
            region="us-east-1",
            ami_id=resources.ami_id,
            subnet_id=resources.subnet_id,
            security_group_ids=f"[{resources.security_group_id}]",
            key_name=resources.key_name,
            broker_addresses="['127.0.0.1:9000']",
            registry_table=table,
        )
    )
    credentials = site.path(f"{ETC}/aws-credentials")
    credentials.write_text("[default]\naws_access_key_id = testing\naws_secret_access_key = x\n")
    credentials.chmod(0o644)  # as an operator might leave it: the script makes it root-only
    second = site.run()
    assert second.status == 0, second.output
    yield Deployed(site, first, second, table, sample)


def current_release(site: Site) -> str:
    return Path(site.link("current")).name


def test_first_run_installs_a_release_writes_the_sample_config_and_stops_for_edits(
    deployed: Deployed,
) -> None:
    """A first run creates the user and a release, writes the sample config (root, the
    service's group, 0640) and exits 78 naming the keys to edit, before any AWS call."""
    first = deployed.first
    assert first.status == 78, first.output
    assert "Not started: the setup needs you" in first.output
    for key in ("region", "ami_id", "subnet_id", "security_group_ids", "broker_addresses"):
        assert key in first.output
    useradd = first.called("useradd")
    assert len(useradd) == 1
    assert "--system" in useradd[0] and useradd[0][-1] == "compute-broker"
    assert ["root:compute-broker", f"{deployed.site.root}{ETC}/config.yaml.new"] in first.called(
        "chown"
    )
    sample = subprocess.run(
        [deployed.site.path(f"{PREFIX}/current/bin/compute-broker"), "sample-config"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert deployed.sample == sample
    assert first.called("systemd-run") == []
    assert first.called("systemctl") == []


def test_the_release_runs_and_accepts_the_edited_config(deployed: Deployed) -> None:
    """current/bin/compute-broker is the installed version and validates the written config."""
    site = deployed.site
    command = site.path(f"{PREFIX}/current/bin/compute-broker")
    version = subprocess.run([command, "--version"], capture_output=True, text=True, check=True)
    from broker import __version__

    assert version.stdout.strip() == f"compute-broker {__version__}"
    checked = subprocess.run(
        [command, "check-config", "--aws", site.path(f"{ETC}/config.yaml")],
        capture_output=True,
        text=True,
    )
    assert checked.returncode == 0, checked.stderr
    name = current_release(site)
    assert re.fullmatch(rf"{re.escape(__version__)}(\+g[0-9a-f]{{12}}(\.dirty)?)?", name), name
    assert f"releases/{name}" == site.link("current")


def test_setup_and_check_run_as_the_service_user_with_the_credentials_file(
    deployed: Deployed,
) -> None:
    """setup and check run in transient units as compute-broker with the root-only key passed
    by LoadCredential=: the table is created and every check passes against the cloud."""
    from broker.aws import make_client

    site, second = deployed.site, deployed.second
    runs = second.called("systemd-run")
    assert [run[-3:] for run in runs] == [
        ["setup", "--config", f"{site.root}{ETC}/config.yaml"],
        ["check", "--config", f"{site.root}{ETC}/config.yaml"],
    ]
    for run, unit in zip(runs, ("compute-broker-setup", "compute-broker-check"), strict=True):
        assert f"--unit={unit}" in run
        assert "User=compute-broker" in run
        assert f"LoadCredential=aws:{site.root}{ETC}/aws-credentials" in run
        assert f"--setenv=AWS_SHARED_CREDENTIALS_FILE=/run/credentials/{unit}.service/aws" in run
        release = site.path(f"{PREFIX}/releases/{current_release(site)}")
        assert run[-4] == f"{release}/bin/compute-broker"
    assert f"table {deployed.table}: created" in second.output
    assert re.search(r"(?m)^ok +credentials: ", second.output), second.output
    assert "FAIL" not in second.output
    table = make_client("dynamodb", region="us-east-1").describe_table(TableName=deployed.table)
    assert table["Table"]["TableStatus"] == "ACTIVE"
    credentials = site.path(f"{ETC}/aws-credentials")
    assert stat.S_IMODE(credentials.stat().st_mode) == 0o600
    assert ["root:root", str(credentials)] in second.called("chown")


def test_installed_unit_runs_the_current_release_with_the_credentials(deployed: Deployed) -> None:
    """The unit runs current/bin/compute-broker (which exists) with the config, as the service
    user; the drop-in passes the key with LoadCredential=; systemd reloads, enables, restarts."""
    site = deployed.site
    unit = site.path(UNIT).read_text()
    (exec_start,) = re.findall(r"(?m)^ExecStart=(.*)$", unit)
    assert exec_start == f"{PREFIX}/current/bin/compute-broker serve --config {ETC}/config.yaml"
    assert os.access(site.path(exec_start.split()[0]), os.X_OK)
    assert re.search(r"(?m)^User=compute-broker$", unit)
    assert not re.search(r"(?m)^EnvironmentFile=", unit)
    assert f"release {current_release(site)}" in unit.splitlines()[0]
    dropin = site.path(DROPIN).read_text()
    assert f"LoadCredential=aws:{ETC}/aws-credentials" in dropin.splitlines()
    assert "Environment=AWS_SHARED_CREDENTIALS_FILE=%d/aws" in dropin.splitlines()
    assert deployed.second.called("systemctl") == [
        ["daemon-reload"],
        ["enable", "--quiet", "compute-broker"],
        ["restart", "compute-broker"],
    ]
    for line in (
        "ufw allow from <lab CIDR> to any port 9000 proto tcp",
        "systemctl status compute-broker",
        "journalctl -u compute-broker -p warning",
        f"sudo {PREFIX}/current/deploy/install.sh check",
        "printf 'STATUS\\n' | nc -N 127.0.0.1 9000",
    ):
        assert line in deployed.second.output


@pytest.mark.skipif(shutil.which("tclsh") is None, reason="needs tclsh (Debian: tcl)")
@pytest.mark.parametrize("way", ["auto_path", "TCLLIBPATH"])
def test_tcl_client_loads_from_the_documented_path(deployed: Deployed, way: str) -> None:
    """`package require compute_broker` finds the client at /opt/compute-broker/clients/tcl,
    by `lappend auto_path` or by TCLLIBPATH."""
    directory = deployed.site.path(f"{PREFIX}/clients/tcl")
    script = "puts [package require compute_broker]"
    env = {"PATH": os.environ["PATH"]}
    if way == "auto_path":
        script = f"lappend auto_path {{{directory}}}; {script}"
    else:
        env["TCLLIBPATH"] = f"{{{directory}}}"
    done = subprocess.run(["tclsh"], input=script, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "0.1.0"


def test_constraints_pin_exactly_what_is_installed(deployed: Deployed) -> None:
    """Every package in the release is pinned by constraints.txt at the installed version, and
    every pin is used: a new or dropped dependency fails here until the file is refreshed."""
    python = deployed.site.path(f"{PREFIX}/current/bin/python")
    frozen = subprocess.run(
        [python, "-m", "pip", "freeze", "--exclude", "compute-broker"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    pins = [
        line
        for line in (REPO / "constraints.txt").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert sorted(pins, key=str.lower) == sorted(frozen, key=str.lower)


def test_a_second_run_changes_nothing(deployed: Deployed) -> None:
    """Run again with nothing new: no file is written, and the service is only started (a no-op
    when it runs), not restarted; setup and check run again, harmlessly."""
    site = deployed.site
    before = site.snapshot()
    again = site.run()
    assert again.status == 0, again.output
    assert site.snapshot() == before
    assert again.called("systemctl") == [
        ["enable", "--quiet", "compute-broker"],
        ["start", "compute-broker"],
    ]
    assert again.called("useradd") == []


def test_a_release_that_fails_to_start_is_switched_back(deployed: Deployed) -> None:
    """When the service does not start on a new release, current (and previous) go back to
    what they were, and the old release is started again."""
    site = deployed.site
    original = current_release(site)
    previous = site.link("previous") if site.path(f"{PREFIX}/previous").is_symlink() else None
    (site.stubs / "fail-next-restart").touch()
    run = site.run(RELEASE="upgrade-test")
    assert run.status == 1, run.output
    assert "did not start with release upgrade-test: back to release" in run.output
    assert current_release(site) == original
    after = site.link("previous") if site.path(f"{PREFIX}/previous").is_symlink() else None
    assert after == previous
    assert run.called("systemctl") == [
        ["daemon-reload"],
        ["enable", "--quiet", "compute-broker"],
        ["restart", "compute-broker"],  # fails
        ["daemon-reload"],  # the old release's unit again
        ["restart", "compute-broker"],
    ]
    assert f"release {original}" in site.path(UNIT).read_text().splitlines()[0]


def test_an_upgrade_is_a_new_release_and_rollback_switches_back(deployed: Deployed) -> None:
    """An install of a new release builds releases/NEW, points current at it and previous at
    the old one, and restarts; `rollback` points current back and restarts again."""
    site = deployed.site
    original = current_release(site)
    upgrade = site.run(RELEASE="upgrade-test")
    assert upgrade.status == 0, upgrade.output
    assert site.link("current") == "releases/upgrade-test"
    assert site.link("previous") == f"releases/{original}"
    assert site.link("clients") == "current/clients"
    assert ["restart", "compute-broker"] in upgrade.called("systemctl")
    assert "release upgrade-test" in site.path(UNIT).read_text().splitlines()[0]
    listed = site.run("releases")
    assert sorted(listed.output.splitlines()) == sorted([f"- {original}", "* upgrade-test"])

    back = site.run("rollback")
    assert back.status == 0, back.output
    assert site.link("current") == f"releases/{original}"
    assert site.link("previous") == "releases/upgrade-test"
    assert back.called("systemctl")[-1] == ["restart", "compute-broker"]
    assert f"release {original}" in site.path(UNIT).read_text().splitlines()[0]


def test_check_from_the_installed_script_uses_the_service_credentials(
    deployed: Deployed,
) -> None:
    """current/deploy/install.sh check runs `compute-broker check` as the service would."""
    site = deployed.site
    installed = site.path(f"{PREFIX}/current/deploy/install.sh")
    calls = site.stubs / "calls.jsonl"
    calls.write_text("")
    done = subprocess.run(
        ["bash", str(installed), "check"],
        env={"PATH": f"{site.stubs}:/usr/bin:/bin", "ROOT": str(site.root), "LANG": "C.UTF-8"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"(?m)^ok +table: ", done.stdout), done.stdout
    recorded = [json.loads(line) for line in calls.read_text().splitlines()]
    (run,) = [call for call in recorded if call[0] == "systemd-run"]
    assert "User=compute-broker" in run
    assert f"LoadCredential=aws:{site.root}{ETC}/aws-credentials" in run


def test_run_gives_any_command_the_service_credentials(deployed: Deployed) -> None:
    """`run stop-all --dry-run --config FILE` reaches AWS as the service user with its key."""
    site = deployed.site
    run = site.run("run", "stop-all", "--dry-run", "--config", str(site.path(f"{ETC}/config.yaml")))
    assert run.status == 0, run.output
    assert "0 instance(s) in pool default" in run.output
    (call,) = run.called("systemd-run")
    assert "--unit=compute-broker-run" in call
    assert f"LoadCredential=aws:{site.root}{ETC}/aws-credentials" in call


@pytest.mark.skipif(shutil.which("tclsh") is None, reason="needs tclsh (Debian: tcl)")
def test_tcl_client_alone_for_a_lab_machine(tmp_path: Path) -> None:
    """`tcl-client` installs only the Tcl client at /opt/compute-broker/clients/tcl."""
    site = make_site(tmp_path)
    run = site.run("tcl-client")
    assert run.status == 0, run.output
    directory = site.path(f"{PREFIX}/clients/tcl")
    assert sorted(path.name for path in directory.iterdir()) == [
        "README.md",
        "compute_broker.tcl",
        "pkgIndex.tcl",
    ]
    done = subprocess.run(
        ["tclsh"],
        input=f"lappend auto_path {{{directory}}}; puts [package require compute_broker]",
        capture_output=True,
        text=True,
    )
    assert done.stdout.strip() == "0.1.0", done.stderr
    assert run.calls == []


@pytest.mark.parametrize("purge", ["no", "yes"])
def test_uninstall_removes_the_service_and_the_releases(tmp_path: Path, purge: str) -> None:
    """`uninstall` stops and disables the service, removes the unit, the drop-in and
    /opt/compute-broker; PURGE=yes also the config, the credentials and the user."""
    site = make_site(tmp_path)
    for path in (f"{PREFIX}/releases/x/release.txt", UNIT, DROPIN, f"{ETC}/config.yaml"):
        site.path(path).parent.mkdir(parents=True, exist_ok=True)
        site.path(path).write_text("x\n")
    site.path("/etc/passwd").write_text("compute-broker:x:998:998::/nonexistent:/bin/false\n")
    run = site.run("uninstall", PURGE=purge)
    assert run.status == 0, run.output
    assert not site.path(PREFIX).exists()
    assert not site.path(UNIT).exists()
    assert not site.path(DROPIN).parent.exists()
    assert run.called("systemctl") == [
        ["disable", "--now", "--quiet", "compute-broker"],
        ["daemon-reload"],
    ]
    if purge == "yes":
        assert not site.path(ETC).exists()
        assert site.path("/etc/passwd").read_text() == ""
        assert run.called("userdel") == [["--root", str(site.root), "compute-broker"]]
    else:
        assert site.path(f"{ETC}/config.yaml").exists()
        assert run.called("userdel") == []


def test_deployment_guide_says_what_the_script_and_the_defaults_do(deployed: Deployed) -> None:
    """docs/deployment.md's IAM policy names the default table and pool, and its drop-in is the
    one the script installs."""
    from broker.config_validate import Config

    guide = (REPO / "docs" / "deployment.md").read_text()
    blocks = re.findall(r"```(json|ini)\n(.*?)```", guide, re.S)
    (policy,) = [
        json.loads(text) for kind, text in blocks if kind == "json" and '"Version"' in text
    ]
    statements = {statement["Sid"]: statement for statement in policy["Statement"]}
    defaults = Config()
    assert statements["Registry"]["Resource"].endswith(f":table/{defaults.registry_table}")
    condition = statements["TerminateOnlyItsOwnPool"]["Condition"]["StringEquals"]
    assert condition == {"ec2:ResourceTag/compute-broker:pool": defaults.pool_name}
    (dropin,) = [text for kind, text in blocks if kind == "ini" and "[Service]" in text]
    installed = deployed.site.path(DROPIN).read_text().splitlines()
    for line in dropin.split("\n"):
        assert not line.strip() or line.strip() in installed
