"""`compute-broker setup`: the registry table and, when asked, the EC2 events queue, created
once (a second run changes nothing), against the session's moto server."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from broker.aws import make_client
from broker.cli import main
from broker.sandbox import MotoHandle
from tests.aws_support import full_client


def test_setup_creates_the_table_and_the_events_queue_once(
    moto_server: MotoHandle, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """First run: table created, queue created and its URL printed; second run: both exist."""
    table = f"setup-{uuid.uuid4().hex[:8]}"
    queue = f"events-{uuid.uuid4().hex[:8]}"
    config = tmp_path / "broker.yaml"
    config.write_text(f"registry: dynamodb\nregistry_table: {table}\n")

    assert main(["setup", "--config", str(config), "--events-queue", queue]) == 0
    first = capsys.readouterr().out
    assert main(["setup", "--config", str(config), "--events-queue", queue]) == 0
    second = capsys.readouterr().out

    url = make_client("sqs", region=None).get_queue_url(QueueName=queue)["QueueUrl"]
    assert f"table {table}: created" in first
    assert f"table {table}: exists" in second
    assert f"events queue {queue}: {url}" in first
    assert f"events queue {queue}: {url}" in second
    assert f"set events_queue_url: {url}" in first
    tables = full_client("dynamodb", region=None).list_tables()["TableNames"]
    assert table in tables
