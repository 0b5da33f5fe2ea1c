"""Inline composites no one uses are collected: deleted from the composite store after `ttl` unused, built again when
asked for, never while a registered record (any version it keeps) names them. The real registry and PEFT, on a folder
store and on moto's S3, with a clock the tests move.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from routing.catalog import INLINE_IDLE_S, ModelCatalog
from serve.adapters.composite_collection import InlineCollection
from serve.adapters.peft_compose import CompositeStore
from serve.adapters.registry import AdapterRegistry
from serve.adapters.sources import LocalSource, S3Source, SourceResolver
from serve.adapters.store import SqliteStore
from serve.wire import AdapterRecord, Composition, LoaderStats, ReplicaReport, WireError, composition_key
from tests.conftest import S3_KEYS
from tests.unit.composing import ASSETS, component_folders

TTL = 3600.0
Opener = Callable[[], AdapterRegistry]
"""Opens the test's registry afresh (a restart), on the same record store and composite store."""


class Clock:
    """Wall-clock time that moves only when a test says so; it starts at the real time, as the store's timestamps."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return component_folders(tmp_path_factory)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(params=["folder", "s3"])
def composites(request: pytest.FixtureRequest, tmp_path: Path) -> CompositeStore:
    """The composite store: a folder, or a prefix of a moto S3 bucket."""
    if request.param == "folder":
        return CompositeStore(str(tmp_path / "composites"), S3Source())
    s3 = S3Source(endpoint_url=request.getfixturevalue("s3_url"), access_key_id=S3_KEYS["AWS_ACCESS_KEY_ID"],
                  secret_access_key=S3_KEYS["AWS_SECRET_ACCESS_KEY"])  # fmt: skip
    bucket = f"collect-{abs(hash(str(tmp_path))) % 10**12}"
    s3.client().create_bucket(Bucket=bucket)
    return CompositeStore(f"s3://{bucket}/cluster/composites", s3)


@pytest.fixture
def open_registry(folders: dict[str, Path], tmp_path: Path, composites: CompositeStore, clock: Clock) -> Opener:
    roots = (ASSETS.resolve(), tmp_path.resolve(), folders["mate"].parent.resolve())
    resolver = SourceResolver(local=LocalSource(roots), s3=composites.s3)
    return lambda: AdapterRegistry(
        SqliteStore(tmp_path / "registry.db"), folders["model"], resolver, max_rank=64, max_bytes=10**9,
        composites=composites, inline_collection=InlineCollection(TTL, clock),
    )  # fmt: skip


@pytest.fixture
async def registry(folders: dict[str, Path], open_registry: Opener) -> AdapterRegistry:
    """A registry with `alpha` and `beta` registered."""
    registry = open_registry()
    for name in ("alpha", "beta"):
        assert isinstance(await registry.register(name, str(folders[name])), AdapterRecord)
    return registry


def cat(weight: float) -> Composition:
    return Composition("cat", ("alpha", "beta"), (1.0, weight))


async def inline(registry: AdapterRegistry, composition: Composition) -> tuple[AdapterRecord, str]:
    """The inline composite `composition` (built, or known) and its key in the composite store."""
    outcome = await registry.materialize(composition, "tenant")
    assert not isinstance(outcome, WireError), outcome
    assert outcome[0].composition is not None
    return outcome[0], composition_key(outcome[0].composition)


async def test_an_inline_composite_unused_past_its_ttl_is_deleted_and_built_again_when_asked_for(
    registry: AdapterRegistry, composites: CompositeStore, clock: Clock
) -> None:
    record, key = await inline(registry, cat(0.5))
    assert registry.builds == 1 and composites.has(key)
    clock.now += 0.9 * TTL
    assert await registry.collect() == [] and composites.has(key)
    clock.now += 0.2 * TTL
    assert await registry.collect() == [key]
    assert not composites.has(key) and key not in composites.stored(), "every file of it is gone"
    again, _ = await inline(registry, cat(0.5))
    assert registry.builds == 2 and composites.has(key), "asked for again, it is built again"
    assert (again.name, again.source, again.content_hash) == (record.name, record.source, record.content_hash)


async def test_a_composite_a_registered_record_names_is_never_collected(
    registry: AdapterRegistry, composites: CompositeStore, clock: Clock
) -> None:
    """A registered composite lives in the same store as inline ones (an inline request for it finds its files), and
    a rollout's version may name a composite's files as its source: neither goes while a record keeps it."""
    mix = await registry.compose("mix", cat(1.0))
    assert isinstance(mix, AdapterRecord) and mix.composition is not None
    _, rolled_key = await inline(registry, cat(0.25))
    _, unused_key = await inline(registry, cat(0.75))
    await inline(registry, cat(1.0))  # the registered composite asked for inline: no new build
    assert registry.builds == 3
    record = await registry.register("plain", (await registry.snapshot()).records["alpha"].source)
    assert isinstance(record, AdapterRecord)
    rolling = await registry.rollout("plain", composites.url(rolled_key), 10.0)
    assert isinstance(rolling, AdapterRecord) and rolling.canary is not None, rolling
    assert rolling.canary.source == composites.url(rolled_key)
    clock.now += 2 * TTL
    assert await registry.collect() == [unused_key]
    assert composites.has(composition_key(mix.composition)) and composites.has(rolled_key)
    assert isinstance(await registry.rollback("plain"), AdapterRecord)  # no record names it any more
    assert await registry.collect() == [rolled_key]
    clock.now += 2 * TTL
    assert await registry.collect() == [] and composites.has(composition_key(mix.composition))


async def test_an_inline_composite_used_within_its_ttl_is_kept(
    registry: AdapterRegistry, composites: CompositeStore, clock: Clock
) -> None:
    """Used: asked of the registry by a router, or in an engine replica's report of the requests it served."""
    (_, asked), (served, reported), (_, unused) = [await inline(registry, cat(w)) for w in (0.1, 0.2, 0.3)]
    clock.now += 0.75 * TTL
    await inline(registry, cat(0.1))
    await registry.report(ReplicaReport("r1", (), 0, LoaderStats(), requests={served.name: 3}))
    clock.now += 0.5 * TTL
    assert await registry.collect() == [unused]
    assert composites.has(asked) and composites.has(reported)
    clock.now += 0.6 * TTL
    assert sorted(await registry.collect()) == sorted([asked, reported])
    assert registry.builds == 3


@pytest.mark.parametrize("composites", ["folder"], indirect=True)  # S3 stamps a write with the real time only
async def test_a_use_survives_a_restart_of_the_registry_in_the_stores_timestamp(
    registry: AdapterRegistry, open_registry: Opener, composites: CompositeStore, clock: Clock
) -> None:
    """A pass moves the store's timestamp of a composite used since to that use, so a restarted registry, which
    remembers no use, keeps it for the TTL from there."""
    _, key = await inline(registry, cat(0.5))
    clock.now += 0.75 * TTL
    await inline(registry, cat(0.5))
    assert await registry.collect() == [] and composites.stored()[key] == clock.now
    restarted = open_registry()
    clock.now += 0.5 * TTL  # 1.25 TTL after the build, 0.5 after the last use
    assert await restarted.collect() == []
    clock.now += 0.6 * TTL
    assert await restarted.collect() == [key]


async def test_the_store_lists_stamps_and_deletes_a_composite_whole(
    composites: CompositeStore, tmp_path: Path, folders: dict[str, Path]
) -> None:
    """On S3 a stamp is a copy of the composite's config onto itself, which makes its LastModified now."""
    for key in ("a" * 64, "b" * 64):
        composites.publish(folders["alpha"], key)
    listed = composites.stored()
    assert set(listed) == {"a" * 64, "b" * 64} and all(abs(at - time.time()) < 60 for at in listed.values())
    time.sleep(1.1)  # S3 timestamps count whole seconds
    composites.touch("a" * 64, listed["a" * 64] + 1)
    assert composites.stored()["a" * 64] >= listed["a" * 64] + 1
    composites.remove("a" * 64)
    assert set(composites.stored()) == {"b" * 64} and not composites.has("a" * 64) and composites.has("b" * 64)


class Asking:
    """The registry, counting the inline composites a router asks it for."""

    def __init__(self, registry: AdapterRegistry) -> None:
        self.registry = registry
        self.asked = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self.registry, name)

    async def materialize(self, composition: Composition, owner: str) -> tuple[AdapterRecord, bool] | WireError:
        self.asked += 1
        return await self.registry.materialize(composition, owner)


@pytest.mark.parametrize("composites", ["folder"], indirect=True)  # the router's part; the store's is above
async def test_a_router_asks_again_for_an_inline_composite_it_left_idle_so_a_collected_one_is_built_again(
    registry: AdapterRegistry, composites: CompositeStore, clock: Clock
) -> None:
    """A router keeps the inline composites it was given, and engines fetch one's files when they load it. One in use
    is never collected (each request's replica reports it); one this router left idle for `INLINE_IDLE_S` may have
    been, so the router asks the registry again rather than send engines a record whose files are gone."""
    router_clock = Clock()
    asking = Asking(registry)
    catalog = ModelCatalog("tiny-base", asking, clock=router_clock)  # type: ignore[arg-type]
    target, built = await catalog.composite(cat(0.5), "tenant")
    assert built and target.adapter is not None and target.adapter.composition is not None
    key = composition_key(target.adapter.composition)
    for _ in range(4):  # in use: served from the router's memory, whatever its age
        router_clock.now += INLINE_IDLE_S * 0.9
        assert await catalog.composite(cat(0.5), "tenant") == (target, False)
    assert asking.asked == 1
    clock.now += 1.1 * TTL
    assert await registry.collect() == [key] and not composites.has(key)
    router_clock.now += INLINE_IDLE_S
    again, built = await catalog.composite(cat(0.5), "tenant")
    assert asking.asked == 2 and built and registry.builds == 2 and composites.has(key)
    assert again.adapter is not None and again.adapter.source == target.adapter.source


def test_what_a_pass_collects_and_what_it_stamps() -> None:
    """The rule alone: unused for the TTL and not held is collected (a held one, however old, is kept: built now, or
    named by a record); a use seen after the store's timestamp is written back to it."""
    clock = Clock()
    collection = InlineCollection(100.0, clock)
    now = clock.now
    collection.used("b" * 64)
    stored = {"a" * 64: now - 50, "b" * 64: now - 500, "c" * 64: now - 500, "d" * 64: now - 101}
    sweep = collection.sweep(stored, held={"c" * 64})
    assert sweep.forgotten == ("d" * 64,)
    assert sweep.touched == (("b" * 64, now),)
    assert collection.period_s == 25.0 and InlineCollection(86400.0).period_s == 3600.0
