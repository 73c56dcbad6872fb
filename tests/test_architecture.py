"""The package's shape, checked: who may change pool state, who may import boto3, module sizes,
no import cycles (see docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import attrs

from broker.model import Lease, Worker

BROKER = Path(__file__).resolve().parent.parent / "broker"

# The pool's own tables; only broker/pool.py writes them.
POOL_TABLES = frozenset({"workers", "leases", "in_flight", "gone_ips", "_held"})
# Every field of a Worker or a Lease; only broker/pool.py assigns them.
STATE_FIELDS = frozenset(f.name for cls in (Worker, Lease) for f in attrs.fields(cls))
MUTATORS = frozenset({"pop", "popitem", "clear", "update", "setdefault", "__setitem__"})
AWS_ADAPTERS = frozenset(
    {"aws.py", "ec2.py", "dynamo.py", "dynamo_table.py", "sqs.py", "preflight.py"}
)
# Modules allowed past the ~500-line guideline, each still one concern: the DynamoDB adapter,
# the config schema (one table, one Field per key: it grows by a key's few lines at a time),
# and the pool, the only writer of worker and lease state (its indexes are in pool_index.py;
# every transition stays in this one file on purpose).
LONG_MODULES = {"dynamo.py": 680, "config.py": 640, "pool.py": 600}


def modules() -> dict[str, ast.Module]:
    return {path.name: ast.parse(path.read_text(), str(path)) for path in BROKER.glob("*.py")}


def _not_self(node: ast.expr) -> bool:
    return not (isinstance(node, ast.Name) and node.id in ("self", "cls"))


def state_writes(tree: ast.Module) -> list[str]:
    """Places in `tree` that assign a Worker/Lease field or change the pool's tables."""
    found = []
    for node in ast.walk(tree):
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = list(node.targets)
        elif isinstance(node, ast.AugAssign | ast.AnnAssign):
            targets = [node.target]
        elif isinstance(node, ast.Delete):
            targets = list(node.targets)
        for target in targets:
            for part in ast.walk(target):
                if (
                    isinstance(part, ast.Attribute)
                    and part.attr in STATE_FIELDS
                    and isinstance(part.ctx, ast.Store | ast.Del)
                    and _not_self(part.value)
                ):
                    found.append(f"line {part.lineno}: assigns .{part.attr}")
                if (
                    isinstance(part, ast.Subscript)
                    and isinstance(part.value, ast.Attribute)
                    and part.value.attr in POOL_TABLES
                    and isinstance(part.ctx, ast.Store | ast.Del)
                ):
                    found.append(f"line {part.lineno}: writes .{part.value.attr}[...]")
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in MUTATORS
            and isinstance(node.func.value, ast.Attribute)
            and node.func.value.attr in POOL_TABLES
        ):
            found.append(f"line {node.lineno}: .{node.func.value.attr}.{node.func.attr}()")
    return found


def test_only_the_pool_changes_worker_and_lease_state() -> None:
    """No module but broker/pool.py assigns a Worker or Lease attribute or writes the pool's
    tables: every change goes through a named transition of the pool."""
    offences = {
        name: writes
        for name, tree in modules().items()
        if name != "pool.py" and (writes := state_writes(tree))
    }
    assert offences == {}


def test_the_state_check_catches_a_write() -> None:
    """The check above finds the writes it is meant to find (so it cannot pass vacuously)."""
    tree = ast.parse(
        "worker.state = 1\nself.ctx.pool.workers['i'] = w\npool.leases.pop(k)\n"
        "lease.last_activity += 1\nself.state = 2\n"
    )
    assert len(state_writes(tree)) == 4


def imported_modules(tree: ast.Module) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_only_the_aws_adapters_import_boto3() -> None:
    """boto3 and botocore are imported by the AWS adapters only; the core speaks to ports."""
    importers = {
        name
        for name, tree in modules().items()
        if any(m.split(".")[0] in ("boto3", "botocore") for m in imported_modules(tree))
    }
    assert set() == importers - AWS_ADAPTERS


def test_engine_is_small_and_modules_stay_readable() -> None:
    """broker/engine.py stays under 350 lines; no module passes about 500 (the
    DynamoDB adapter holds one concern and may run longer)."""
    lengths = {path.name: len(path.read_text().splitlines()) for path in BROKER.glob("*.py")}
    assert lengths["engine.py"] < 350
    too_long = {name: n for name, n in lengths.items() if n > LONG_MODULES.get(name, 550)}
    assert too_long == {}


def test_no_import_cycles_between_broker_modules() -> None:
    """The rooms depend on each other in one direction only (module-level imports)."""
    graph: dict[str, set[str]] = {}
    for name, tree in modules().items():
        deps = set()
        for node in tree.body:  # module level only: function-level imports are deliberate
            if (
                isinstance(node, ast.ImportFrom)
                and node.module
                and node.module.startswith("broker.")
            ):
                deps.add(node.module.removeprefix("broker.") + ".py")
        graph[name] = deps

    visiting: list[str] = []
    done: set[str] = set()
    cycles: list[list[str]] = []

    def visit(name: str) -> None:
        if name in done:
            return
        if name in visiting:
            cycles.append([*visiting[visiting.index(name) :], name])
            return
        visiting.append(name)
        for dep in sorted(graph.get(name, ())):
            visit(dep)
        visiting.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)
    assert cycles == []
