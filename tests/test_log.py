"""Log lines as journald and a person see them: one JSON object per line, the syslog priority
first when stderr is journald's stream, and the standard library's records (botocore) through
the same renderer."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import pytest
import structlog

from broker.log import configure_logging


@pytest.fixture
def log_file(tmp_path: Path) -> Iterator[TextIO]:
    """A file to log to; structlog and the root logger are put back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    with (tmp_path / "log").open("w+") as stream:
        yield stream
    structlog.reset_defaults()
    root.handlers, root.level = handlers, level


def lines(stream: TextIO) -> list[str]:
    stream.flush()
    stream.seek(0)
    return stream.read().splitlines()


def journald_for(stream: TextIO, monkeypatch: pytest.MonkeyPatch) -> None:
    status = os.fstat(stream.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{status.st_dev}:{status.st_ino}")


def test_lines_to_journald_carry_their_priority(
    log_file: TextIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Connected to journald: `<3>` error, `<4>` warning, `<6>` info, then the JSON object."""
    journald_for(log_file, monkeypatch)
    configure_logging("json", "info", stream=log_file)
    log = structlog.get_logger("broker.test")
    log.error("registry.write_failed", op="put_worker")
    log.warning("launch.refused", reason="budget")
    log.info("worker.ready", ip="127.77.0.1")
    prefixes = [line[:3] for line in lines(log_file)]
    assert prefixes == ["<3>", "<4>", "<6>"]
    events = [json.loads(line[3:])["event"] for line in lines(log_file)]
    assert events == ["registry.write_failed", "launch.refused", "worker.ready"]


def test_botocore_records_are_rendered_like_the_brokers_own(
    log_file: TextIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A warning from botocore's standard-library logger: one JSON line with its level,
    logger name and priority; its info records are left out."""
    journald_for(log_file, monkeypatch)
    configure_logging("json", "info", stream=log_file)
    logging.getLogger("botocore.credentials").info("Found credentials in environment")
    logging.getLogger("botocore.retryhandler").warning("Retry needed, retrying request")
    (line,) = lines(log_file)
    assert line.startswith("<4>")
    record = json.loads(line[3:])
    assert record["event"] == "Retry needed, retrying request"
    assert record["level"] == "warning"
    assert record["logger"] == "botocore.retryhandler"
    assert "timestamp" in record


def test_no_prefix_off_journald(log_file: TextIO, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not journald's stream (a file, a pipe, a terminal): plain JSON lines."""
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    configure_logging("json", "info", stream=log_file)
    structlog.get_logger("broker.test").warning("launch.refused")
    (line,) = lines(log_file)
    assert json.loads(line)["event"] == "launch.refused"
