"""Adapters fetched to the node ahead of any request (issue 33, item 2): the node cache's `stage` on real folders, and
the replica's stager, the newest registration first, within the cache's budget for what it takes ahead of use.

The real-stack check (a registered adapter in the node's cache before its first request) is in
tests/integration/test_adapters.py.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

import serve.replica
from serve.config import EngineConfig
from serve.engines.simulated import SimulatedEngine
from serve.replica import Replica
from serve.wire import AdapterRecord, Changes
from tests.unit.test_node_cache import adapter_folder, make_cache, record_of

SIZE = 4096


def sized(folder: Path) -> AdapterRecord:
    return replace(record_of(folder), size_bytes=sum(f.stat().st_size for f in folder.iterdir()))


def test_staging_fetches_once_and_a_later_acquire_finds_the_copy(tmp_path: Path) -> None:
    sources = tmp_path / "sources"
    record = sized(adapter_folder(sources, "one", SIZE))
    cache, resolver = make_cache(tmp_path, sources, max_bytes=10**9)
    assert cache.stage(record, budget=10**6) == "fetched"
    assert cache.stage(record, budget=10**6) == "here"
    folder, hold = cache.acquire(record)
    hold.release()
    assert resolver.fetches == 1 and folder == tmp_path / "cache" / record.content_hash


def test_a_staged_copy_is_taken_without_a_fetch_and_a_missing_one_is_left_to_acquire(tmp_path: Path) -> None:
    sources = tmp_path / "sources"
    staged, missing = (sized(adapter_folder(sources, name, SIZE)) for name in ("staged", "missing"))
    cache, resolver = make_cache(tmp_path, sources, max_bytes=10**9)
    assert cache.stage(staged, budget=10**6) == "fetched"
    here = cache.acquire_here(staged)
    assert here is not None and here[0] == tmp_path / "cache" / staged.content_hash
    assert cache.acquire_here(missing) is None and resolver.fetches == 1
    here[1].release()


def test_staging_stops_at_its_budget_and_at_half_the_caches_bound_and_never_prunes(tmp_path: Path) -> None:
    sources = tmp_path / "sources"
    records = [sized(adapter_folder(sources, f"a{i}", SIZE)) for i in range(4)]
    size = records[0].size_bytes
    cache, resolver = make_cache(tmp_path, sources, max_bytes=10**9)
    assert [cache.stage(r, budget=2 * size) for r in records] == ["fetched", "fetched", "full", "full"]
    assert resolver.fetches == 2

    small, resolver = make_cache(tmp_path / "small", sources, max_bytes=3 * size)  # half of it: one adapter
    assert [small.stage(r, budget=10**9) for r in records] == ["fetched", "full", "full", "full"]
    assert resolver.fetches == 1 and small.stats.pruned == 0


def test_staging_counts_what_earlier_runs_left_in_the_cache(tmp_path: Path) -> None:
    sources = tmp_path / "sources"
    old, new = (sized(adapter_folder(sources, name, SIZE)) for name in ("old", "new"))
    earlier, _ = make_cache(tmp_path, sources, max_bytes=10**9)
    assert earlier.stage(old, budget=10**6) == "fetched"
    restarted, resolver = make_cache(tmp_path, sources, max_bytes=10**9)
    assert restarted.stage(new, budget=old.size_bytes + 1) == "full"
    assert resolver.fetches == 0


class StagingEngine(SimulatedEngine):
    """The simulated engine with a node cache of `room` adapters: records what it is asked to stage."""

    def __init__(self, room: int) -> None:
        config = {"kind": "simulated", "model": "/models/sim", "simulated": {"step_ms": 1, "adapter_load_ms": 1}}
        super().__init__(EngineConfig.model_validate(config))
        self.room = room
        self.staged: list[str] = []

    async def stage(self, adapter: AdapterRecord) -> bool:
        if len(self.staged) >= self.room:
            return False
        if adapter.name == "broken":
            raise OSError("no such object")
        self.staged.append(adapter.name if adapter.version == 1 else f"{adapter.name}@v{adapter.version}")
        return True


class Registry:
    """The registry as a replica follows it: each `report` answers the newest generation, `changes` what it brought."""

    def __init__(self) -> None:
        self.log: list[dict[str, AdapterRecord | None]] = []

    async def report(self, _: Any) -> int:
        return len(self.log)

    async def changes(self, since: int) -> Changes:
        records = {name: record for batch in self.log[since:] for name, record in batch.items()}
        return Changes(len(self.log), records, full=since == 0)


def record(name: str, created: int, **changes: Any) -> AdapterRecord:
    return AdapterRecord(
        name=name, source=f"/adapters/{name}", version=1, content_hash=f"hash-{name}", rank=8, alpha=16,
        target_modules=("q_proj",), size_bytes=SIZE, pinned=False, created=created, **changes,
    )  # fmt: skip


async def test_a_replica_stages_new_registrations_newest_first_until_the_node_cache_is_full(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(serve.replica, "REGISTRY_POLL_S", 0.02)
    registry = Registry()
    canary = replace(record("ranked", 5), version=2, content_hash="hash-ranked-2")
    registry.log.append({
        "old": record("old", 1), "newest": record("newest", 9), "broken": record("broken", 8),
        "unfit": record("unfit", 7, unusable="no longer fits the base"), "ranked": record("ranked", 5, canary=canary),
        "older": record("older", 2), "gone": None,
    })  # fmt: skip
    engine = StagingEngine(room=4)
    replica = Replica(engine, registry, 0.0, replica_id="r")  # type: ignore[arg-type]
    await replica.start()
    await until(lambda: replica._stager is not None and replica._stager.done())
    # A failure is logged and passed over; once the cache is full the rest (`old`) waits for nothing.
    assert engine.staged == ["newest", "ranked", "ranked@v2", "older"]

    engine.room = 5
    registry.log.append({"later": record("later", 10), "newest": record("newest", 9)})  # one new, one seen
    await until(lambda: "later" in engine.staged)
    await until(lambda: replica._stager is not None and replica._stager.done())
    assert engine.staged[4:] == ["later"]
    replica.__del__()


async def until(condition: Any, seconds: float = 5.0) -> None:
    for _ in range(int(seconds / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("timed out")
