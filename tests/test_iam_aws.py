"""The broker needs no AWS action the generated policy lacks: a `compute-broker serve` process
runs end to end under moto's IAM enforcement, as an IAM user holding `broker.iam.policy`.

moto checks every signed request against the caller's IAM policies once enforcement is on
(`INITIAL_NO_AUTH_ACTION_COUNT`, a process-wide setting: this module runs moto in a process of
its own, creates the resources and users unauthenticated, then switches enforcement on through
moto's `/moto-api/reset-auth`). moto evaluates actions, and resources only for SQS (queue ARNs):
it asks EC2 and DynamoDB statements for `*`. It supplies no condition keys, and a statement
whose condition cannot be checked denies. So the user holds the policy's *moto view*: the same
statements without their conditions, EC2 and DynamoDB resources widened to `*`, and the API
names moto authorises where AWS authorises another action (`DeleteMessageBatch` for
DeleteMessage, `TransactWriteItems` for its parts). The conditions are tested as data in
tests/test_iam.py.

The run: start (the preflight: DescribeTable, a DryRun launch, both queues), GET_WORKER (a
launch, the registry's writes), PING, STATUS, an event received and deleted from the events
queue, the burst queue's depth read, RELEASE (a termination). The negative controls remove one
action from the policy: the same run then fails where that action is needed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs
import boto3
import botocore.exceptions
import pytest
import yaml

from broker.aws import make_client
from broker.config_validate import Config
from broker.dynamo_table import ensure_table
from broker.iam import IAM_ACTIONS, actions, policy
from broker.sandbox import SANDBOX_REGION, SandboxResources, prepare_resources
from broker.sqs import ensure_events_queue
from tests.aws_support import full_client
from tests.harness import listening_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
MOTO_ACCOUNT = "123456789012"  # moto's default account
TABLE = "compute-broker-iam"
START_TIMEOUT = 30.0
STEP_TIMEOUT = 15.0
# moto's process: the sandbox's moto (launches honour MaxCount, distinct loopback IPs, spot
# prices from the table), its URL on stdout, stopped when stdin closes.
MOTO_SCRIPT = """
import sys
from broker import sandbox
handle = sandbox.start_moto()
sandbox.install_unique_ips()
sandbox.install_boot_delay(0)
print(handle.endpoint_url, flush=True)
sys.stdin.read()
handle.stop()
"""
DENIED = re.compile(r"not authorized to perform: ([a-z0-9-]+:[A-Za-z]+)")


@attrs.frozen
class EnforcingCloud:
    """moto in its own process with IAM enforcement on, and what the broker needs in it."""

    endpoint_url: str
    resources: SandboxResources
    jobs_url: str
    admin: Mapping[str, str]  # credentials of a user allowed everything

    def client(self, service: str) -> Any:
        return full_client(service, region=SANDBOX_REGION)

    def events_queue(self) -> str:
        """A new events queue. One per run: a stopped broker's long poll stays open in moto
        for up to 20 s and would take the next run's message."""
        return ensure_events_queue(self.client("sqs"), f"ec2-events-{uuid.uuid4().hex[:8]}")

    def user_holding(self, document: Mapping[str, Any]) -> dict[str, str]:
        """The credentials of a new IAM user whose only policy is `document`."""
        iam = self.client("iam")
        name = f"broker-{uuid.uuid4().hex[:8]}"
        iam.create_user(UserName=name)
        iam.put_user_policy(
            UserName=name, PolicyName="compute-broker", PolicyDocument=json.dumps(document)
        )
        key = iam.create_access_key(UserName=name)["AccessKey"]
        return {
            "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
            "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
        }


def moto_view(document: Mapping[str, Any]) -> dict[str, Any]:
    """What moto can enforce of `document`: no conditions, `*` for EC2 and DynamoDB resources
    (moto asks for `*`), and each API name whose IAM actions a statement holds."""
    statements = []
    for statement in document["Statement"]:
        granted = list(statement["Action"])
        for operation, needs in IAM_ACTIONS.items():
            if needs and operation not in granted and set(needs) <= set(granted):
                granted.append(operation)
        sqs_only = all(action.startswith("sqs:") for action in granted)
        statements.append(
            {
                "Sid": statement["Sid"],
                "Effect": statement["Effect"],
                "Action": granted,
                "Resource": statement["Resource"] if sqs_only else "*",
            }
        )
    return {"Version": document["Version"], "Statement": statements}


def without(document: Mapping[str, Any], action: str) -> dict[str, Any]:
    """`document` with `action` taken out of every statement (statements left empty go)."""
    assert action in actions(document)
    statements = []
    for statement in document["Statement"]:
        kept = [a for a in statement["Action"] if a != action]
        if kept:
            statements.append({**statement, "Action": kept})
    return {**document, "Statement": statements}


def _first_line(process: subprocess.Popen[str], timeout: float) -> str:
    """The first line `process` prints, or "" if none comes within `timeout` seconds."""
    lines: list[str] = []

    def read() -> None:
        assert process.stdout is not None
        lines.append(process.stdout.readline().strip())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    return lines[0] if lines else ""


def _enforce(endpoint_url: str) -> None:
    """From now on moto authorises every request (its own test API; 0 requests unchecked)."""
    request = urllib.request.Request(
        f"{endpoint_url}/moto-api/reset-auth",
        data=b"0",
        method="POST",
        headers={"Content-Type": "text/plain"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert json.load(response)["status"] == "ok"


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EnforcingCloud]:
    """moto in a subprocess; resources and an admin user made unauthenticated; then enforced."""
    clean = {name: value for name, value in os.environ.items() if not name.startswith("AWS_")}
    moto = subprocess.Popen(
        [sys.executable, "-c", MOTO_SCRIPT],
        cwd=ROOT, env=clean, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        endpoint_url = _first_line(moto, START_TIMEOUT)
        assert endpoint_url.startswith("http://127.0.0.1:"), endpoint_url
        absent = str(tmp_path_factory.mktemp("aws") / "absent")
        with pytest.MonkeyPatch.context() as monkeypatch:
            for name in [name for name in os.environ if name.startswith("AWS_")]:
                monkeypatch.delenv(name)
            for name, value in {
                "AWS_ENDPOINT_URL": endpoint_url,
                "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": SANDBOX_REGION,
                "AWS_EC2_METADATA_DISABLED": "true",
                "AWS_CONFIG_FILE": absent,
                "AWS_SHARED_CREDENTIALS_FILE": absent,
            }.items():
                monkeypatch.setenv(name, value)
            resources = prepare_resources(SANDBOX_REGION)
            ensure_table(make_client("dynamodb", region=SANDBOX_REGION), TABLE)
            sqs = full_client("sqs", region=SANDBOX_REGION)
            jobs_url = sqs.create_queue(QueueName="jobs")["QueueUrl"]
            iam = full_client("iam", region=SANDBOX_REGION)
            iam.create_user(UserName="admin")
            everything = {"Effect": "Allow", "Action": "*", "Resource": "*"}
            iam.put_user_policy(
                UserName="admin",
                PolicyName="admin",
                PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [everything]}),
            )
            key = iam.create_access_key(UserName="admin")["AccessKey"]
            admin = {
                "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
                "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
            }
            _enforce(endpoint_url)
            for name, value in admin.items():
                monkeypatch.setenv(name, value)
            yield EnforcingCloud(endpoint_url, resources, jobs_url, admin)
    finally:
        if moto.stdin is not None:
            moto.stdin.close()
        try:
            moto.wait(10)
        finally:
            if moto.poll() is None:
                moto.kill()


def test_moto_enforces_the_policy(cloud: EnforcingCloud) -> None:
    """The switch is on: a user is refused what its policy does not allow; the admin is not."""
    allowed = {"Effect": "Allow", "Action": "sqs:ListQueues", "Resource": "*"}
    keys = cloud.user_holding({"Version": "2012-10-17", "Statement": [allowed]})
    session = boto3.session.Session(
        aws_access_key_id=keys["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=keys["AWS_SECRET_ACCESS_KEY"],
        region_name=SANDBOX_REGION,
    )
    user = session.client("ec2", endpoint_url=cloud.endpoint_url)
    with pytest.raises(botocore.exceptions.ClientError, match="ec2:DescribeInstances"):
        user.describe_instances()
    cloud.client("ec2").describe_instances()
    session.client("sqs", endpoint_url=cloud.endpoint_url).list_queues()


# --- the run ------------------------------------------------------------------------------


class Broker:
    """A `compute-broker serve` subprocess with the given AWS credentials; logs to a file."""

    def __init__(self, config: Mapping[str, Any], credentials: Mapping[str, str], workdir: Path):
        path = workdir / f"config-{uuid.uuid4().hex[:8]}.yaml"
        path.write_text(yaml.safe_dump(dict(config)))
        self.log_path = workdir / f"broker-{uuid.uuid4().hex[:8]}.log"
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "broker", "serve", "--config", str(path),
             "--host", "127.0.0.1", "--port", "0"],
            cwd=ROOT, env={**os.environ, **credentials},
            stdout=subprocess.PIPE, stderr=self._log, text=True,
        )  # fmt: skip
        self.port = listening_port(self.proc, START_TIMEOUT)

    def ask(self, line: str) -> str:
        assert self.port is not None
        with socket.create_connection(("127.0.0.1", self.port), timeout=STEP_TIMEOUT) as sock:
            sock.sendall(line.encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
        return data.decode().rstrip("\n")

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()

    def events(self) -> list[str]:
        return [json.loads(line)["event"] for line in self.log().splitlines() if line[:1] == "{"]

    def denials(self) -> set[str]:
        """The actions AWS (moto) refused the broker, from its log and stderr."""
        return set(DENIED.findall(self.log()))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(STEP_TIMEOUT)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self._log.close()


@attrs.define
class Run:
    """How far the run got: the steps done, and the step that failed (with why)."""

    done: list[str] = attrs.Factory(list)
    failed: str | None = None
    why: str = ""
    denials: set[str] = attrs.Factory(set)
    log_tail: str = ""


def _wait(broker: Broker, condition: Callable[[], bool]) -> bool:
    """True once `condition` holds; False if the broker was refused something first or the
    step's deadline passed."""
    deadline = time.monotonic() + STEP_TIMEOUT
    while time.monotonic() < deadline:
        if condition():
            return True
        if broker.denials() or broker.proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


def _config(cloud: EnforcingCloud) -> dict[str, Any]:
    resources = cloud.resources
    return {
        "pool_name": f"iam-{uuid.uuid4().hex[:8]}",
        "region": SANDBOX_REGION,
        "ami_id": resources.ami_id,
        "security_group_ids": [resources.security_group_id],
        "key_name": resources.key_name,
        "subnet_id": resources.subnet_id,
        "registry": "dynamodb",
        "registry_table": TABLE,
        "spot_price_history": True,
        "events_queue_url": cloud.events_queue(),
        "burst_policy": {"mode": "auto", "queue_url": cloud.jobs_url, "check_interval": "1s"},
        "describe_interval": 0.1,
        "log_format": "json",
    }


def run_broker(cloud: EnforcingCloud, document: Mapping[str, Any], workdir: Path,
               config: Mapping[str, Any]) -> Run:  # fmt: skip
    """The run, as a user holding `document`'s moto view; stops at the first failed step."""
    run = Run()
    broker = Broker(config, cloud.user_holding(moto_view(document)), workdir)
    pool, events_url = config["pool_name"], config["events_queue_url"]

    def step(name: str, ok: bool, why: str = "") -> bool:
        if ok:
            run.done.append(name)
        else:
            run.failed, run.why = name, why
        return ok

    try:
        if not step("start", broker.port is not None, broker.log()[-2000:]):
            return run
        ip = broker.ask("GET_WORKER")
        if not step("get_worker", re.fullmatch(r"127\.77\.\d+\.\d+", ip) is not None, ip):
            return run
        registry = cloud.client("dynamodb").query(
            TableName=TABLE,
            KeyConditionExpression="pk = :pk",
            ExpressionAttributeValues={":pk": {"S": f"pool#{pool}"}},
        )["Items"]
        if not step("registry", any(i["sk"]["S"].startswith("worker#") for i in registry)):
            return run
        if not step("ping", broker.ask(f"PING {ip}") == "OK"):
            return run
        status = broker.ask("STATUS")
        if not step("status", status.startswith("{") and ip in status, status[:300]):
            return run
        sqs = cloud.client("sqs")
        sqs.send_message(QueueUrl=events_url, MessageBody='{"source": "not-ec2"}')

        def events_queue_empty() -> bool:
            names = ["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
            found = sqs.get_queue_attributes(QueueUrl=events_url, AttributeNames=names)
            return "events.ignored" in broker.events() and not any(
                int(value) for value in found["Attributes"].values()
            )

        if not step("events", _wait(broker, events_queue_empty)):
            return run
        burst_checks = broker.events().count("burst.depth_failed")
        if not step("burst", burst_checks == 0 and "prices.spot_refreshed" in broker.events()):
            return run
        released = broker.ask(f"RELEASE {ip}")
        if not step("release", released == "OK", released):
            return run
        ec2 = cloud.client("ec2")
        reservations = ec2.describe_instances(
            Filters=[{"Name": "tag:compute-broker:pool", "Values": [pool]}]
        )["Reservations"]
        states = {i["State"]["Name"] for r in reservations for i in r["Instances"]}
        step("terminated", states <= {"shutting-down", "terminated"} and bool(states), str(states))
    finally:
        stopped = broker.stop()
        run.denials = broker.denials()
        run.log_tail = broker.log()[-3000:]
        if run.failed is None and stopped != 0:
            run.failed, run.why = "stop", f"exit status {stopped}"
    return run


def test_the_broker_needs_no_action_the_policy_lacks(cloud: EnforcingCloud, tmp_path: Path) -> None:
    """Start, GET_WORKER, PING, STATUS, an event, the burst queue, RELEASE: every step works
    and AWS refuses the broker nothing."""
    config = _config(cloud)
    document = policy(Config.from_dict(config), account=MOTO_ACCOUNT)
    run = run_broker(cloud, document, tmp_path, config)
    assert run.failed is None, f"{run.failed}: {run.why}"
    assert set() == run.denials
    assert run.done == [
        "start", "get_worker", "registry", "ping", "status", "events", "burst", "release",
        "terminated",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("action", "step"),
    [
        ("ec2:TerminateInstances", "release"),
        ("sqs:DeleteMessage", "events"),
        ("dynamodb:UpdateItem", "get_worker"),
    ],
)
def test_the_same_run_without_one_action_fails_there(
    cloud: EnforcingCloud, tmp_path: Path, action: str, step: str
) -> None:
    """Negative control: take one action out of the policy and the run fails at the step
    that needs it, refused that very action (moto's name for it)."""
    config = _config(cloud)
    document = without(policy(Config.from_dict(config), account=MOTO_ACCOUNT), action)
    run = run_broker(cloud, document, tmp_path, config)
    assert step == run.failed, f"{run.failed}: {run.why}\n{run.log_tail}"
    moto_names = {action} | {op for op, needs in IAM_ACTIONS.items() if action in needs}
    assert run.denials, run.log_tail
    assert run.denials <= moto_names
