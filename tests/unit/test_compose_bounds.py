"""How many inline composites the registry makes, and where: one per canonical composite (seeds only where the
method uses them, weights to 4 decimals), within bounds in total
and per key (429/503 with `Retry-After` past them, at once), in a build pool of its own so registrations and reads
never wait behind builds. The real registry over real adapter files; PEFT is held by a stand-in where a test needs
builds in flight.
"""

from __future__ import annotations

import asyncio
import shutil
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from routing.app import create_app
from routing.catalog import ModelCatalog
from serve.adapters.builds import BuildBudget, BuildLimits
from serve.adapters.peft_compose import Composer
from serve.adapters.registry import AdapterRegistry
from serve.config import AuthConfig, RouterConfig
from serve.wire import AdapterRecord, Composition, WireError, composition_key
from tests.unit.composing import component_folders, registered
from tests.unit.fake_engine import FakeEngine, engine_client
from tests.unit.tenancy import api_key, bearer


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return component_folders(tmp_path_factory)


class HeldComposer(Composer):
    """Stands for PEFT: each build waits until the test releases it, then writes its first component as the
    composite (the registry checks it like any adapter)."""

    def __init__(self, base_model: Path) -> None:
        super().__init__(base_model)
        self.started = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._go = threading.Event()

    def build(self, composition: Composition, folders: list[Path], out: Path) -> None:
        self._loop.call_soon_threadsafe(self.started.set)
        self._go.wait(timeout=120)  # bounds a test that fails; a passing one releases it
        out.mkdir(parents=True, exist_ok=True)
        for file in folders[0].iterdir():
            shutil.copy2(file, out / file.name)

    def release(self) -> None:
        self._go.set()


def cat(weight: float) -> Composition:
    return Composition("cat", ("alpha", "beta"), (1.0, weight))


def mix(method: str, *weights: float, density: float | None = None, seed: int = 0) -> Composition:
    """A composite of `a1` (and `a2`, ...) with `weights`."""
    return Composition(method, ("a1", "a2")[: len(weights)], weights, density, seed)


SAME_COMPOSITE = [
    ("a seed cat ignores", mix("cat", 0.7, 0.3, seed=0), mix("cat", 0.7, 0.3, seed=23)),
    ("a seed svd ignores", mix("svd", 1.0, seed=1), mix("svd", 1.0, seed=2)),
    ("a seed TIES ignores: it prunes by magnitude", mix("ties", 1, 1, density=0.5, seed=1),
     mix("ties", 1, 1, density=0.5, seed=2)),
    ("weights within 1e-4", mix("cat", 0.7, 0.3), mix("cat", 0.70004, 0.29996)),
    ("densities within 1e-4", mix("dare_linear", 1, 1, density=0.5), mix("dare_linear", 1, 1, density=0.50003)),
]  # fmt: skip
OTHER_COMPOSITE = [
    ("a DARE seed", mix("dare_linear", 1, 1, density=0.5, seed=1), mix("dare_linear", 1, 1, density=0.5, seed=2)),
    ("a DARE-TIES seed", mix("dare_ties", 1, 1, density=0.5, seed=1), mix("dare_ties", 1, 1, density=0.5, seed=2)),
    ("a weight 1e-4 apart", mix("cat", 0.7, 0.3), mix("cat", 0.7001, 0.3)),
    ("the method", mix("cat", 1.0), mix("svd", 1.0)),
]  # fmt: skip


@pytest.mark.parametrize(("why", "one", "other"), SAME_COMPOSITE, ids=[case[0] for case in SAME_COMPOSITE])
def test_requests_that_differ_below_what_changes_the_result_ask_for_one_composite(
    why: str, one: Composition, other: Composition
) -> None:
    assert composition_key(one) == composition_key(other)


@pytest.mark.parametrize(("why", "one", "other"), OTHER_COMPOSITE, ids=[case[0] for case in OTHER_COMPOSITE])
def test_what_changes_the_result_makes_another_composite(why: str, one: Composition, other: Composition) -> None:
    assert composition_key(one) != composition_key(other)


async def held_registry(
    folders: dict[str, Path], work: Path, limits: BuildLimits
) -> tuple[AdapterRegistry, HeldComposer]:
    composer = HeldComposer(folders["model"])
    return await registered(folders, work, build_limits=limits, composer=composer), composer


BAD_WEIGHTS = [(0.0, 0), (0.00004, 1), (-16.5, 0), (float("nan"), 1), (float("inf"), 0)]


@pytest.mark.parametrize(("weight", "at"), BAD_WEIGHTS)
async def test_the_registry_refuses_weights_that_round_to_zero_or_pass_the_bound_naming_the_weight(
    folders: dict[str, Path], tmp_path: Path, weight: float, at: int
) -> None:
    registry = await registered(folders, tmp_path)
    weights = (weight, 1.0) if at == 0 else (1.0, weight)
    for outcome in (await registry.materialize(Composition("cat", ("alpha", "beta"), weights), "k"),
                    await registry.compose("mix", Composition("cat", ("alpha", "beta"), weights))):  # fmt: skip
        assert isinstance(outcome, WireError) and outcome.status == 400, outcome
        assert outcome.param == f"compose.adapters.{at}.weight"
    assert registry.builds == 0


async def test_past_the_total_bound_a_new_composite_is_503_at_once_and_past_a_keys_share_429(
    folders: dict[str, Path], tmp_path: Path
) -> None:
    registry, composer = await held_registry(folders, tmp_path, BuildLimits(pending=2, pending_per_key=1))
    held = [asyncio.create_task(registry.materialize(cat(w), owner)) for w, owner in ((0.1, "a"), (0.2, "b"))]
    await composer.started.wait()
    overloaded = await registry.materialize(cat(0.3), "c")
    assert isinstance(overloaded, WireError), overloaded
    assert (overloaded.status, overloaded.type, overloaded.retry_after) == (503, "overloaded_error", 5)
    assert overloaded.param == "compose"
    # A key's second new composite while its first is being made: 429, its own doing.
    over_share = await registry.materialize(cat(0.4), "a")
    assert isinstance(over_share, WireError), over_share
    assert (over_share.status, over_share.type, over_share.retry_after) == (429, "rate_limit_error", 5)
    # A composite being made for another key is no new one: c waits for b's build.
    shared = asyncio.create_task(registry.materialize(cat(0.2), "c"))
    composer.release()
    outcomes = [outcome for outcome in await asyncio.gather(*held, shared) if isinstance(outcome, tuple)]
    assert len(outcomes) == 3 and outcomes[1][0] == outcomes[2][0] and registry.builds == 2
    assert isinstance(await registry.materialize(cat(0.3), "c"), tuple), "the builds are done: the bounds are free"


async def test_registrations_do_not_wait_behind_builds(folders: dict[str, Path], tmp_path: Path) -> None:
    """More builds in flight than any default thread pool has threads (32 at most): a registration (its download
    and checks run in a thread too) still completes while every one of them is held."""
    registry, composer = await held_registry(folders, tmp_path, BuildLimits(pending=64, pending_per_key=1))
    builds = [asyncio.create_task(registry.materialize(cat(0.01 * (i + 1)), f"k{i}")) for i in range(40)]
    try:
        await composer.started.wait()
        record = await asyncio.wait_for(registry.register("gamma", str(folders["alpha"])), timeout=60)
        assert isinstance(record, AdapterRecord) and record.name == "gamma"
        assert await registry.generation() > 0 and "gamma" in (await registry.snapshot()).records
    finally:
        composer.release()
    assert all(isinstance(outcome, tuple) for outcome in await asyncio.gather(*builds))


class Clock:
    """Time that moves only when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_key_may_ask_for_so_many_new_composites_a_minute() -> None:
    clock = Clock()
    budget = BuildBudget(BuildLimits(pending=8, pending_per_key=8, per_key_per_minute=2), clock)
    for _ in range(2):
        assert budget.take("a") is None
        budget.give_back("a")
    clock.now += 20
    refused = budget.take("a")
    assert refused is not None and (refused.status, refused.retry_after, refused.param) == (429, 40, "compose")
    assert budget.take("b") is None, "another key's minute is its own"
    clock.now += 40
    assert budget.take("a") is None


def test_refused_builds_count_for_nothing() -> None:
    budget = BuildBudget(BuildLimits(pending=1, pending_per_key=1, per_key_per_minute=1), Clock())
    assert budget.take("a") is None
    assert budget.take("b") is not None and budget.take("b") is not None  # over the total, twice
    budget.give_back("a")
    assert budget.take("b") is None, "b's refusals used none of its minute"


# The reproduction: one tenant's /tokenize calls with every seed 0-23 on a method that ignores the seed.
@pytest.fixture
async def router(folders: dict[str, Path], tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, str]]:
    """A router over the real registry, with a key that may compose `alpha`; the client reads /metrics as admin."""
    registry = await registered(folders, tmp_path)
    key, entry = api_key("tenant", adapters=["alpha"], base=True, compose=True)
    admin_key, admin = api_key("ops", admin=True)
    config = RouterConfig(auth=AuthConfig(keys=[entry, admin]))
    app = create_app(engine_client(FakeEngine()), ModelCatalog("tiny-base", registry), config)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://router", headers=bearer(admin_key)) as client:
        yield client, key


async def test_seeds_a_method_ignores_and_weights_below_its_precision_build_one_composite(
    router: tuple[httpx.AsyncClient, str],
) -> None:
    client, key = router
    for seed in range(24):
        weight = 1.0 + (seed % 3 - 1) * 0.00003  # 0.99997, 1.0, 1.00003: one weight at 4 decimals
        compose = {"method": "svd", "seed": seed, "adapters": [{"name": "alpha", "weight": weight}]}
        answer = await client.post("/tokenize", json={"model": "tiny-base", "prompt": "x", "compose": compose},
                                   headers=bearer(key))  # fmt: skip
        assert answer.status_code == 200, answer.text
    assert await builds(client) == 1.0


async def builds(client: httpx.AsyncClient) -> float:
    for line in (await client.get("/metrics")).text.splitlines():
        if line.startswith("loraplex_composite_builds_total "):
            return float(line.split()[1])
    raise AssertionError("no loraplex_composite_builds_total in /metrics")
