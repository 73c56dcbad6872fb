"""Log lines as journald and a person see them: one JSON object per line, the syslog priority
first when stderr is journald's stream, and the standard library's records (botocore) through
the same renderer."""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import pytest
import structlog

from broker.log import LineSink, active_sink, configure_logging


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


def test_json_lines_carry_level_timestamp_and_any_value(log_file: TextIO) -> None:
    """One JSON object per line: the event, its keys, `level`, an ISO 8601 UTC `timestamp`;
    a value JSON cannot hold is written as its repr, not dropped or raised."""
    configure_logging("json", "info", stream=log_file)
    log = structlog.get_logger("broker.test").bind(conn=7)
    log.info("request", command="GET_WORKER", ms=0.25, odd={1, 2}, huge=2**70)
    log.warning("client.bad_line", reason="binary")
    first, second = (json.loads(line) for line in lines(log_file))
    assert first["event"] == "request" and first["conn"] == 7 and first["ms"] == 0.25
    assert first["odd"] == "{1, 2}" and first["huge"] == 2**70
    assert first["level"] == "info" and second["level"] == "warning"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", first["timestamp"])
    assert first["timestamp"] <= second["timestamp"]


def test_exceptions_keep_their_traceback(log_file: TextIO) -> None:
    configure_logging("json", "info", stream=log_file)
    try:
        raise ValueError("boom")
    except ValueError:
        structlog.get_logger("broker.test").exception("connection.crashed")
    (line,) = lines(log_file)
    record = json.loads(line)
    assert record["level"] == "error"
    assert "ValueError: boom" in record["exception"]


def test_held_info_lines_wait_for_a_flush_and_a_warning_writes_them_first(
    log_file: TextIO,
) -> None:
    """While serving (`hold`), info lines wait for the timer's flush; a warning goes out at
    once with every line before it, in order; `release` writes the rest."""
    configure_logging("json", "info", stream=log_file)
    sink = active_sink()
    assert sink is not None
    log = structlog.get_logger("broker.test")
    sink.hold()
    log.info("one")
    log.info("two")
    assert lines(log_file) == []
    log.warning("three")
    log.info("four")
    assert [json.loads(line)["event"] for line in lines(log_file)] == ["one", "two", "three"]
    sink.flush()
    assert json.loads(lines(log_file)[-1])["event"] == "four"
    log.info("five")
    sink.release()
    log.info("six")  # released: written at once
    assert [json.loads(line)["event"] for line in lines(log_file)][-2:] == ["five", "six"]


def holding(log_file: TextIO) -> LineSink:
    """Logging configured to `log_file`, its sink holding info lines (as while serving)."""
    configure_logging("json", "info", stream=log_file)
    sink = active_sink()
    assert sink is not None
    sink.hold()
    return sink


def test_held_lines_are_written_when_they_reach_the_bound(log_file: TextIO) -> None:
    sink = holding(log_file)
    log = structlog.get_logger("broker.test")
    for n in range(2000):  # ~100 bytes each: past the 64 KiB bound
        log.info("request", n=n)
    written = lines(log_file)
    assert 0 < len(written) < 2000
    assert [json.loads(line)["n"] for line in written] == list(range(len(written)))
    sink.release()


def test_lines_from_threads_are_neither_lost_nor_torn(log_file: TextIO) -> None:
    """boto3's calls run in threads and log there: every line arrives whole."""
    sink = holding(log_file)
    log = structlog.get_logger("broker.test")

    def burst(thread: int) -> None:
        for n in range(500):
            log.info("request", thread=thread, n=n)

    workers = [threading.Thread(target=burst, args=(t,)) for t in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    sink.release()
    records = [json.loads(line) for line in lines(log_file)]
    assert sorted((r["thread"], r["n"]) for r in records) == [
        (t, n) for t in range(4) for n in range(500)
    ]
