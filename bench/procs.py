"""Processes for the benchmarks: servers pinned to a core, the load generator on the other,
the broker as deployed against a moto server held by the calling process.

Placement on this project's 2-core machine (`Placement`): the server under test (bare Trio,
seed-style, or `compute-broker serve`) on CPU 0; the load generator, and the moto server the
deployed broker talks to (idle on the warm path: a client that holds its worker costs no
registry write), on CPU 1. The server then has a core of its own, as on a broker host, and the
generator's work is never charged to it. On a machine with fewer than 2 CPUs nothing is pinned.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Self

import attrs

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
HOST = "127.0.0.1"
START_TIMEOUT = 60.0  # seconds a server may take to print "listening on"
_pool_names = itertools.count(1)


@attrs.frozen
class Placement:
    """Which CPU the server gets and which the load generator (None: not pinned)."""

    server: int | None
    generator: int | None

    @classmethod
    def default(cls, pin: bool = True) -> Placement:
        cpus = sorted(os.sched_getaffinity(0))
        if not pin or len(cpus) < 2:
            return cls(None, None)
        return cls(cpus[0], cpus[1])

    def describe(self) -> str:
        if self.server is None:
            return f"not pinned ({os.cpu_count()} CPUs shared by server and generator)"
        return f"server on CPU {self.server}; load generator and moto on CPU {self.generator}"


def raise_fd_limit() -> int:
    """Raise this process's open-file soft limit to the hard limit (children inherit it)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def pin_self(cpu: int | None) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})


def pinned(cpu: int | None) -> Callable[[], None] | None:
    """A `preexec_fn` that pins the child process to `cpu` (None: no pinning)."""
    if cpu is None:
        return None
    return lambda: os.sched_setaffinity(0, {cpu})


class Server:
    """A server process that prints `listening on HOST:PORT` once it accepts connections."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        cpu: int | None,
        env: dict[str, str] | None = None,
        log_path: str | None = None,
    ) -> None:
        self.log_path = log_path
        stderr = open(log_path, "wb") if log_path else subprocess.DEVNULL  # noqa: SIM115
        try:
            self.proc = subprocess.Popen(
                list(argv),
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                preexec_fn=pinned(cpu),
            )
        finally:
            if log_path:
                stderr.close()  # type: ignore[union-attr]
        assert self.proc.stdout is not None
        deadline = time.monotonic() + START_TIMEOUT
        line = ""
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line or line.startswith("listening on"):
                break
        match = re.match(r"listening on (\S+):(\d+)", line)
        if not match:
            self.proc.kill()
            tail = Path(log_path).read_text()[-2000:] if log_path else ""
            raise RuntimeError(f"{argv[1:3]} did not start: {line!r}\n{tail}")
        self.port = int(match.group(2))
        self.started_at = time.monotonic()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu_seconds(self) -> float:
        """User + system CPU time the process has used so far."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(fields[11]) + int(fields[12])  # utime, stime
        return ticks / os.sysconf("SC_CLK_TCK")

    def rss_kib(self, field: str = "VmRSS") -> int:
        """Resident memory (KiB): all of it (VmRSS), or its anonymous part (RssAnon: the
        heap, which the kernel cannot page out without swap; file pages, the interpreter's
        and the libraries' code, can be, and are on a machine that reclaims cold pages)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
        raise RuntimeError(f"no {field}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def floor_server(kind: str, placement: Placement) -> Server:
    """The bare Trio server (`trio`) or the seed-style threaded one (`seed`)."""
    return Server([sys.executable, str(BENCH / "floor.py"), kind], cpu=placement.server)


def loadgen(
    port: int,
    mode: str,
    *,
    placement: Placement,
    clients: int = 50,
    requests: int = 1000,
    warmup: int = 0,
    line: str = "GET_WORKER",
    timeout: float = 600.0,
) -> dict[str, Any]:
    """Run the load generator in its own process; its JSON result."""
    argv = [
        sys.executable,
        str(BENCH / "loadgen.py"),
        f"--port={port}",
        f"--mode={mode}",
        f"--clients={clients}",
        f"--requests={requests}",
        f"--warmup={warmup}",
        f"--line={line}",
    ]
    if placement.generator is not None:
        argv.append(f"--cpu={placement.generator}")
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"loadgen {mode} failed: {done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def measured_load(server: Server, port: int, mode: str, **kwargs: Any) -> dict[str, Any]:
    """`loadgen`, plus the server's CPU seconds during the whole run (`server_cpu_seconds`)
    and the requests it served meanwhile, warm-up included (`served`)."""
    before = server.cpu_seconds()
    result = loadgen(port, mode, **kwargs)
    result["server_cpu_seconds"] = round(server.cpu_seconds() - before, 3)
    result["served"] = result["requests"] + kwargs.get("clients", 50) * kwargs.get("warmup", 0)
    return result


# --- the broker as deployed -----------------------------------------------------------------


class Moto:
    """A moto server in this process (so the broker's memory is its own), set up as the
    sandbox sets up its embedded one, that also records what the cold benchmark needs:
    when each instance became `running` (monotonic) and when DescribeInstances was called."""

    def __init__(self, boot_delay: float = 2.0) -> None:
        from broker import sandbox
        from broker.aws import make_client
        from broker.dynamo_table import ensure_table

        self.handle = sandbox.start_moto()
        for name in [name for name in os.environ if name.startswith("AWS_")]:
            del os.environ[name]
        os.environ.update(sandbox.sandbox_environment(self.handle.endpoint_url))
        os.environ["AWS_CONFIG_FILE"] = os.environ["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull
        sandbox.install_unique_ips()
        sandbox.install_boot_delay(boot_delay)
        self.instances: list[Any] = []  # moto Instance objects, in creation order
        self.describe_calls: list[float] = []  # monotonic times of DescribeInstances
        self._record()
        self.resources = sandbox.prepare_resources()
        self.table = "compute-broker"
        ensure_table(make_client("dynamodb", region="us-east-1"), self.table)

    def _record(self) -> None:
        from moto.ec2.models.instances import Instance
        from moto.ec2.responses.instances import InstanceResponse

        instances, calls = self.instances, self.describe_calls
        booting_init = Instance.__init__
        describe = InstanceResponse.describe_instances

        def recording_init(instance: Any, *args: Any, **kwargs: Any) -> None:
            booting_init(instance, *args, **kwargs)
            instances.append(instance)

        def counting_describe(response: Any) -> Any:
            calls.append(time.monotonic())
            return describe(response)

        Instance.__init__ = recording_init  # type: ignore[method-assign,assignment]
        InstanceResponse.describe_instances = counting_describe  # type: ignore[method-assign,assignment]

    def set_boot_delay(self, seconds: float) -> None:
        from broker import sandbox

        sandbox.install_boot_delay(seconds)

    def running_at(self, ip: str) -> float | None:
        """When the instance with this public IP became `running` (time.monotonic)."""
        for instance in reversed(self.instances):
            if instance.public_ip == ip:
                ready_at: float = instance._state._ready_at
                return ready_at
        return None

    def stop(self) -> None:
        self.handle.stop()


def write_config(settings: dict[str, Any]) -> str:
    """A YAML config file with these settings (JSON scalars and lists are YAML); its path."""
    fd, path = tempfile.mkstemp(prefix="bench-broker-", suffix=".yaml")
    with os.fdopen(fd, "w") as config_file:
        for key, value in settings.items():
            config_file.write(f"{key}: {json.dumps(value)}\n")
    return path


# What every benchmarked broker runs with (besides the shipped defaults): JSON logs (what
# journald gets), room for 50 clients and more, no idle disconnects during a run.
BENCH_SETTINGS: dict[str, Any] = {
    "log_level": "info",
    "log_format": "json",
    "max_connections": 4096,
    "client_timeout": 120,
}


def deployed_settings(moto: Moto, registry: str) -> dict[str, Any]:
    """Settings for `compute-broker serve --config` against `moto`: a fresh pool name each
    time, so no broker adopts another's workers."""
    res = moto.resources
    return {
        "pool_name": f"bench{os.getpid()}x{next(_pool_names)}",
        "registry": registry,
        "registry_table": moto.table,
        "ami_id": res.ami_id,
        "security_group_ids": [res.security_group_id],
        "subnet_id": res.subnet_id,
        "key_name": res.key_name,
        "region": "us-east-1",
    }


class Broker(Server):
    """`compute-broker serve --config` (the broker as deployed; `sandbox=True`: `serve
    --sandbox`, moto embedded), BENCH_SETTINGS and `settings` in its config, its log (stderr)
    in a file. `command` runs it (after the interpreter): `-m broker` unless profiling."""

    def __init__(
        self,
        moto: Moto | None,
        placement: Placement,
        *,
        registry: str = "memory",
        settings: dict[str, Any] | None = None,
        sandbox: bool = False,
        command: Sequence[str] = ("-m", "broker"),
    ) -> None:
        config = dict(BENCH_SETTINGS)
        if sandbox:
            argv = ["serve", "--sandbox"]
            env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        else:
            assert moto is not None
            config.update(deployed_settings(moto, registry))
            argv = ["serve"]
            env = dict(os.environ)
        config.update(settings or {})
        self.config_path = write_config(config)
        fd, log_path = tempfile.mkstemp(prefix="bench-broker-", suffix=".log")
        os.close(fd)
        argv += ["--config", self.config_path, "--host", HOST, "--port", "0"]
        try:
            super().__init__(
                [sys.executable, *command, *argv],
                cpu=placement.server,
                env=env,
                log_path=log_path,
            )
        except BaseException:
            os.unlink(self.config_path)
            os.unlink(log_path)
            raise

    def log_lines(self, event: str, *, at_least: int = 0, timeout: float = 2.0) -> int:
        """How many lines of its log are the event `event` (JSON lines). With `at_least`: waits
        up to `timeout` seconds for that many (the broker writes info lines every 0.1 s)."""
        assert self.log_path is not None
        needles = (f'"event":"{event}"', f'"event": "{event}"')  # orjson's, json's
        deadline = time.monotonic() + timeout
        while True:
            with open(self.log_path, encoding="utf-8", errors="replace") as log:
                count = sum(1 for line in log if any(needle in line for needle in needles))
            if count >= at_least or time.monotonic() >= deadline:
                return count
            time.sleep(0.05)

    def stop(self) -> None:
        super().stop()
        for path in (self.config_path, self.log_path):
            if path and os.path.exists(path):
                os.unlink(path)


def request(port: int, line: str, timeout: float = 120.0) -> str:
    """One request on a new connection (blocking); the reply line."""
    import socket

    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.sendall(line.encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return data.decode().rstrip("\n")
