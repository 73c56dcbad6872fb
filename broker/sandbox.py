"""The sandbox cloud: an embedded moto server on loopback, so the broker runs with no AWS account.

The broker talks to it through its production boto3 path (`AWS_ENDPOINT_URL`, fake
credentials). A few in-process patches make moto behave more like EC2 where the broker
depends on it: launches honour MaxCount and ClientToken, instances take a configurable time
to boot, every worker gets a distinct loopback address and, once booted, answers on its
`worker_port` until it is terminated (broker/sandbox_workers.py), and spot prices are the
price table's.

moto is an optional extra: `pip install 'compute-broker[sandbox]'`.
"""

from __future__ import annotations

import functools
import ipaddress
import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import attrs

try:
    from moto.core.responses import ActionResult
    from moto.ec2.models import elastic_network_interfaces as _moto_eni
    from moto.ec2.models.instances import Instance as _MotoInstance
    from moto.ec2.models.instances import InstanceState as _MotoInstanceState
    from moto.ec2.responses.instances import InstanceResponse as _MotoInstanceResponse
    from moto.ec2.responses.spot_instances import SpotInstances as _MotoSpotInstances
    from moto.server import ThreadedMotoServer
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "the sandbox cloud needs moto; install it with: pip install 'compute-broker[sandbox]'"
    ) from exc

from broker.aws import make_client
from broker.ec2 import Ec2Settings
from broker.prices import PriceTable
from broker.sandbox_workers import WorkerService, WorkerServices

AMI_NAME = "compute-broker-sandbox-worker"
SECURITY_GROUP_NAME = "compute-broker-workers"
KEY_NAME = "compute-broker-sandbox"
WORKER_PORT = 2560
SANDBOX_REGION = "us-east-1"

# Installing patches and drawing addresses happen on moto's request threads too.
_lock = threading.Lock()
_installed: set[str] = set()
_boot_delay = 0.0
_ip_prefix = "127.77"
_ip_numbers = itertools.count()
_spot_prices = PriceTable.default()
_worker_services: WorkerServices | None = None  # started once, lives as long as the process
_worker_port: int | None = None  # None: new workers get no service
# Addresses tried for one worker before it gets one whose port another socket holds anyway.
_RESERVE_TRIES = 256
# Host bytes 1..254 of each /24 under the prefix.
_HOSTS_PER_BLOCK = 254
_BLOCKS = 256


@attrs.frozen
class MotoHandle:
    """A running embedded moto server."""

    endpoint_url: str
    _server: ThreadedMotoServer

    def stop(self) -> None:
        """Shut the server down and wait for its thread."""
        self._server.stop()


def start_moto(host: str = "127.0.0.1", port: int = 0) -> MotoHandle:
    """Start moto in a thread on `host:port` (0: a free port), quiet, EC2 launches patched
    to honour MaxCount and ClientToken (see `install_launch_fidelity`)."""
    # werkzeug logs every request at INFO, and adds its own stderr handler if the logger
    # has no level set.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    install_launch_fidelity()
    install_atomic_dynamodb()
    install_spot_prices()
    server = ThreadedMotoServer(ip_address=host, port=port, verbose=False)
    server.start()
    bound_host, bound_port = server.get_host_and_port()
    url_host = f"[{bound_host}]" if ":" in bound_host else bound_host
    return MotoHandle(endpoint_url=f"http://{url_host}:{bound_port}", server=server)


def sandbox_environment(endpoint_url: str) -> dict[str, str]:
    """The environment a process needs to use the sandbox: its endpoint and fake credentials."""
    return {
        "AWS_ENDPOINT_URL": endpoint_url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": SANDBOX_REGION,
        # Fake credentials are in the environment; never ask the instance metadata service.
        "AWS_EC2_METADATA_DISABLED": "true",
    }


# --- moto patches ---------------------------------------------------------------------------


class _BootingState(_MotoInstanceState):
    """`pending` (0) until `ready_at` (time.monotonic), `running` (16) after.

    moto changes states by assigning `name` and `code` (stop, terminate, start); an assigned
    value wins over the boot clock from then on. With a worker service, reading `running`
    means the worker listens (reading the state boots it, if its own timer has not yet), and
    assigning any state but `running` closes its port for good.
    """

    def __init__(self, ready_at: float, service: WorkerService | None = None) -> None:
        # No super().__init__(): it would assign name and code, which forces them.
        self._ready_at = ready_at
        self._service = service
        self._forced_name: str | None = None
        self._forced_code: int | None = None

    def _booted(self) -> bool:
        if time.monotonic() < self._ready_at:
            return False
        if self._service is not None:
            self._service.boot()
        return True

    @property
    def name(self) -> str:
        if self._forced_name is not None:
            return self._forced_name
        return "running" if self._booted() else "pending"

    @name.setter
    def name(self, value: str) -> None:
        self._forced_name = value
        if value != "running" and self._service is not None:
            self._service.close()

    @property
    def code(self) -> int:
        if self._forced_code is not None:
            return self._forced_code
        return 16 if self._booted() else 0

    @code.setter
    def code(self, value: int) -> None:
        self._forced_code = value


def install_boot_delay(seconds: float) -> None:
    """Make each EC2 instance created from now on report `pending` for `seconds`, then
    `running` (in DescribeInstances and the `instance-state-name` filter). Calling again
    changes the delay for instances created after the call."""
    global _boot_delay
    if seconds < 0:
        raise ValueError(f"boot delay must be >= 0, not {seconds}")
    with _lock:
        _boot_delay = seconds
        if "boot_delay" in _installed:
            return
        original_init: Callable[..., None] = _MotoInstance.__init__

        @functools.wraps(original_init)
        def init_with_boot_delay(instance: Any, *args: Any, **kwargs: Any) -> None:
            original_init(instance, *args, **kwargs)
            with _lock:
                delay, services = _boot_delay, _worker_services
            service = services.claim(instance.public_ip, delay) if services else None
            instance._state = _BootingState(time.monotonic() + delay, service)

        _MotoInstance.__init__ = init_with_boot_delay  # type: ignore[method-assign,assignment]
        _installed.add("boot_delay")


def install_unique_ips(prefix: str = "127.77") -> None:
    """Give sandbox workers sequential loopback public IPs: prefix.0.1, prefix.0.2, ...

    Loopback on purpose: whatever a user or a readiness probe does with a sandbox worker's IP
    stays on this machine. Host bytes 0 and 255 are skipped; after 65,024 addresses the
    sequence starts again.
    """
    global _ip_prefix
    if not ipaddress.ip_address(f"{prefix}.0.1").is_loopback:
        raise ValueError(f"sandbox worker IPs must be loopback addresses, not {prefix}.x.y")
    with _lock:
        _ip_prefix = prefix
        if "unique_ips" in _installed:
            return
        # moto's ENI module imported the function by name: replace it there.
        _moto_eni.random_public_ip = _next_loopback_ip  # type: ignore[attr-defined]
        _installed.add("unique_ips")


def _next_loopback_ip() -> str:
    """The next address; with worker services, the next whose port no other socket holds
    (reserved for the worker about to get it)."""
    with _lock:
        services, port = _worker_services, _worker_port
    for _ in range(_RESERVE_TRIES):
        with _lock:
            number = next(_ip_numbers) % (_BLOCKS * _HOSTS_PER_BLOCK)
            prefix = _ip_prefix
        block, host = divmod(number, _HOSTS_PER_BLOCK)
        ip = f"{prefix}.{block}.{host + 1}"
        if services is None or port is None or services.reserve(ip, port):
            break
    return ip


def install_worker_services(port: int | None = WORKER_PORT) -> None:
    """Make each sandbox worker created from now on answer on `port` of its address: an echo
    service from boot until termination (broker/sandbox_workers.py). Workers get addresses
    from `install_unique_ips`, which must be installed too. None: workers created from now
    on do not answer (those that do go on)."""
    global _worker_services, _worker_port
    if "boot_delay" not in _installed:
        install_boot_delay(_boot_delay)  # the patch that gives a new instance its service
    with _lock:
        if port is not None and _worker_services is None:
            _worker_services = WorkerServices()
            _worker_services.start()
        _worker_port = port


def install_atomic_dynamodb() -> None:
    """Serialise moto's DynamoDB requests, as DynamoDB's per-item atomicity does.

    moto's threaded server runs requests concurrently without locking, and a cancelled
    TransactWriteItems restores a copy of the whole table taken when it started, undoing
    concurrent writes: without this, conditional claims could let two replicas (or two
    clients) win the same worker in the sandbox, which real DynamoDB never allows. Idempotent.
    """
    from moto.dynamodb.responses import DynamoHandler

    with _lock:
        if "atomic_dynamodb" in _installed:
            return
        dynamo_lock = threading.Lock()
        unlocked: Callable[[Any], Any] = DynamoHandler.call_action

        @functools.wraps(unlocked)
        def call_action(handler: Any) -> Any:
            with dynamo_lock:
                return unlocked(handler)

        DynamoHandler.call_action = call_action  # type: ignore[method-assign]
        _installed.add("atomic_dynamodb")


def install_launch_fidelity() -> None:
    """Make moto's RunInstances behave like EC2's where the broker relies on it.

    moto launches MinCount instances and ignores ClientToken; EC2 launches up to MaxCount
    (capacity permitting: moto always has it) and answers a repeated ClientToken with the
    reservation it already made, launching nothing. Idempotent.
    """
    with _lock:
        if "launch_fidelity" in _installed:
            return
        original_run: Callable[[Any], Any] = _MotoInstanceResponse.run_instances
        launch_lock = threading.Lock()

        @functools.wraps(original_run)
        def run_instances_like_ec2(response: Any) -> Any:
            get_param = response._get_param
            token = get_param("ClientToken")

            def get_param_max_count(name: str, if_none: Any = None) -> Any:
                if name == "MinCount":
                    return get_param("MaxCount") or get_param("MinCount", if_none)
                return get_param(name, if_none)

            with launch_lock:  # one token, one reservation, even under concurrent retries
                if token:
                    for reservation in response.ec2_backend.reservations.values():
                        if any(i.client_token == token for i in reservation.instances):
                            return ActionResult(reservation)
                response._get_param = get_param_max_count
                return original_run(response)

        _MotoInstanceResponse.run_instances = run_instances_like_ec2  # type: ignore[method-assign,assignment]
        _installed.add("launch_fidelity")


def install_spot_prices(prices: PriceTable | None = None) -> None:
    """Make DescribeSpotPriceHistory answer `prices`' spot price (default: the built-in table)
    for the types it knows, in every zone, so budgets behave in the sandbox as with EC2's
    prices; moto answers $0.00001 for everything. Calling again changes the table."""
    global _spot_prices
    with _lock:
        _spot_prices = prices if prices is not None else PriceTable.default()
        if "spot_prices" in _installed:
            return
        original: Callable[[Any], Any] = _MotoSpotInstances.describe_spot_price_history

        @functools.wraps(original)
        def describe_spot_price_history(response: Any) -> Any:
            result = original(response)
            with _lock:
                table = _spot_prices
            for entry in result.result["SpotPriceHistory"]:
                price = table.price(entry["InstanceType"], "spot")
                if price is not None:
                    entry["SpotPrice"] = f"{price:.6f}"
            return result

        _MotoSpotInstances.describe_spot_price_history = describe_spot_price_history  # type: ignore[method-assign,assignment]
        _installed.add("spot_prices")


# --- resources ------------------------------------------------------------------------------


@attrs.frozen
class SandboxResources:
    """The ids the broker's EC2 settings need in the sandbox."""

    ami_id: str
    security_group_id: str
    key_name: str
    subnet_id: str

    def ec2_settings(self, pool_name: str, region: str = SANDBOX_REGION) -> Ec2Settings:
        """EC2 settings launching into these resources, for the pool `pool_name`."""
        return Ec2Settings(
            ami_id=self.ami_id,
            security_group_ids=(self.security_group_id,),
            key_name=self.key_name,
            subnet_id=self.subnet_id,
            pool_name=pool_name,
            region=region,
        )


def prepare_resources(region: str = SANDBOX_REGION) -> SandboxResources:
    """Create (or find, when they exist) the AMI, security group, key pair and subnet the
    broker launches with. Blocking; the endpoint comes from `AWS_ENDPOINT_URL`."""
    client = make_client("ec2", region=region)
    vpc_id, subnet_id = _default_subnet(client)
    return SandboxResources(
        ami_id=_ensure_ami(client),
        security_group_id=_ensure_security_group(client, vpc_id),
        key_name=_ensure_key_pair(client),
        subnet_id=subnet_id,
    )


def _default_subnet(client: Any) -> tuple[str, str]:
    """(vpc id, subnet id): the default VPC and its default subnet in the first zone."""
    vpcs = client.describe_vpcs(Filters=[{"Name": "isDefault", "Values": ["true"]}])["Vpcs"]
    if not vpcs:
        raise RuntimeError("the sandbox region has no default VPC")
    vpc_id: str = vpcs[0]["VpcId"]
    subnets = client.describe_subnets(
        Filters=[
            {"Name": "vpc-id", "Values": [vpc_id]},
            {"Name": "default-for-az", "Values": ["true"]},
        ]
    )["Subnets"]
    if not subnets:
        raise RuntimeError(f"the sandbox's default VPC {vpc_id} has no default subnet")
    first = min(subnets, key=lambda subnet: subnet["AvailabilityZone"])
    return vpc_id, first["SubnetId"]


def _ensure_ami(client: Any) -> str:
    images = client.describe_images(
        Owners=["self"], Filters=[{"Name": "name", "Values": [AMI_NAME]}]
    )["Images"]
    if images:
        existing: str = min(image["ImageId"] for image in images)
        return existing
    created: str = client.register_image(
        Name=AMI_NAME,
        Description="compute-broker sandbox worker (moto)",
        Architecture="x86_64",
        RootDeviceName="/dev/xvda",
        VirtualizationType="hvm",
    )["ImageId"]
    return created


def _ensure_security_group(client: Any, vpc_id: str) -> str:
    groups = client.describe_security_groups(
        Filters=[
            {"Name": "group-name", "Values": [SECURITY_GROUP_NAME]},
            {"Name": "vpc-id", "Values": [vpc_id]},
        ]
    )["SecurityGroups"]
    if groups:
        group_id: str = groups[0]["GroupId"]
        permissions = groups[0].get("IpPermissions", [])
    else:
        group_id = client.create_security_group(
            GroupName=SECURITY_GROUP_NAME,
            Description="compute-broker workers (sandbox)",
            VpcId=vpc_id,
        )["GroupId"]
        permissions = []
    if not any(
        p.get("IpProtocol") == "tcp" and p.get("FromPort") == WORKER_PORT for p in permissions
    ):
        client.authorize_security_group_ingress(
            GroupId=group_id,
            IpPermissions=[
                {
                    "IpProtocol": "tcp",
                    "FromPort": WORKER_PORT,
                    "ToPort": WORKER_PORT,
                    # Sandbox workers have loopback addresses.
                    "IpRanges": [{"CidrIp": "127.0.0.0/8"}],
                }
            ],
        )
    return group_id


def _ensure_key_pair(client: Any) -> str:
    pairs = client.describe_key_pairs(Filters=[{"Name": "key-name", "Values": [KEY_NAME]}])
    if not pairs["KeyPairs"]:
        client.create_key_pair(KeyName=KEY_NAME)  # the private key is of no use in moto
    return KEY_NAME
