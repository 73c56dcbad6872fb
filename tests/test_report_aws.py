"""`compute-broker report` end to end: a broker on moto EC2 and a DynamoDB registry serves
GET_WORKER and RELEASE over TCP; the report command then reads the lease history and the ledger
from the table. (tests/test_report.py has the pure table and the MockClock agreement.)"""

from __future__ import annotations

import csv
import datetime as dt
import io
import uuid
from pathlib import Path

import pytest
import trio
import yaml

from broker.aws import make_client
from broker.cli import main
from broker.clock import Clock
from broker.dynamo import DynamoRegistry
from broker.dynamo_table import ensure_table
from broker.ec2 import Ec2Cloud
from broker.prices import PriceTable
from broker.registry import LeaseHistoryRecord
from broker.report import LEDGER, NOT_LEASED
from broker.sandbox import MotoHandle, SandboxResources, prepare_resources
from tests.engines import make_engine
from tests.harness import ask_once, running_broker, wait_for

TABLE = "compute-broker-report-aws"
PRICE = 36.0  # $/hour: a cent a second, so a second nobody leased shows in the figures
DEADLINE = 60

pytestmark = pytest.mark.usefixtures("instant_retries")


@pytest.fixture(scope="module")
def resources(moto_server: MotoHandle) -> SandboxResources:
    ensure_table(make_client("dynamodb", region="us-east-1"), TABLE)
    return prepare_resources()


def test_report_reads_what_two_leases_cost_from_dynamodb(
    resources: SandboxResources,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two clients each GET_WORKER (one worker each), hold it about a second and RELEASE it
    (the worker is terminated). `compute-broker report` then finds both leases with their
    cost, and the ledger's spend beside them: at least the leases' dollars, and no more than
    the price of the time the workers ran unleased (launch, boot, termination)."""
    pool = f"report-{uuid.uuid4().hex[:10]}"
    # The CLI's logging setup would bind every cached logger of the test session to this
    # test's captured (then closed) stream.
    monkeypatch.setattr("broker.cli.configure_logging", lambda fmt, level: None)

    async def serve() -> tuple[list[LeaseHistoryRecord], float]:
        cloud = Ec2Cloud(resources.ec2_settings(pool), trio.CapacityLimiter(4))
        registry = DynamoRegistry(TABLE, pool, trio.CapacityLimiter(4), region="us-east-1")
        engine = make_engine(
            cloud,
            Clock(),
            registry,
            prices=PriceTable({("c7i.8xlarge", "spot"): PRICE}),
            clients_per_worker=1,
            describe_interval=0.1,
        )
        started = trio.current_time()
        with trio.fail_after(DEADLINE):
            async with running_broker(engine) as broker:
                for client in ("alice", "bob"):
                    ip = await ask_once(broker.port, f"GET_WORKER client={client}")
                    await trio.sleep(1.0)  # the client works
                    assert await ask_once(broker.port, f"RELEASE {ip} client={client}") == "OK"

                async def both_kept() -> list[LeaseHistoryRecord]:
                    records = await registry.lease_history(0.0)
                    return records if len(records) == 2 else []

                records = await wait_for(both_kept)
        return records, trio.current_time() - started

    records, elapsed = trio.run(serve)
    config = tmp_path / "report.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "pool_name": pool,
                "registry": "dynamodb",
                "registry_table": TABLE,
                "region": "us-east-1",
            }
        )
    )
    today = dt.datetime.now(dt.UTC).date()
    since, until = today - dt.timedelta(days=1), today + dt.timedelta(days=1)
    capsys.readouterr()
    command = ["report", "--since", str(since), "--until", str(until), "--config", str(config)]
    assert main([*command, "--format", "csv"]) == 0
    rows = {row[0]: row for row in csv.reader(io.StringIO(capsys.readouterr().out))}

    assert sorted(r.client.partition("/")[2] for r in records) == ["alice", "bob"]
    assert {row[0] for row in rows.values()} >= {"127.0.0.1/alice", "127.0.0.1/bob"}
    leases, hours, dollars = int(rows["total"][1]), float(rows["total"][2]), float(rows["total"][3])
    assert leases == 2
    assert dollars == pytest.approx(sum(r.cost or 0.0 for r in records), abs=1e-6)
    assert dollars == pytest.approx(PRICE * hours, abs=PRICE * 1e-6)  # hours to 6 places
    ledger = float(rows[LEDGER][3])
    unleased = elapsed / 3600.0 - hours  # an upper bound: the workers ran within `elapsed`
    assert dollars - 1e-6 <= ledger <= dollars + PRICE * unleased
    assert float(rows[NOT_LEASED][3]) == pytest.approx(ledger - dollars, abs=1e-6)

    assert main(command) == 0  # the table says the same
    table = capsys.readouterr().out
    assert f"{ledger:.4f}" in table.splitlines()[-1]
