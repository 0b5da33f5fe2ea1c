"""The adapter slot policy (serve/slots.py): a bound on any adapter's wait for an engine LoRA slot.

Tested as a pure function, then on the simulated engine's scheduler (the vLLM rules it applies the plan to) with
a virtual clock, then on the simulated engine itself in real time.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import pytest

from loadtests.slot_sim import COSTS, Engine, simulate, workloads
from serve.config import EngineConfig
from serve.engines.sim_scheduler import Queued, SimScheduler
from serve.engines.simulated import SimulatedEngine
from serve.replica import Replica
from serve.slots import Holder, Plan, SlotKeeper, SlotPolicy, Waiter
from tests.unit.fake_engine import record

POLICY = SlotPolicy(wait_s=2.0, hold_s=1.0)

PLANS = [
    # (holders, waiters, slots, now, plan): holders (adapter, since, running), waiters (adapter, since, waiting)
    pytest.param([("a", 0, 3)], [("b", 9, 1)], 1, 10, Plan(), id="nothing-overdue-nothing-done"),
    pytest.param([("a", 0, 3)], [("b", 7, 1)], 2, 10, Plan(first=("b",)), id="a-free-slot-needs-no-pause"),
    pytest.param([("a", 0, 3), ("c", 0, 1)], [("b", 7, 1)], 2, 10, Plan(("b",), ("c",)), id="fewest-streams-yield"),
    pytest.param([("a", 0, 1), ("c", 5, 1)], [("b", 7, 1)], 2, 10, Plan(("b",), ("a",)), id="longest-held-on-a-tie"),
    pytest.param([("a", 0, 1), ("c", 9.5, 1)], [("b", 7, 1)], 2, 10, Plan(("b",), ("a",)), id="young-slot-kept"),
    pytest.param([("a", 9.5, 1)], [("b", 7, 1)], 1, 10, Plan(first=("b",)), id="only-a-young-holder-waits"),
    pytest.param(
        [("a", 0, 4), ("c", 9.5, 1)],
        [("b", 7, 1)],
        2,
        10,
        Plan(first=("b",)),
        id="a-big-holder-is-spared-while-a-small-one-will-be-free-soon",
    ),
    pytest.param(
        [("a", 0, 4), ("c", 0, 5)],
        [("b", 7, 1)],
        2,
        10,
        Plan(("b",), ("a",)),
        id="the-bound-holds-when-every-holder-is-big",
    ),
    pytest.param(
        [("a", 0, 1), ("c", 0, 1)],
        [("b", 7, 1), ("d", 5, 1)],
        2,
        10,
        Plan(("d", "b"), ("a", "c")),
        id="oldest-first-one-holder-each",
    ),
    pytest.param([("a", 0, 1)], [("b", 7, 1), ("d", 5, 1)], 2, 10, Plan(("d", "b"), ("a",)), id="a-free-slot-counts"),
    # A request waiting for its first token goes before a paused one, though the paused one waits longer.
    pytest.param([("a", 0, 1)], [("p", 5, 1, False), ("f", 7, 1)], 1, 10, Plan(("f", "p"), ("a",)), id="fresh-first"),
]


@pytest.mark.parametrize(("holders", "waiters", "slots", "now", "plan"), PLANS)
def test_the_plan(holders: list[tuple], waiters: list[tuple], slots: int, now: float, plan: Plan) -> None:
    got = POLICY.plan([Holder(*h) for h in holders], [Waiter(*w) for w in waiters], slots, now)
    assert got == plan


def test_an_adapter_that_lost_its_slot_waits_from_then_not_from_its_arrival() -> None:
    keeper: SlotKeeper[Queued] = SlotKeeper(POLICY, 1, adapter_of=lambda q: q.adapter, arrived_of=lambda q: q.arrived)
    popular, rare = Queued("pop", 1, arrived=0.0), Queued("rare", 1, arrived=0.5)
    assert keeper.plan([popular], [rare], now=1.0) == Plan()
    assert keeper.plan([popular], [rare], now=2.6) == Plan(first=("rare",), evict=("pop",))
    # The popular adapter's request waits now; the rare one runs. It is not overdue at once (that would hand
    # the slot back and forth every step), only slot_wait_s after it lost the slot.
    assert keeper.plan([rare], [popular], now=3.0) == Plan()
    assert keeper.plan([rare], [popular], now=4.5) == Plan()
    assert keeper.plan([rare], [popular], now=4.7) == Plan(first=("pop",), evict=("rare",))


def test_a_paused_adapter_claims_its_slot_back_after_pause_s_while_a_first_token_waits_wait_s() -> None:
    policy = SlotPolicy(wait_s=0.25, hold_s=1.0, pause_s=2.0)
    keeper: SlotKeeper[Queued] = SlotKeeper(policy, 1, adapter_of=lambda q: q.adapter, arrived_of=lambda q: q.arrived)
    popular, rare = Queued("pop", 1, arrived=0.0), Queued("rare", 1, arrived=1.0)
    assert keeper.plan([], [popular], now=0.0) == Plan()  # the step made now gives `pop` the slot
    assert keeper.plan([popular], [rare], now=1.2) == Plan()
    assert keeper.plan([popular], [rare], now=1.3) == Plan(first=("rare",), evict=("pop",))  # wait_s after arriving
    # The popular adapter's request is paused now: it has answered already, so it waits pause_s, not wait_s.
    assert keeper.plan([rare], [], now=1.6, paused=[popular]) == Plan()
    assert keeper.plan([rare], [], now=3.2, paused=[popular]) == Plan()
    assert keeper.plan([rare], [], now=3.4, paused=[popular]) == Plan(first=("pop",), evict=("rare",))


def test_a_slot_is_held_from_the_step_that_gave_it_not_from_when_the_keeper_first_sees_it() -> None:
    keeper: SlotKeeper[Queued] = SlotKeeper(POLICY, 1, adapter_of=lambda q: q.adapter, arrived_of=lambda q: q.arrived)
    first, late = Queued("first", 1, arrived=0.0), Queued("late", 1, arrived=0.0)
    assert keeper.plan([], [first, late], now=0.0) == Plan()  # the step made now admits `first`
    # A long first step (cold adapters, many prompts): `first` has held its slot since 0, past hold_s, so the
    # overdue adapter takes it at once instead of one hold_s later.
    assert keeper.plan([first], [late], now=2.5) == Plan(first=("late",), evict=("first",))


RESUMES = [
    # (running adapters, paused adapters, queued adapters, plan, slots, resumed)
    pytest.param(["a"], ["a", "b"], [], Plan(), 2, {"a", "b"}, id="own-slot-then-a-free-one"),
    pytest.param(["a", "c"], ["b"], [], Plan(), 2, set(), id="no-free-slot-stays-paused"),
    pytest.param(["a", "c"], ["b"], [], Plan(first=("b",), evict=("c",)), 2, {"b"}, id="overdue-takes-the-freed-slot"),
    pytest.param(["a"], ["b"], ["q"], Plan(first=("q", "b")), 2, set(), id="an-older-queued-adapter-goes-first"),
    pytest.param(["a"], ["b", "d"], [], Plan(first=("d",)), 2, {"d"}, id="overdue-before-the-others"),
    pytest.param(["a", "c"], ["c"], [], Plan(first=("b",), evict=("c",)), 2, set(), id="just-evicted-stays-paused"),
]


@pytest.mark.parametrize(("running", "paused", "queued", "plan", "slots", "resumed"), RESUMES)
def test_which_paused_adapters_run_again(
    running: list[str], paused: list[str], queued: list[str], plan: Plan, slots: int, resumed: set[str]
) -> None:
    keeper: SlotKeeper[Queued] = SlotKeeper(POLICY, slots, adapter_of=lambda q: q.adapter, arrived_of=lambda q: 0.0)
    requests = [[Queued(a, 1, arrived=0.0) for a in adapters] for adapters in (running, paused, queued)]
    assert keeper.resume(plan, *requests) == resumed


def scheduler(slots: int = 2, policy: SlotPolicy | None = POLICY, max_num_seqs: int = 8) -> SimScheduler:
    return SimScheduler(max_num_seqs, slots, policy)


def test_without_the_policy_running_requests_keep_their_slots_and_a_rare_adapter_waits() -> None:
    sim = scheduler(policy=None)
    for adapter in ("a", "a", "b"):
        sim.add(Queued(adapter, 1, arrived=0.0))
    rare = Queued("rare", 1, arrived=0.0)
    sim.add(rare)
    for step in range(100):
        assert rare not in sim.schedule(now=step * 0.5)  # vLLM's rule: never, while a and b run


def test_with_the_policy_a_rare_adapter_runs_after_the_bound_and_the_others_resume() -> None:
    sim = scheduler()
    popular = [Queued(adapter, 1, arrived=0.0) for adapter in ("a", "a", "b")]
    for request in popular:
        sim.add(request)
    rare = Queued("rare", 1, arrived=0.0)
    sim.add(rare)
    admitted_at = next(step * 0.5 for step in range(100) if rare in sim.schedule(now=step * 0.5))
    assert POLICY.wait_s <= admitted_at <= POLICY.wait_s + 0.5  # the bound, within a step
    running = sim.schedule(now=admitted_at + 0.5)
    assert "b" not in {r.adapter for r in running}  # b had fewer streams than a: b gave its slot up
    assert popular[2].pauses == 1 and popular[2] in sim.paused  # paused, not sent back: nothing to recompute
    sim.remove(rare)  # the rare request ends: b gets its slot back
    assert popular[2] in sim.schedule(now=admitted_at + 1.0)
    assert popular[2].admitted_at == 0.0  # resumed where it stopped, not admitted anew


def test_the_bound_holds_on_random_traffic() -> None:
    """Random arrivals over 40 adapters (Pareto popularity) into 4 slots, random lengths, about twice as many
    adapters wanting a slot as there are: no request waits for its first slot past slot_wait_s + slot_hold_s
    (plus a step). (Heavier, when more adapters are overdue at once than slots free up, waits grow past it.)"""
    rng = random.Random(7)
    step_s, slots = 0.25, 4
    sim = scheduler(slots=slots, max_num_seqs=64)
    left: dict[int, int] = {}
    waited: list[float] = []
    for step in range(2000):
        now = step * step_s
        if rng.random() < 0.2:
            request = Queued(f"a{min(int(rng.paretovariate(1.0)), 40)}", 1, arrived=now)
            left[id(request)] = rng.randint(4, 60)
            sim.add(request)
        for request in sim.schedule(now):
            if request.pauses == 0 and request.admitted_at == now:
                waited.append(now - request.arrived)
            left[id(request)] -= 1
            if left[id(request)] <= 0:
                sim.remove(request)
    assert len(waited) > 400
    assert max(waited) <= POLICY.wait_s + POLICY.hold_s + step_s
    assert sim.keeper is not None and sim.keeper.paused > 0


@pytest.mark.parametrize("name", ["zipf64", "zipf512", "rare"])
def test_in_the_slot_simulator_the_tail_is_cut(name: str) -> None:
    """The bench's workloads on the CPU cost model: first come first served leaves a tail of tens of seconds; the
    policy bounds it. Throughput is kept where adapters seldom outnumber the slots (zipf64); where they often do,
    slot switches cost some of it (docs/slots.md)."""
    workload = next(w for w in workloads(512) if w.name == name)
    fcfs = simulate(workload, Engine(policy=None), COSTS["cpu"]).summary()
    bounded = simulate(workload, Engine(policy=POLICY), COSTS["cpu"]).summary()
    assert fcfs["ttft_max_ms"] > 20_000
    assert bounded["ttft_max_ms"] < 8_000
    if name == "zipf64":
        assert bounded["tok_per_s"] >= 0.95 * fcfs["tok_per_s"]


async def test_the_simulated_engine_serves_a_rare_adapter_within_the_bound_while_popular_ones_hold_the_slots() -> None:
    settings = {"kind": "simulated", "model": "/m", "max_loras": 1, "slot_wait_s": 0.3, "slot_hold_s": 0.1,
                "simulated": {"step_ms": 10, "lora_slots": True}}  # fmt: skip
    sim = SimulatedEngine(EngineConfig.model_validate(settings))
    await sim.start()
    body = {"model": "m", "prompt": "x", "max_tokens": 300, "stream": True}

    async def first_token(adapter: str, delay: float) -> float:
        """Reads the whole stream (leaving early would abort the request and free its slot)."""
        await asyncio.sleep(delay)
        started, first = time.monotonic(), None
        async for _item in sim.generate("completions", body, record(adapter)):
            first = first or time.monotonic() - started
        assert first is not None
        return first

    try:
        popular = [asyncio.create_task(first_token("pop", 0.0)) for _ in range(2)]
        rare = await first_token("rare", 0.05)  # pop holds the one slot for 3 s
        assert 0.3 <= rare < 1.0
        assert sim.scheduler.keeper is not None and sim.scheduler.keeper.paused >= 2  # then they take turns
        assert all(await asyncio.gather(*popular))
    finally:
        sim.shutdown()


async def replica_with_slots(slots: int, **settings: Any) -> tuple[Replica, SimulatedEngine]:
    """A replica over a started simulated engine with `slots` LoRA slots (no registry: nothing here asks it)."""
    simulated = {"step_ms": 5, "lora_slots": True, **settings.pop("simulated", {})}
    config = {"kind": "simulated", "model": "/m", "max_loras": slots, "simulated": simulated, **settings}
    engine = SimulatedEngine(EngineConfig.model_validate(config))
    await engine.start()
    return Replica(engine, registry=None, stream_batch_s=0.0, replica_id="r"), engine


async def test_a_replica_reports_the_adapters_in_flight_and_its_slots_for_the_request_router() -> None:
    replica, engine = await replica_with_slots(3)
    body = {"model": "m", "prompt": "x", "max_tokens": 50, "stream": True}
    try:
        stream = replica.generate("completions", body, adapter=record("sql"))
        await anext(stream)
        stats = await replica.record_routing_stats()
        assert (stats["active"], stats["lora_slots"], stats["adapters"]) == (["sql"], 3, ["sql"])
        await stream.aclose()
        assert (await replica.record_routing_stats())["active"] == []
    finally:
        engine.shutdown()


async def test_a_request_that_will_wait_for_a_slot_has_its_adapter_loaded_while_it_waits() -> None:
    replica, engine = await replica_with_slots(1, slot_wait_s=5.0, simulated={"adapter_load_ms": 20})
    body = {"model": "m", "prompt": "x", "max_tokens": 400, "stream": True}
    try:
        popular = replica.generate("completions", body, adapter=record("pop"))
        await anext(popular)  # pop holds the only slot
        assert (await engine.report("r")).stats.warmed == 0
        rare = replica.generate("completions", body, adapter=record("rare"))
        waiting = asyncio.create_task(anext(rare))
        for _ in range(100):
            if "rare" in engine.held():
                break
            await asyncio.sleep(0.01)
        stats = (await engine.report("r")).stats
        assert "rare" in engine.held() and stats.warmed == 1  # loaded ahead, while the request waits for the slot
        assert not waiting.done()
        waiting.cancel()
        await popular.aclose()
    finally:
        engine.shutdown()
