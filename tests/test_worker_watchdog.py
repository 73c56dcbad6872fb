"""The worker watchdog (broker/worker_watchdog.sh) run for real by `sh` against loopback
stand-ins for brokers and the instance metadata service, and the user data that carries it
(broker/userdata.py).

The script's power-off command is replaced by a stub that records the reason; `shutdown` and
`poweroff` on its PATH are stubs too, so that no test can power this machine off. Times are
short: checks every 0.2 s, orphan_timeout 1.5 s, replies awaited 0.5 s.
"""

from __future__ import annotations

import email
import os
import re
import shlex
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from email.message import Message
from functools import partial
from pathlib import Path

import attrs
import pytest
import trio

from broker.userdata import (
    EC2_USER_DATA_LIMIT,
    OPERATOR_FILENAME,
    WATCHDOG_FILENAME,
    WatchdogSettings,
    compose,
    content_type,
    watchdog_script,
)
from tests.harness import wait_for

INSTANCE_ID = "i-0123456789abcdef0"
INTERVAL = 0.2
ORPHAN_TIMEOUT = 1.5
REPLY_TIMEOUT = 0.5
SLACK = 3.0  # how late a power-off may come on a busy two-core machine
OK = b"OK\n"
NOT_WANTED = b"ERROR: Worker not wanted\n"
# Checks that span more than orphan_timeout: the sleeps between them alone take longer.
CHECKS_PAST_ORPHAN_TIMEOUT = int(ORPHAN_TIMEOUT / INTERVAL) + 3

_SH = pytest.mark.skipif(shutil.which("sh") is None, reason="the watchdog needs a POSIX sh")


def needs_sh(test: Callable[..., object]) -> Callable[..., object]:
    """The test runs the script under sh: skipped without one, and `slow` (a process)."""
    return pytest.mark.slow(_SH(test))


def settings(*ports: int, **changes: float) -> WatchdogSettings:
    values = {"interval": INTERVAL, "orphan_timeout": ORPHAN_TIMEOUT, "max_lifetime": 0.0}
    values.update(changes)
    return WatchdogSettings(brokers=[("127.0.0.1", port) for port in ports], **values)


def closed_port() -> int:
    """A loopback port nobody listens on (connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@attrs.define
class FakeBroker:
    """A broker stand-in: records each connection's first line and answers `reply(n)` to the
    n-th (1-based); None answers nothing, b"" closes at once. Connections stay open after a
    reply until the client closes, as the real broker's do."""

    reply: Callable[[int], bytes | None]
    lines: list[str] = attrs.Factory(list)

    async def handle(self, stream: trio.SocketStream) -> None:
        try:
            data = b""
            while b"\n" not in data:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    return
                data += chunk
            self.lines.append(data.split(b"\n", 1)[0].decode())
            answer = self.reply(len(self.lines))
            if answer is None:
                await trio.sleep_forever()
            if not answer:
                return
            await stream.send_all(answer)
            while await stream.receive_some(4096):
                pass
        except trio.BrokenResourceError:
            pass
        finally:
            await stream.aclose()


def always(answer: bytes | None) -> Callable[[int], bytes | None]:
    return lambda _: answer


@attrs.define
class FakeImds:
    """The IMDSv2 instance id: a token from PUT /latest/api/token (with a TTL header), then
    GET /latest/meta-data/instance-id with that token; anything else is 401."""

    token: str = "token-for-tests"
    requests: list[tuple[str, str, dict[str, str]]] = attrs.Factory(list)

    def answer(self, method: str, path: str, headers: dict[str, str]) -> tuple[str, str]:
        ttl = headers.get("x-aws-ec2-metadata-token-ttl-seconds", "")
        if (method, path) == ("PUT", "/latest/api/token") and ttl.isdigit():
            return "200 OK", self.token
        token = headers.get("x-aws-ec2-metadata-token")
        if (method, path) == ("GET", "/latest/meta-data/instance-id") and token == self.token:
            return "200 OK", INSTANCE_ID
        return "401 Unauthorized", ""

    async def handle(self, stream: trio.SocketStream) -> None:
        try:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    return
                data += chunk
            request, *lines = data.split(b"\r\n\r\n", 1)[0].decode().split("\r\n")
            method, path, _ = request.split(" ")
            headers = {
                name.strip().lower(): value.strip()
                for name, value in (line.split(":", 1) for line in lines)
            }
            self.requests.append((method, path, headers))
            status, body = self.answer(method, path, headers)
            await stream.send_all(
                f"HTTP/1.0 {status}\r\nContent-Type: text/plain\r\n"
                f"Content-Length: {len(body)}\r\n\r\n{body}".encode()
            )
        finally:
            await stream.aclose()


async def serve(
    nursery: trio.Nursery, handler: Callable[[trio.SocketStream], Awaitable[None]]
) -> int:
    """Serve `handler` on a free loopback port; the port."""
    listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    port: int = listeners[0].socket.getsockname()[1]
    return port


@attrs.define
class Watchdog:
    """A running watchdog script and what it left behind."""

    process: trio.Process
    script: Path
    directory: Path
    started: float

    @property
    def reasons(self) -> list[str]:
        """The reasons the stub power-off command was called with, in order."""
        marker = self.directory / "powered-off"
        return marker.read_text().splitlines() if marker.exists() else []

    @property
    def log(self) -> str:
        log = self.directory / "watchdog.log"
        return log.read_text() if log.exists() else "(no log)"

    @property
    def system_power_off(self) -> list[str]:
        """Calls of the `shutdown` and `poweroff` stubs on the script's PATH."""
        record = self.directory / "system-power-off"
        return record.read_text().splitlines() if record.exists() else []

    async def exited(self, timeout: float) -> float:
        """Wait for the script to exit; the seconds since it was started."""
        with trio.fail_after(timeout):
            await self.process.wait()
        return trio.current_time() - self.started


def watchdog_environment(directory: Path, **overrides: str | None) -> dict[str, str]:
    """The script's environment: test knobs set, stubs first on PATH; None removes a knob."""
    stubs = directory / "bin"
    stubs.mkdir(exist_ok=True)
    record = shlex.quote(str(directory / "system-power-off"))
    for name in ("shutdown", "poweroff"):
        stub = stubs / name
        exit_status = overrides.pop(f"{name}_exit", None) or "0"
        stub.write_text(f'#!/bin/sh\necho "{name} $*" >>{record}\nexit {exit_status}\n')
        stub.chmod(0o755)
    marker = shlex.quote(str(directory / "powered-off"))
    environment = {k: v for k, v in os.environ.items() if not k.startswith("CB_WATCHDOG_")}
    knobs: dict[str, str | None] = {
        "PATH": f"{stubs}{os.pathsep}{os.environ.get('PATH', os.defpath)}",
        "CB_WATCHDOG_SHUTDOWN": f'printf "%s\\n" "$CB_WATCHDOG_REASON" >>{marker}',
        "CB_WATCHDOG_INSTANCE_ID": INSTANCE_ID,
        "CB_WATCHDOG_REPLY_TIMEOUT": str(REPLY_TIMEOUT),
        "CB_WATCHDOG_LOG": str(directory / "watchdog.log"),
        "CB_WATCHDOG_PER_BOOT_DIR": "",
        "CB_WATCHDOG_IMDS": f"127.0.0.1:{closed_port()}",
    }
    knobs.update(overrides)
    environment.update({k: v for k, v in knobs.items() if v is not None})
    return environment


@asynccontextmanager
async def running_watchdog(
    directory: Path, watchdog: WatchdogSettings, *args: str, **overrides: str | None
) -> AsyncIterator[Watchdog]:
    """The rendered script run by `sh --foreground` (or with `args`); killed at the end."""
    script = directory / "watchdog.sh"
    script.write_text(watchdog_script(watchdog))
    environment = watchdog_environment(directory, **overrides)
    started = trio.current_time()
    with (directory / "stderr").open("wb") as stderr:
        process = await trio.lowlevel.open_process(
            ["sh", str(script), *(args or ("--foreground",))],
            env=environment,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        yield Watchdog(process, script, directory, started)
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


# --- the rules, against brokers that answer in each way ---


@needs_sh
async def test_keeps_running_while_a_broker_answers_ok(tmp_path: Path) -> None:
    """A broker answering OK keeps the worker up well past orphan_timeout."""
    broker = FakeBroker(always(OK))
    async with trio.open_nursery() as nursery:
        port = await serve(nursery, broker.handle)
        async with running_watchdog(tmp_path, settings(port)) as watchdog:
            await wait_for(lambda: len(broker.lines) >= CHECKS_PAST_ORPHAN_TIMEOUT, timeout=15)
            assert watchdog.process.returncode is None, watchdog.log
            assert watchdog.reasons == []
        nursery.cancel_scope.cancel()
    assert set(broker.lines) == {f"ALIVE {INSTANCE_ID}"}


@needs_sh
async def test_powers_off_after_orphan_timeout_when_the_broker_is_down(tmp_path: Path) -> None:
    """No broker listening: power-off after orphan_timeout, not before, reason `orphaned`."""
    with trio.fail_after(15):
        async with running_watchdog(tmp_path, settings(closed_port())) as watchdog:
            elapsed = await watchdog.exited(ORPHAN_TIMEOUT + SLACK)
    assert elapsed >= ORPHAN_TIMEOUT, watchdog.log
    assert watchdog.reasons == ["orphaned"]
    assert watchdog.process.returncode == 0


@needs_sh
@pytest.mark.parametrize(
    "reply",
    [None, b"", b"ERROR: too many connections\n", b"ERROR: Worker not found\n", b"OKAY\n"],
    ids=["silence", "closed", "busy", "other-error", "not-ok"],
)
async def test_any_other_reply_is_no_answer(tmp_path: Path, reply: bytes | None) -> None:
    """Silence, a closed connection or any reply but OK / not-wanted count as no answer."""
    broker = FakeBroker(always(reply))
    async with trio.open_nursery() as nursery:
        port = await serve(nursery, broker.handle)
        async with running_watchdog(tmp_path, settings(port)) as watchdog:
            elapsed = await watchdog.exited(ORPHAN_TIMEOUT + REPLY_TIMEOUT + SLACK)
        nursery.cancel_scope.cancel()
    assert elapsed >= ORPHAN_TIMEOUT, watchdog.log
    assert watchdog.reasons == ["orphaned"]
    assert len(broker.lines) >= 2, "a silent broker must not stall the checks"


@needs_sh
async def test_powers_off_at_the_second_not_wanted_in_a_row(tmp_path: Path) -> None:
    """Two not-wanted answers in a row: power-off right after the second, reason given."""
    broker = FakeBroker(always(NOT_WANTED))
    async with trio.open_nursery() as nursery:
        port = await serve(nursery, broker.handle)
        async with running_watchdog(tmp_path, settings(port)) as watchdog:
            elapsed = await watchdog.exited(SLACK)
        nursery.cancel_scope.cancel()
    assert watchdog.reasons == ["not wanted"], watchdog.log
    assert len(broker.lines) == 2
    assert elapsed < ORPHAN_TIMEOUT + SLACK


@needs_sh
async def test_a_single_not_wanted_between_oks_keeps_running(tmp_path: Path) -> None:
    """Not-wanted, OK, not-wanted, OK...: never two in a row, so the worker stays up."""
    broker = FakeBroker(lambda n: NOT_WANTED if n % 2 else OK)
    async with trio.open_nursery() as nursery:
        port = await serve(nursery, broker.handle)
        async with running_watchdog(tmp_path, settings(port)) as watchdog:
            await wait_for(lambda: len(broker.lines) >= CHECKS_PAST_ORPHAN_TIMEOUT, timeout=15)
            assert watchdog.process.returncode is None, watchdog.log
            assert watchdog.reasons == []
        nursery.cancel_scope.cancel()


@needs_sh
async def test_the_next_broker_answers_when_the_first_is_down(tmp_path: Path) -> None:
    """Brokers are tried in order until one answers; the ones after it are not asked."""
    second, third = FakeBroker(always(OK)), FakeBroker(always(OK))
    async with trio.open_nursery() as nursery:
        ports = [closed_port(), await serve(nursery, second.handle)]
        ports.append(await serve(nursery, third.handle))
        async with running_watchdog(tmp_path, settings(*ports)) as watchdog:
            await wait_for(lambda: len(second.lines) >= CHECKS_PAST_ORPHAN_TIMEOUT, timeout=15)
            assert watchdog.process.returncode is None, watchdog.log
            assert watchdog.reasons == []
        nursery.cancel_scope.cancel()
    assert third.lines == []


@needs_sh
@pytest.mark.skipif(not Path("/proc/uptime").is_file(), reason="needs Linux /proc/uptime")
async def test_max_lifetime_counts_from_boot(tmp_path: Path) -> None:
    """With /proc/uptime, max_lifetime is the machine's uptime: power-off at that uptime."""
    broker = FakeBroker(always(OK))
    uptime = float((await trio.Path("/proc/uptime").read_text()).split()[0])
    lifetime = 1.5
    async with trio.open_nursery() as nursery:
        port = await serve(nursery, broker.handle)
        watchdog_settings = settings(port, orphan_timeout=60, max_lifetime=uptime + lifetime)
        async with running_watchdog(tmp_path, watchdog_settings) as watchdog:
            elapsed = await watchdog.exited(lifetime + SLACK)
        nursery.cancel_scope.cancel()
    assert watchdog.reasons == ["max_lifetime"], watchdog.log
    assert elapsed >= lifetime - 0.05  # /proc/uptime has centiseconds
    assert broker.lines, "the broker's OKs do not matter once the lifetime is over"


@needs_sh
async def test_max_lifetime_counts_from_start_without_proc_uptime(tmp_path: Path) -> None:
    """Without an uptime file the lifetime runs from the script's start (whole seconds)."""
    broker = FakeBroker(always(OK))
    async with trio.open_nursery() as nursery:
        port = await serve(nursery, broker.handle)
        watchdog_settings = settings(port, orphan_timeout=60, max_lifetime=2)
        async with running_watchdog(
            tmp_path, watchdog_settings, CB_WATCHDOG_UPTIME_FILE=str(tmp_path / "no-uptime")
        ) as watchdog:
            elapsed = await watchdog.exited(2 + SLACK)
        nursery.cancel_scope.cancel()
    assert watchdog.reasons == ["max_lifetime"], watchdog.log
    assert elapsed > 1.0  # `date +%s` whole seconds: more than max_lifetime - 1


# --- how it talks: transports, the instance id, the power-off command ---


@needs_sh
@pytest.mark.parametrize("transport", ["bash", "python3", "nc"])
async def test_each_transport_reads_the_reply(tmp_path: Path, transport: str) -> None:
    """bash's /dev/tcp, nc and python3 each deliver the line and read the broker's reply."""
    if shutil.which(transport) is None:
        pytest.skip(f"no {transport} here")
    broker = FakeBroker(always(NOT_WANTED))
    async with trio.open_nursery() as nursery:
        port = await serve(nursery, broker.handle)
        async with running_watchdog(
            tmp_path, settings(port), CB_WATCHDOG_TRANSPORT=transport
        ) as watchdog:
            await watchdog.exited(2 * REPLY_TIMEOUT + SLACK)
        nursery.cancel_scope.cancel()
    assert watchdog.reasons == ["not wanted"], watchdog.log
    assert broker.lines == [f"ALIVE {INSTANCE_ID}"] * 2
    assert f"transport {transport}" in watchdog.log


@needs_sh
async def test_without_any_transport_nothing_answers(tmp_path: Path) -> None:
    """When no TCP client works the brokers count as silent: power-off after orphan_timeout."""
    broker = FakeBroker(always(OK))
    async with trio.open_nursery() as nursery:
        port = await serve(nursery, broker.handle)
        async with running_watchdog(
            tmp_path, settings(port), CB_WATCHDOG_TRANSPORT="none"
        ) as watchdog:
            elapsed = await watchdog.exited(ORPHAN_TIMEOUT + SLACK)
        nursery.cancel_scope.cancel()
    assert watchdog.reasons == ["orphaned"], watchdog.log
    assert elapsed >= ORPHAN_TIMEOUT
    assert broker.lines == []


@needs_sh
@pytest.mark.parametrize("client", ["curl", "wget", "tcp"])
async def test_instance_id_comes_from_imdsv2(tmp_path: Path, client: str) -> None:
    """The id is read with an IMDSv2 token (PUT, then GET with the token) by curl, wget or a
    raw HTTP request, and is what ALIVE names."""
    if client != "tcp" and shutil.which(client) is None:
        pytest.skip(f"no {client} here")
    broker, imds = FakeBroker(always(NOT_WANTED)), FakeImds()
    async with trio.open_nursery() as nursery:
        port = await serve(nursery, broker.handle)
        imds_port = await serve(nursery, imds.handle)
        async with running_watchdog(
            tmp_path,
            settings(port),
            CB_WATCHDOG_INSTANCE_ID=None,
            CB_WATCHDOG_IMDS=f"127.0.0.1:{imds_port}",
            CB_WATCHDOG_HTTP=client,
        ) as watchdog:
            await watchdog.exited(SLACK)
        nursery.cancel_scope.cancel()
    assert broker.lines == [f"ALIVE {INSTANCE_ID}"] * 2, watchdog.log
    assert [(method, path) for method, path, _ in imds.requests] == [
        ("PUT", "/latest/api/token"),
        ("GET", "/latest/meta-data/instance-id"),
    ]


@pytest.mark.slow  # runs the script under busybox sh
@pytest.mark.skipif(shutil.which("busybox") is None, reason="no busybox here")
async def test_works_with_busybox_alone(tmp_path: Path) -> None:
    """With only busybox's applets (Alpine-like: ash, nc, a wget without PUT) it still reads
    its id and the broker's replies."""
    applets = tmp_path / "busybox"
    applets.mkdir()
    busybox = shutil.which("busybox")
    assert busybox is not None
    listed = await trio.run_process([busybox, "--list"], capture_stdout=True)
    for applet in listed.stdout.decode().split():
        if applet not in ("shutdown", "poweroff", "halt", "reboot"):
            (applets / applet).symlink_to(busybox)
    broker, imds = FakeBroker(always(NOT_WANTED)), FakeImds()
    async with trio.open_nursery() as nursery:
        port = await serve(nursery, broker.handle)
        imds_port = await serve(nursery, imds.handle)
        async with running_watchdog(
            tmp_path,
            settings(port),
            PATH=f"{tmp_path / 'bin'}{os.pathsep}{applets}",
            CB_WATCHDOG_INSTANCE_ID=None,
            CB_WATCHDOG_IMDS=f"127.0.0.1:{imds_port}",
        ) as watchdog:
            await watchdog.exited(2 * REPLY_TIMEOUT + SLACK)
        nursery.cancel_scope.cancel()
    assert watchdog.reasons == ["not wanted"], watchdog.log
    assert broker.lines == [f"ALIVE {INSTANCE_ID}"] * 2
    assert "transport nc" in watchdog.log


@needs_sh
async def test_without_an_instance_id_it_powers_off_after_orphan_timeout(
    tmp_path: Path,
) -> None:
    """No metadata service: nothing to ask about, so no OK, so orphaned in the end."""
    broker = FakeBroker(always(OK))
    async with trio.open_nursery() as nursery:
        port = await serve(nursery, broker.handle)
        async with running_watchdog(
            tmp_path, settings(port), CB_WATCHDOG_INSTANCE_ID=None
        ) as watchdog:
            elapsed = await watchdog.exited(ORPHAN_TIMEOUT + SLACK)
        nursery.cancel_scope.cancel()
    assert watchdog.reasons == ["orphaned"], watchdog.log
    assert elapsed >= ORPHAN_TIMEOUT
    assert broker.lines == []


@needs_sh
@pytest.mark.parametrize(
    ("shutdown_exit", "calls"),
    [("0", ["shutdown -P now"]), ("1", ["shutdown -P now", "poweroff "])],
    ids=["shutdown", "poweroff-when-shutdown-fails"],
)
async def test_default_power_off_command(
    tmp_path: Path, shutdown_exit: str, calls: list[str]
) -> None:
    """Without the test override the script runs `shutdown -P now`, else `poweroff`."""
    broker = FakeBroker(always(NOT_WANTED))
    async with trio.open_nursery() as nursery:
        port = await serve(nursery, broker.handle)
        async with running_watchdog(
            tmp_path, settings(port), CB_WATCHDOG_SHUTDOWN=None, shutdown_exit=shutdown_exit
        ) as watchdog:
            await watchdog.exited(SLACK)
        nursery.cancel_scope.cancel()
    assert watchdog.system_power_off == calls, watchdog.log


# --- starting from user data, and after a reboot ---


@needs_sh
async def test_started_as_user_data_it_detaches_and_returns_at_once(tmp_path: Path) -> None:
    """Run without arguments (as cloud-init does) the script exits at once, holding no pipe
    open, and its detached copy goes on checking and powers off."""
    wanted = True
    broker = FakeBroker(lambda _: OK if wanted else NOT_WANTED)
    async with trio.open_nursery() as nursery:
        port = await serve(nursery, broker.handle)
        script = tmp_path / "watchdog.sh"
        script.write_text(watchdog_script(settings(port)))
        with trio.fail_after(SLACK):  # run_process waits for EOF on stdout and stderr too
            result = await trio.run_process(
                ["sh", str(script)],
                env=watchdog_environment(tmp_path),
                capture_stdout=True,
                capture_stderr=True,
            )
        assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")
        await wait_for(lambda: len(broker.lines) >= 2, timeout=SLACK)
        marker = tmp_path / "powered-off"
        assert not marker.exists()
        wanted = False
        await wait_for(marker.exists, timeout=SLACK)
        nursery.cancel_scope.cancel()
    assert marker.read_text().splitlines() == ["not wanted"]


@needs_sh
async def test_installs_a_per_boot_copy_that_remembers_its_instance(tmp_path: Path) -> None:
    """Once it knows its instance, the watchdog copies itself into cloud-init's per-boot
    directory (runs on every boot), naming that instance."""
    per_boot = tmp_path / "per-boot"
    per_boot.mkdir()
    broker = FakeBroker(always(NOT_WANTED))
    async with trio.open_nursery() as nursery:
        port = await serve(nursery, broker.handle)
        async with running_watchdog(
            tmp_path, settings(port), CB_WATCHDOG_PER_BOOT_DIR=str(per_boot)
        ) as watchdog:
            await watchdog.exited(SLACK)
        nursery.cancel_scope.cancel()
    copy = per_boot / "compute-broker-watchdog.sh"
    assert copy.stat().st_mode & 0o777 == 0o755, watchdog.log
    expected = watchdog.script.read_text().replace(
        "installed_for=''", f"installed_for='{INSTANCE_ID}'"
    )
    assert copy.read_text() == expected


@needs_sh
async def test_a_per_boot_copy_of_another_instance_removes_itself(tmp_path: Path) -> None:
    """In an image made from a worker, the copy finds another instance id: it deletes itself
    and exits without asking any broker or powering off."""
    per_boot = tmp_path / "per-boot"
    per_boot.mkdir()
    broker = FakeBroker(always(NOT_WANTED))
    async with trio.open_nursery() as nursery:
        port = await serve(nursery, broker.handle)
        copy = per_boot / "compute-broker-watchdog.sh"
        copy.write_text(
            watchdog_script(settings(port)).replace(
                "installed_for=''", "installed_for='i-0aaaaaaaaaaaaaaaa'"
            )
        )
        with trio.fail_after(SLACK):
            result = await trio.run_process(
                ["sh", str(copy), "--foreground"],
                env=watchdog_environment(tmp_path, CB_WATCHDOG_PER_BOOT_DIR=str(per_boot)),
            )
        nursery.cancel_scope.cancel()
    assert result.returncode == 0
    assert not copy.exists()
    assert broker.lines == []
    assert not (tmp_path / "powered-off").exists()


# --- the user data that carries it ---

WATCHDOG = WatchdogSettings(brokers=[("10.0.0.5", 9000), ("broker.lab", 9001)])


def parts(user_data: str) -> list[Message]:
    """The leaf parts of a MIME multipart, as cloud-init walks them."""
    message = email.message_from_string(user_data)
    assert message.is_multipart()
    return [part for part in message.walk() if not part.is_multipart()]


def text_of(part: Message) -> str:
    payload = part.get_payload(decode=True)
    assert isinstance(payload, bytes)
    return payload.decode(part.get_content_charset() or "ascii")


def test_script_carries_the_settings_and_no_comments() -> None:
    """The settings are written into the script; comments and indentation are left out."""
    script = watchdog_script(
        WatchdogSettings(
            brokers=[("10.0.0.5", 9000), ("broker.lab", 9001)],
            interval=0.25,
            orphan_timeout=1800,
            max_lifetime=86400,
        )
    )
    assert script.startswith("#!/bin/sh\n# compute-broker worker watchdog")
    assert "\nbrokers='10.0.0.5:9000 broker.lab:9001'\ninterval=0.25\n" in script
    assert "\norphan_timeout=1800\nmax_lifetime=86400\n" in script
    assert script.isascii()
    body = script.splitlines()[2:]
    assert [line for line in body if line.startswith("#") or line != line.strip()] == []


@needs_sh
def test_script_is_valid_sh() -> None:
    """`sh -n` accepts the rendered script."""
    result = subprocess.run(
        ["sh", "-n", "/dev/stdin"], input=watchdog_script(WATCHDOG), text=True, check=False
    )
    assert result.returncode == 0


@pytest.mark.parametrize("operator", [None, "", "  \n"])
def test_without_operator_user_data_the_user_data_is_the_script(operator: str | None) -> None:
    """No user data of the operator's: the watchdog script alone, not MIME."""
    assert compose(operator, WATCHDOG) == watchdog_script(WATCHDOG)


@pytest.mark.parametrize("operator", [None, "#!/bin/sh\necho hi\n", "#cloud-config\n{}\n"])
def test_opting_out_leaves_the_operator_user_data_alone(operator: str | None) -> None:
    """No watchdog settings: the operator's user data exactly as given."""
    assert compose(operator, None) == operator


def test_operator_script_runs_too_as_the_first_part() -> None:
    """A shell script of the operator's becomes the first part of a multipart/mixed, the
    watchdog the second; both text/x-shellscript, both intact."""
    operator = "#!/bin/bash\nset -e\necho 'hello from the operator'\n"
    user_data = compose(operator, WATCHDOG)
    assert user_data is not None
    assert "mime-version:" in user_data[:4096].lower()  # how cloud-init recognises MIME
    assert email.message_from_string(user_data).get_content_type() == "multipart/mixed"
    first, second = parts(user_data)
    assert (first.get_content_type(), first.get_filename()) == (
        "text/x-shellscript",
        OPERATOR_FILENAME,
    )
    assert text_of(first) == operator
    assert (second.get_content_type(), second.get_filename()) == (
        "text/x-shellscript",
        WATCHDOG_FILENAME,
    )
    assert text_of(second) == watchdog_script(WATCHDOG)
    # cloud-init runs the scripts in file-name order: the watchdog starts (and returns at
    # once) even if the operator's script never ends.
    assert sorted([OPERATOR_FILENAME, WATCHDOG_FILENAME])[0] == WATCHDOG_FILENAME


def test_operator_cloud_config_keeps_its_type() -> None:
    """cloud-config stays text/cloud-config next to the watchdog script."""
    operator = "#cloud-config\npackages: [htop]\n"
    user_data = compose(operator, WATCHDOG)
    assert user_data is not None
    first, second = parts(user_data)
    assert first.get_content_type() == "text/cloud-config"
    assert text_of(first) == operator
    assert second.get_content_type() == "text/x-shellscript"


@pytest.mark.parametrize(
    ("start", "expected"),
    [
        ("#!/usr/bin/env python3\n", "text/x-shellscript"),
        ("#cloud-config\n", "text/cloud-config"),
        ("#cloud-config-archive\n", "text/cloud-config-archive"),
        ("#cloud-boothook\n", "text/cloud-boothook"),
        ("#include https://example.invalid/x\n", "text/x-include-url"),
        ("#include-once https://example.invalid/x\n", "text/x-include-once-url"),
        ("## template: jinja\n#cloud-config\n", "text/jinja2"),
        ('{"job": 7}\n', "text/plain"),
    ],
)
def test_operator_part_type_follows_cloud_init(start: str, expected: str) -> None:
    """The operator's part gets the type cloud-init gives its first characters."""
    assert content_type(start) == expected
    user_data = compose(start, WATCHDOG)
    assert user_data is not None
    assert parts(user_data)[0].get_content_type() == expected


def test_operator_mime_keeps_its_parts_and_gains_the_watchdog() -> None:
    """User data that is already MIME keeps its own parts; the watchdog is appended."""
    operator = (
        'Content-Type: multipart/mixed; boundary="XYZ"\nMIME-Version: 1.0\n\n'
        '--XYZ\nContent-Type: text/cloud-config; charset="us-ascii"\n\n'
        "#cloud-config\nruncmd: [date]\n\n"
        '--XYZ\nContent-Type: text/x-shellscript; charset="us-ascii"\n'
        'Content-Disposition: attachment; filename="setup.sh"\n\n'
        "#!/bin/sh\necho setup\n\n--XYZ--\n"
    )
    user_data = compose(operator, WATCHDOG)
    assert user_data is not None
    assert email.message_from_string(user_data).get_boundary() == "XYZ"
    types = [(part.get_content_type(), part.get_filename()) for part in parts(user_data)]
    assert types == [
        ("text/cloud-config", None),
        ("text/x-shellscript", "setup.sh"),
        ("text/x-shellscript", WATCHDOG_FILENAME),
    ]
    assert text_of(parts(user_data)[1]) == "#!/bin/sh\necho setup\n"


def test_non_ascii_operator_data_survives() -> None:
    """UTF-8 user data comes back byte for byte from its part."""
    operator = "#!/bin/sh\necho 'Grüße aus dem Labor'\n"
    user_data = compose(operator, WATCHDOG)
    assert user_data is not None
    assert text_of(parts(user_data)[0]) == operator


def test_same_inputs_give_the_same_user_data() -> None:
    """compose is deterministic (a retried RunInstances repeats its parameters exactly)."""
    assert compose("#!/bin/sh\n", WATCHDOG) == compose("#!/bin/sh\n", WATCHDOG)
    assert compose("#!/bin/sh\n", WATCHDOG) != compose("#!/bin/bash\n", WATCHDOG)


def test_user_data_over_the_ec2_limit_is_refused_with_the_sizes() -> None:
    """Past 16 KB, a ValueError says how big each piece is; just under it, it passes."""
    script = len(watchdog_script(WATCHDOG).encode())
    operator = "#!/bin/sh\n" + "x" * (EC2_USER_DATA_LIMIT - script)
    with pytest.raises(ValueError, match="too large") as refused:
        compose(operator, WATCHDOG)
    message = str(refused.value)
    assert f"operator's {len(operator)} bytes" in message
    assert f"watchdog's {script} bytes" in message
    assert str(EC2_USER_DATA_LIMIT) in message
    fits = "#!/bin/sh\n" + "x" * (EC2_USER_DATA_LIMIT - script - 1000)
    user_data = compose(fits, WATCHDOG)
    assert user_data is not None
    assert len(user_data.encode()) <= EC2_USER_DATA_LIMIT


@pytest.mark.parametrize(
    ("changes", "complaint"),
    [
        ({"brokers": []}, "at least one broker"),
        ({"brokers": [("broker; rm -rf /", 9000)]}, "bad broker host"),
        ({"brokers": [("10.0.0.5", 0)]}, "bad broker port"),
        ({"interval": 0}, "interval must be at least"),
        ({"orphan_timeout": float("inf")}, "orphan_timeout must be at least"),
        ({"max_lifetime": -1}, "max_lifetime must be 0 or at least"),
    ],
)
def test_settings_refuse_what_the_script_cannot_take(
    changes: dict[str, object], complaint: str
) -> None:
    """Addresses that would not be safe in the script, and times it cannot count, fail."""
    values: dict[str, object] = {"brokers": [("10.0.0.5", 9000)], **changes}
    with pytest.raises(ValueError, match=re.escape(complaint)):
        WatchdogSettings(**values)  # type: ignore[arg-type]
