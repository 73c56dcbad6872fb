"""structlog setup: JSON lines for journald, readable lines on a terminal.

Events are dotted, stable names (`worker.launch`, `lease.ended`, `client.bad_line`) with keys;
see the README's "Logs" section for the list. The standard library's records (botocore,
urllib3, moto) go through the same renderer. When stderr is journald's stream
(`JOURNAL_STREAM`), every line starts with its syslog priority (`<4>` for a warning), which
journald reads as the entry's priority: `journalctl -p warning` then shows what it should.

The JSON path is built for the request line every request writes: one processor adds the
level and timestamp and renders with orjson, and lines go to a `LineSink`. While the server
runs (`service.serve` flushes it every `FLUSH_SECONDS`), info and debug lines are held and
written together; a warning or worse writes at once, with everything held before it, and the
sink is flushed at exit. A kill -9 loses at most the last `FLUSH_SECONDS` of info lines.
"""

from __future__ import annotations

import atexit
import datetime
import json
import logging
import os
import sys
import threading
import time
from collections.abc import MutableMapping
from typing import Any, Final, TextIO

import orjson
import structlog

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
# syslog priorities (sd-daemon(3)) of structlog's level names.
PRIORITIES: Final = {
    "critical": 2,
    "exception": 3,
    "error": 3,
    "warning": 4,
    "warn": 4,
    "info": 6,
    "debug": 7,
}


def journald_stream(stream: TextIO) -> bool:
    """True when `stream` is the one systemd connected to journald (JOURNAL_STREAM names its
    device and inode), so the priority prefixes are read, not shown."""
    expected = os.environ.get("JOURNAL_STREAM")
    if not expected:
        return False
    try:
        status = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return expected == f"{status.st_dev}:{status.st_ino}"


class PriorityPrefix:
    """Wraps a renderer: `<N>` (the event's syslog priority) before each rendered line."""

    def __init__(self, renderer: Any) -> None:
        self.renderer = renderer

    def __call__(self, logger: Any, method: str, event: MutableMapping[str, Any]) -> str | bytes:
        priority = PRIORITIES.get(str(event.get("level", method)).lower(), 6)
        rendered = self.renderer(logger, method, event)
        if isinstance(rendered, bytes):
            return b"<%d>%s" % (priority, rendered)
        return f"<{priority}>{rendered}"


FLUSH_SECONDS: Final = 0.1  # how long an info line may wait in the sink while serving
_HOLD_BYTES: Final = 64 * 1024  # held lines are written once they reach this much
_LEVEL_NAMES: Final = {"warn": "warning", "exception": "error"}  # as structlog names them


class LineSink:
    """Where rendered lines go: written at once, or (between `hold()` and `release()`) held
    and written together by `flush()` (a timer's job), when they reach 64 KiB, or before
    any urgent line. Thread-safe: boto3's threads log too."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._holding = False
        self._lock = threading.Lock()

    def write(self, line: str | bytes, *, urgent: bool = False) -> None:
        """Write one line (without its newline)."""
        data = (line if isinstance(line, bytes) else line.encode()) + b"\n"
        with self._lock:
            if self._holding and not urgent:
                self._pending.append(data)
                self._pending_bytes += len(data)
                if self._pending_bytes < _HOLD_BYTES:
                    return
                data = b""
            self._emit(data)

    def flush(self) -> None:
        """Write what is held."""
        with self._lock:
            self._emit(b"")

    def hold(self) -> None:
        """Hold info lines from now on, until `release()`."""
        self._holding = True

    def release(self) -> None:
        """Write what is held, and every line at once from now on."""
        with self._lock:
            self._holding = False
            self._emit(b"")

    def _emit(self, data: bytes) -> None:
        if self._pending:
            data = b"".join(self._pending) + data
            self._pending.clear()
            self._pending_bytes = 0
        if not data:
            return
        binary = getattr(self._out, "buffer", None)
        if binary is None:
            self._out.write(data.decode())
        else:
            self._out.flush()  # text written to the stream before (a print) goes first
            binary.write(data)
            binary.flush()
        if binary is None:
            self._out.flush()


class SinkLogger:
    """structlog's logger for a `LineSink`: warnings and worse are urgent."""

    def __init__(self, sink: LineSink) -> None:
        self._sink = sink

    def _routine(self, message: str | bytes) -> None:
        self._sink.write(message)

    def _urgent(self, message: str | bytes) -> None:
        self._sink.write(message, urgent=True)

    msg = log = debug = info = _routine
    warning = warn = error = err = exception = critical = fatal = failure = _urgent


class _SinkText:
    """The sink as a text stream, for the standard library's handler (whose records are
    warnings or worse: each written at once)."""

    def __init__(self, sink: LineSink) -> None:
        self._sink = sink

    def write(self, text: str) -> None:
        if text.strip():
            self._sink.write(text.rstrip("\n"), urgent=True)

    def flush(self) -> None:
        pass


class _Timestamps:
    """ISO 8601 UTC timestamps with microseconds, the date and time of day formatted once a
    second (`datetime.isoformat` per line was a measurable share of a request)."""

    def __init__(self) -> None:
        self._cached = (-1, "")  # (second, its date and time): one attribute, so threads agree

    def now(self) -> str:
        now = time.time()
        second = int(now)
        cached_second, prefix = self._cached
        if second != cached_second:
            moment = datetime.datetime.fromtimestamp(second, datetime.UTC)
            prefix = moment.strftime("%Y-%m-%dT%H:%M:%S")
            self._cached = (second, prefix)
        return f"{prefix}.{int((now - second) * 1_000_000):06d}Z"


def _fallback(value: object) -> object:
    return repr(value)


def json_line(timestamps: _Timestamps) -> Any:
    """The JSON renderer: adds `level` and `timestamp`, then one orjson call."""
    now = timestamps.now

    def render(logger: Any, method: str, event: MutableMapping[str, Any]) -> bytes:
        event["level"] = _LEVEL_NAMES.get(method, method)
        event["timestamp"] = now()
        try:
            return orjson.dumps(event, default=_fallback, option=orjson.OPT_NON_STR_KEYS)
        except (TypeError, orjson.JSONEncodeError):  # an int beyond 64 bits, and the like
            return json.dumps(event, default=_fallback).encode()

    return render


_sink: LineSink | None = None


def active_sink() -> LineSink | None:
    """The sink `configure_logging` set up last (None before)."""
    return _sink


def configure_logging(fmt: str = "auto", level: str = "info", stream: TextIO | None = None) -> None:
    """Send broker events to `stream` (stderr): `json`, `console`, or `auto` (TTY: console)."""
    global _sink
    out = stream if stream is not None else sys.stderr
    console = fmt == "console" or (fmt == "auto" and out.isatty())
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=out.isatty()) if console else json_line(_Timestamps())
    )
    journald = journald_stream(out)
    if journald:
        renderer = PriorityPrefix(renderer)
    if _sink is not None:
        _sink.release()
    _sink = LineSink(out)
    atexit.register(_sink.release)
    processors: list[Any] = [structlog.processors.StackInfoRenderer()]
    processors += [structlog.processors.format_exc_info, renderer]
    if console:
        processors[:0] = [structlog.processors.add_log_level, _TIMESTAMPER]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=lambda *args: SinkLogger(_sink_or_fail()),
        cache_logger_on_first_use=True,
    )
    # boto3/botocore, urllib3 and moto log through the standard library: warnings and worse,
    # rendered like the broker's own events (with a `logger` key).
    foreign: Any = structlog.processors.JSONRenderer()
    if journald:
        foreign = PriorityPrefix(foreign)
    handler = logging.StreamHandler(_SinkText(_sink))
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.stdlib.add_log_level,
                structlog.stdlib.add_logger_name,
                _TIMESTAMPER,
            ],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer if console else foreign,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(logging.WARNING)


_TIMESTAMPER: Final = structlog.processors.TimeStamper(fmt="iso", utc=True)


def _sink_or_fail() -> LineSink:
    assert _sink is not None, "configure_logging first"
    return _sink
