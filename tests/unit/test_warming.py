"""A replica that joins warms the hot adapters whose rendezvous home it becomes (issue 16, item 3).

The registry is the real one on SQLite; the replicas are real `Replica`s around the simulated engine, calling it
directly where a deployed replica calls it through `ServeRegistryClient`. The real-stack run is in
tests/integration/test_autoscaling.py.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

import serve.replica
from routing.policy import rendezvous_order
from serve.adapters import registry as registry_module
from serve.adapters.registry import AdapterRegistry
from serve.adapters.sources import LocalSource, SourceResolver
from serve.adapters.store import SqliteStore
from serve.config import EngineConfig
from serve.demo.assets import DEFAULT_MODEL_NAME, build_default_model
from serve.engines.simulated import SimulatedEngine
from serve.replica import Replica
from serve.wire import AdapterRecord, LoaderStats, ReplicaReport
from tests.unit.test_adapter_validation import ASSETS, write_adapter

NAMES = [f"tenant-{i}" for i in range(12)]


@pytest.fixture
def registry(tmp_path: Path) -> AdapterRegistry:
    model = build_default_model(ASSETS / "models" / DEFAULT_MODEL_NAME)
    source = write_adapter(tmp_path / "adapters" / "one")
    resolver = SourceResolver(local=LocalSource((tmp_path / "adapters",)))
    registry = AdapterRegistry(SqliteStore(tmp_path / "registry.db"), model, resolver, max_rank=64, max_bytes=10**9)
    for name in NAMES:
        assert isinstance(asyncio.run(registry.register(name, str(source))), AdapterRecord)
    return registry


def report(replica: str, requests: dict[str, int], adapters: tuple[str, ...] = ()) -> ReplicaReport:
    return ReplicaReport(replica=replica, adapters=adapters, engine_loras=0, stats=LoaderStats(), requests=requests)


def homed_at(replica: str, live: tuple[str, ...], names: list[str], spread: int = 1) -> list[str]:
    return [name for name in names if replica in rendezvous_order(name, live)[:spread]]


async def test_a_joining_replica_is_planned_the_hot_adapters_whose_home_it_becomes(registry: AdapterRegistry) -> None:
    hot = NAMES[:8]  # requested: tenant-0 most, tenant-7 least; tenant-8.. never
    await registry.report(report("r1", {name: 20 - i for i, name in enumerate(hot)}, adapters=tuple(hot)))
    await registry.report(report("r1", {hot[0]: 5}, adapters=tuple(hot)))  # counts add up over reports
    expected = homed_at("r2", ("r1", "r2"), hot)
    assert 0 < len(expected) < len(hot), "the names split between the two replicas"
    plan = await registry.warm_plan("r2", limit=100)
    assert [record.name for record in plan] == expected  # hottest first, never a cold one
    assert all(record == registry._records[record.name] for record in plan)
    assert [r.name for r in await registry.warm_plan("r2", limit=1)] == expected[:1]
    # Once r2 reports, a replica (re)joining as r1 is planned the rest: r1 is their home.
    await registry.report(report("r2", {}))
    assert [r.name for r in await registry.warm_plan("r1", limit=100)] == [n for n in hot if n not in expected]


async def test_an_adapter_spread_over_several_replicas_is_planned_for_any_of_its_first_homes(
    registry: AdapterRegistry,
) -> None:
    live = ("r1", "r2", "r3")
    second_home = [name for name in NAMES if rendezvous_order(name, live).index("r3") == 1]
    assert len(second_home) >= 2
    spread, single = second_home[:2]
    await registry.report(report("r1", {spread: 10}, adapters=(spread,)))
    await registry.report(report("r2", {spread: 10, single: 10}, adapters=(spread, single)))
    plan = [record.name for record in await registry.warm_plan("r3", limit=100)]
    assert spread in plan  # held by two replicas: r3 is among its first two homes
    assert single not in plan  # held by one: its one home is another replica


async def test_old_requests_dead_replicas_and_unusable_adapters_do_not_count(
    registry: AdapterRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(registry_module, "HOT_WINDOW_S", 0.2)
    monkeypatch.setattr(registry_module, "LIVE_S", 0.2)
    await registry.report(report("gone", {name: 1 for name in NAMES}))
    await asyncio.sleep(0.3)
    assert await registry.warm_plan("new", limit=100) == []  # its requests are old news
    monkeypatch.setattr(registry_module, "HOT_WINDOW_S", 300.0)
    await registry.report(report("gone", {name: 1 for name in NAMES}))
    await asyncio.sleep(0.3)
    await registry.report(report("alive", {}))
    # "gone" stopped reporting (replaced): its requests still count, its homes pass to the live replicas.
    expected = homed_at("new", ("alive", "new"), NAMES)
    registry._records[expected[0]] = replace(registry._records[expected[0]], unusable="no longer fits the base")
    assert [r.name for r in await registry.warm_plan("new", limit=100)] == expected[1:]


def engine(max_cpu_loras: int = 16) -> SimulatedEngine:
    config = {"kind": "simulated", "model": "/models/sim", "max_cpu_loras": max_cpu_loras,
              "simulated": {"step_ms": 1, "adapter_load_ms": 30}}  # fmt: skip
    return SimulatedEngine(EngineConfig.model_validate(config))


async def ask(replica: Replica, adapter: AdapterRecord) -> None:
    body = {"model": "sim", "prompt": "hello", "max_tokens": 2}
    items = [item async for item in replica.generate("completions", body, adapter=adapter)]
    assert isinstance(items[0], dict), items


async def wait_until(condition: Any, seconds: float = 10.0) -> None:
    for _ in range(int(seconds / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("timed out")


async def test_a_replica_reports_its_requests_and_a_new_one_warms_its_share_before_any_request(
    registry: AdapterRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(serve.replica, "REGISTRY_POLL_S", 0.05)
    first = Replica(engine(), registry, 0.0, warm_adapters=8, replica_id="first")
    await first.start()
    hot = NAMES[:8]
    for name in hot:
        await ask(first, registry._records[name])
    # Reported by `first`, every one: a report sent while the requests ran holds only those made by then.
    await wait_until(lambda: all(sum(c.get(name, 0) for _, c in registry._heat) == 1 for name in hot))

    second = Replica(engine(), registry, 0.0, warm_adapters=8, replica_id="second")
    await second.start()
    assert second._warmer is not None
    await asyncio.wait_for(second._warmer, 10)
    expected = homed_at("second", ("first", "second"), hot)
    assert 0 < len(expected) < len(hot)
    assert second._engine.held() == sorted(expected)  # what routers see in its routing stats: it holds them
    stats = (await second._engine.report("second")).stats
    assert (stats.warmed, stats.misses, stats.hits) == (len(expected), 0, 0)
    await ask(second, registry._records[expected[0]])
    stats = (await second._engine.report("second")).stats
    assert (stats.misses, stats.hits) == (0, 1)  # its first request found the adapter loaded

    third = Replica(engine(max_cpu_loras=1), registry, 0.0, warm_adapters=8, replica_id="third")
    await third.start()
    assert third._warmer is not None
    await asyncio.wait_for(third._warmer, 10)
    assert len(third._engine.held()) == 1  # no further than its engine's adapter memory holds
    for replica in (first, second, third):
        replica.__del__()


async def test_warming_off_or_a_registry_that_cannot_answer_leaves_the_replica_serving(
    registry: AdapterRegistry,
) -> None:
    off = Replica(engine(), registry, 0.0, warm_adapters=0, replica_id="off")
    await off.start()
    assert off._warmer is None

    class Unreachable:
        def __getattr__(self, name: str) -> Any:
            async def fails(*_: Any) -> None:
                raise ConnectionError("registry restarting")

            return fails

    lonely = Replica(engine(), Unreachable(), 0.0, warm_adapters=8, replica_id="lonely")
    await lonely.start()
    assert lonely._warmer is not None
    await asyncio.wait_for(lonely._warmer, 10)
    await ask(lonely, registry._records[NAMES[0]])  # serves all the same, loading on first use
    for replica in (off, lonely):
        replica.__del__()
