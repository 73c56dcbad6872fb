"""structlog setup: JSON lines for journald, readable lines on a terminal.

Events are dotted, stable names (`worker.launch`, `lease.ended`, `client.bad_line`) with keys;
see the README's "Logs" section for the list. The standard library's records (botocore,
urllib3, moto) go through the same renderer. When stderr is journald's stream
(`JOURNAL_STREAM`), every line starts with its syslog priority (`<4>` for a warning), which
journald reads as the entry's priority: `journalctl -p warning` then shows what it should.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import MutableMapping
from typing import Any, Final, TextIO

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

    def __call__(self, logger: Any, method: str, event: MutableMapping[str, Any]) -> str:
        priority = PRIORITIES.get(str(event.get("level", method)).lower(), 6)
        return f"<{priority}>{self.renderer(logger, method, event)}"


def configure_logging(fmt: str = "auto", level: str = "info", stream: TextIO | None = None) -> None:
    """Send broker events to `stream` (stderr): `json`, `console`, or `auto` (TTY: console)."""
    out = stream if stream is not None else sys.stderr
    console = fmt == "console" or (fmt == "auto" and out.isatty())
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=out.isatty())
        if console
        else structlog.processors.JSONRenderer()
    )
    if journald_stream(out):
        renderer = PriorityPrefix(renderer)
    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            timestamper,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.WriteLoggerFactory(file=out),
        cache_logger_on_first_use=True,
    )
    # boto3/botocore, urllib3 and moto log through the standard library: warnings and worse,
    # rendered like the broker's own events (with a `logger` key).
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.stdlib.add_log_level,
                structlog.stdlib.add_logger_name,
                timestamper,
            ],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(logging.WARNING)
