"""Sandbox workers answer on their port: an echo service from boot until termination, so the
README's client examples and `probe: true` work against `compute-broker serve --sandbox`.

The service's own tests are unit tests on loopback; the ones that start the broker are `slow`."""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import yaml

from broker.sandbox_workers import Phase, WorkerServices
from tests.harness import listening_port, wait_for

ROOT = Path(__file__).resolve().parent.parent
DEADLINE = 10
BROKER_DEADLINE = 60
START_TIMEOUT = 60.0
# Addresses for the service's own tests, far from the 127.77.0.x the sandbox hands out first.
_test_ips = (f"127.77.250.{n}" for n in itertools.count(1))


@pytest.fixture
def services() -> Iterator[WorkerServices]:
    running = WorkerServices()
    running.start()
    try:
        yield running
    finally:
        running.stop()


async def refused(ip: str, port: int) -> bool:
    """True when nothing listens on ip:port (the connection is refused)."""
    try:
        stream = await trio.open_tcp_stream(ip, port)
    except OSError:
        return True
    await stream.aclose()
    return False


async def echo(ip: str, port: int, line: bytes) -> bytes:
    """Send `line` on a new connection and read until it came back (or the server closed)."""
    async with await trio.open_tcp_stream(ip, port) as stream:
        await stream.send_all(line)
        received = b""
        while len(received) < len(line):
            chunk = await stream.receive_some(4096)
            if not chunk:
                break
            received += chunk
        return received


# --- the service ----------------------------------------------------------------------------


async def test_a_worker_refuses_connections_until_it_boots_then_echoes_each_line(
    services: WorkerServices,
) -> None:
    """Before boot the port refuses connections; after, every line comes back as sent."""
    ip = next(_test_ips)
    assert services.reserve(ip, 0)
    service = services.claim(ip, boot_delay=3600)
    assert service is not None
    with trio.fail_after(DEADLINE):
        before = await refused(ip, service.port)
        booted = service.boot()
        replies = [await echo(ip, service.port, b"hello\nsecond line\n") for _ in range(2)]
        await trio.to_thread.run_sync(service.close)

    assert before
    assert booted
    assert replies == [b"hello\nsecond line\n"] * 2


async def test_the_boot_timer_starts_listening_with_nobody_asking(
    services: WorkerServices,
) -> None:
    """A worker listens once its boot delay has passed, whether or not its state was read."""
    ip = next(_test_ips)
    assert services.reserve(ip, 0)
    service = services.claim(ip, boot_delay=0.2)
    assert service is not None

    async def answers() -> bool:
        return not await refused(ip, service.port)

    with trio.fail_after(DEADLINE):
        await wait_for(answers, what="the worker to listen")
        reply = await echo(ip, service.port, b"ping\n")
        await trio.to_thread.run_sync(service.close)

    assert reply == b"ping\n"


async def test_closing_a_worker_closes_its_port_and_its_connections_for_good(
    services: WorkerServices,
) -> None:
    """After close, connecting is refused, an open connection reads EOF, and boot is a no-op."""
    ip = next(_test_ips)
    assert services.reserve(ip, 0)
    service = services.claim(ip, boot_delay=0)
    assert service is not None
    with trio.fail_after(DEADLINE):
        service.boot()
        stream = await trio.open_tcp_stream(ip, service.port)
        await stream.send_all(b"accepted?\n")
        accepted = await stream.receive_some(4096)  # so the service, not the backlog, has it
        await trio.to_thread.run_sync(service.close)
        after_close = await stream.receive_some(4096)
        await stream.aclose()
        booted_again = service.boot()
        closed = await refused(ip, service.port)

    assert accepted == b"accepted?\n"
    assert after_close == b""
    assert not booted_again
    assert closed
    assert service.phase is Phase.CLOSED


async def test_a_worker_closed_before_it_booted_never_listens(services: WorkerServices) -> None:
    """Terminating a booting worker releases its address; nothing can boot it afterwards."""
    ip = next(_test_ips)
    assert services.reserve(ip, 0)
    service = services.claim(ip, boot_delay=0.1)
    assert service is not None
    port = service.port
    with trio.fail_after(DEADLINE):
        await trio.to_thread.run_sync(service.close)  # returns once its boot timer is gone
        booted = service.boot()
        closed = await refused(ip, port)

    assert not booted
    assert closed
    assert service.phase is Phase.CLOSED


async def test_an_address_another_socket_holds_is_skipped(services: WorkerServices) -> None:
    """reserve() refuses an ip:port that another socket (another sandbox) listens on."""
    ip = next(_test_ips)
    holder = trio.socket.socket()
    await holder.bind((ip, 0))
    holder.listen(1)
    port = holder.getsockname()[1]
    try:
        taken = services.reserve(ip, port)
        free = services.reserve(next(_test_ips), port)
    finally:
        holder.close()

    assert not taken
    assert free


def test_claiming_an_address_that_was_never_reserved_gives_no_service(
    services: WorkerServices,
) -> None:
    """Workers whose address was not reserved (services off, or no address) get no service."""
    assert services.claim(next(_test_ips), boot_delay=0) is None
    assert services.claim(None, boot_delay=0) is None


# --- a sandbox broker, end to end -----------------------------------------------------------


class SandboxBroker:
    """`compute-broker serve --sandbox --host 127.0.0.1 --port 0` with a config file."""

    def __init__(self, config: dict[str, Any], workdir: Path) -> None:
        config_path = workdir / "sandbox.yaml"
        config_path.write_text(yaml.safe_dump({"log_format": "json", **config}))
        self.log_path = workdir / "broker.log"
        self._log = self.log_path.open("w")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "COMPUTE_"))}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "broker", "serve", "--sandbox", "--host", "127.0.0.1",
             "--port", "0", "--config", str(config_path)],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=self._log, text=True,
        )  # fmt: skip
        self.port = self._wait_listening()

    def _wait_listening(self) -> int:
        port = listening_port(self.proc, START_TIMEOUT)
        if port is None:
            self.stop()
            raise AssertionError(f"broker did not start:\n{self.log_path.read_text()[-3000:]}")
        return port

    async def ask(self, line: str) -> str:
        """One request on its own connection; the reply line."""
        async with await trio.open_tcp_stream("127.0.0.1", self.port) as stream:
            await stream.send_all(line.encode() + b"\n")
            reply = b""
            while not reply.endswith(b"\n"):
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                reply += chunk
        return reply.decode().rstrip("\n")

    def events(self, name: str) -> list[dict[str, Any]]:
        self._log.flush()
        lines = self.log_path.read_text().splitlines()
        return [e for e in map(json.loads, filter(None, lines)) if e.get("event") == name]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture
def sandbox_broker(tmp_path: Path) -> Iterator[Callable[..., SandboxBroker]]:
    """Start sandbox brokers (probe on, a short boot) for one test; stop them afterwards."""
    started: list[SandboxBroker] = []

    def start(**config: Any) -> SandboxBroker:
        workdir = tmp_path / f"broker-{len(started)}"
        workdir.mkdir()
        defaults = {"probe": True, "sandbox_boot_time": 0.5, "describe_interval": 0.1}
        broker = SandboxBroker({**defaults, **config}, workdir)
        started.append(broker)
        return broker

    yield start
    for broker in started:
        broker.stop()


@pytest.mark.slow
async def test_probe_hands_out_a_worker_whose_worker_port_answers(
    sandbox_broker: Callable[..., SandboxBroker],
) -> None:
    """With probe: true the sandbox hands out a worker, which echoes on the configured port."""
    broker = sandbox_broker(worker_port=25607)
    with trio.fail_after(BROKER_DEADLINE):
        ip = await broker.ask("GET_WORKER")
        reply = await echo(ip, 25607, b"job 1\n")

    assert re.fullmatch(r"127\.77\.\d+\.\d+", ip)
    assert reply == b"job 1\n"
    # Info lines reach the log within 0.1 s (written in batches while serving).
    await wait_for(lambda: broker.events("worker.ready"), what="worker.ready in the log")
    [ready] = broker.events("worker.ready")
    assert ready["ip"] == ip


@pytest.mark.slow
async def test_a_released_and_terminated_worker_stops_answering(
    sandbox_broker: Callable[..., SandboxBroker],
) -> None:
    """RELEASE of the last lease terminates the worker: its port closes, with its connections."""
    broker = sandbox_broker()
    with trio.fail_after(BROKER_DEADLINE):
        ip = await broker.ask("GET_WORKER")
        stream = await trio.open_tcp_stream(ip, 2560)
        await stream.send_all(b"before\n")
        echoed = await stream.receive_some(4096)
        released = await broker.ask(f"RELEASE {ip}")
        after = await stream.receive_some(4096)  # EOF once the worker is terminated
        await stream.aclose()

        async def closed() -> bool:
            return await refused(ip, 2560)

        await wait_for(closed, what="the worker's port to close")

    assert echoed == b"before\n"
    assert released == "OK"
    assert after == b""


def readme_python_block(path: Path, after: str) -> str:
    """The first ```python block after the line `after` in a Markdown file."""
    text = path.read_text()
    section = text[text.index(after) :]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match, f"no python block after {after!r} in {path}"
    return match.group(1)


# What a reader supplies around the README examples: their job (here: send a line to the
# worker, print the echo) and its input. A README block that defines them wins.
EXAMPLE_PRELUDE = textwrap.dedent(
    """
    import socket

    def run_my_job(ip, port, chunk=b"hello\\n"):
        with socket.create_connection((ip, port), timeout=10) as job:
            job.sendall(chunk)
            print(job.makefile().readline(), end="")

    chunks = [b"chunk 1\\n", b"chunk 2\\n"]
    """
)


async def run_example(block: str, broker: SandboxBroker) -> str:
    """Run a README example against `broker` (its BrokerClient host and port swapped in)."""
    code, swaps = re.subn(
        r'BrokerClient\("[^"]+", 9000\)', f'BrokerClient("127.0.0.1", {broker.port})', block
    )
    assert swaps == 1, block
    result = await trio.run_process(
        [sys.executable, "-c", EXAMPLE_PRELUDE + code], capture_stdout=True, capture_stderr=True
    )
    return str(result.stdout.decode())


@pytest.mark.slow
async def test_the_readme_python_example_runs_its_job_on_a_sandbox_worker(
    sandbox_broker: Callable[..., SandboxBroker],
) -> None:
    """README.md's Clients example connects to its worker's port 2560 and gets its answer."""
    broker = sandbox_broker()
    block = readme_python_block(ROOT / "README.md", "## Clients")
    with trio.fail_after(BROKER_DEADLINE):
        output = await run_example(block, broker)
        status = json.loads(await broker.ask("STATUS"))

    assert output == "hello\n"
    assert status["leases"] == []


@pytest.mark.slow
async def test_the_python_client_readme_example_runs_against_the_sandbox(
    sandbox_broker: Callable[..., SandboxBroker],
) -> None:
    """clients/python/README.md's first example runs whole: jobs on workers, get/ping/release,
    status and burst."""
    broker = sandbox_broker()
    block = readme_python_block(ROOT / "clients/python/README.md", "# compute-broker-client")
    with trio.fail_after(BROKER_DEADLINE):
        output = await run_example(block, broker)

    assert output == "hello\nchunk 1\nchunk 2\n"
