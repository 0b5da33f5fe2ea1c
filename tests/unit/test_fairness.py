"""Fair share under load: the virtual-token-counter order, the admission gate, and the router using it."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from routing.errors import Overloaded
from routing.fairness import FairGate, VirtualTokenCounters
from routing.ratelimit import LocalRateLimiter
from serve.wire import AdapterRecord, Endpoint, ReplicaItem
from tests.unit.fake_engine import FakeEngine, FakeHandle, StreamCall
from tests.unit.tenancy import BASE, api_key, bearer, client_for, context_of, make_app


def test_a_light_tenant_is_served_before_a_heavy_tenants_backlog() -> None:
    vtc: VirtualTokenCounters[str] = VirtualTokenCounters()
    vtc.charge("heavy", 100)  # heavy's request in flight
    for i in range(10):
        vtc.push("heavy", f"heavy-{i}")
    vtc.push("light", "light-0")
    assert vtc.counters["light"] == 100  # lifted to the least-served waiting tenant: no banked credit
    vtc.charge("heavy", 150)  # heavy's request finished, with its real usage
    assert vtc.pop() == ("light", "light-0")
    assert [item for _, item in iter(vtc.pop, None)] == [f"heavy-{i}" for i in range(10)]


def test_equal_counters_go_in_arrival_order_and_idle_tenants_bank_nothing() -> None:
    vtc: VirtualTokenCounters[str] = VirtualTokenCounters()
    vtc.push("a", "a-0")
    vtc.push("b", "b-0")
    assert [vtc.pop(), vtc.pop()] == [("a", "a-0"), ("b", "b-0")]
    vtc.charge("a", 500)
    vtc.push("a", "a-1")
    assert vtc.pop() == ("a", "a-1")  # the queue empties with `a` the last to leave, at 500
    vtc.push("c", "c-0")  # a newcomer arriving to an empty queue starts where `a` left off
    assert vtc.counters["c"] == 500


def test_backlogged_tenants_are_served_in_proportion_to_their_weights() -> None:
    vtc: VirtualTokenCounters[str] = VirtualTokenCounters()
    weights = {"gold": 3.0, "bronze": 1.0}
    served = {"gold": 0, "bronze": 0}
    for tenant in weights:
        for i in range(100):
            vtc.push(tenant, f"{tenant}-{i}")
    for _ in range(80):
        popped = vtc.pop()
        assert popped is not None
        tenant, _ = popped
        served[tenant] += 1
        vtc.charge(tenant, 10 / weights[tenant])  # each request is served 10 tokens
    assert served == {"gold": 60, "bronze": 20}


def test_a_withdrawn_request_leaves_the_queue() -> None:
    vtc: VirtualTokenCounters[str] = VirtualTokenCounters()
    vtc.push("a", "a-0")
    vtc.remove("a", "a-0")
    assert len(vtc) == 0 and vtc.pop() is None


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def until(condition: Callable[[], bool]) -> None:
    """Lets other tasks run until `condition` holds (a bounded number of loop turns, no wall-clock time)."""
    for _ in range(10_000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never held")


async def test_gate_passes_requests_below_the_bound_and_releases_queued_ones_fairly() -> None:
    gate = FairGate(max_inflight=1, max_waiting=20)
    await gate.acquire("heavy", 1.0, cost=10)  # straight through: below the bound
    admitted: list[str] = []

    async def request(tenant: str, i: int) -> None:
        await gate.acquire(tenant, 1.0, cost=10)
        admitted.append(f"{tenant}-{i}")

    tasks = [asyncio.create_task(request("heavy", i)) for i in range(10)]
    await settle()
    tasks.append(asyncio.create_task(request("light", 0)))
    await settle()
    assert gate.waiting == 11 and admitted == []
    gate.release("heavy", 1.0, correction=40)  # the first heavy request used 50 tokens in all
    await settle()
    assert admitted == ["light-0"]
    for _ in range(10):
        gate.release(admitted[-1].split("-")[0], 1.0)
        await settle()
    assert admitted == ["light-0"] + [f"heavy-{i}" for i in range(10)]
    await asyncio.gather(*tasks)


async def test_a_request_holds_one_slot_per_sequence_and_is_not_starved_by_small_ones() -> None:
    """Sequences, not requests, are what the gate counts; a big batch waits its turn, then goes (issue 15)."""
    gate = FairGate(max_inflight=4, max_waiting=20, reserve=0)
    assert gate.slots_for(3) == 3 and gate.slots_for(100) == 4 and gate.slots_for(0) == 1
    await gate.acquire("a", 1.0, cost=1, slots=3)
    assert gate.inflight == 3
    started: list[str] = []

    async def request(tenant: str, name: str, slots: int) -> None:
        await gate.acquire(tenant, 1.0, cost=1, slots=slots)
        started.append(name)

    big = asyncio.create_task(request("b", "big", 4))
    await settle()
    assert started == [] and gate.waiting == 1, "4 slots do not fit beside 3"
    small = [asyncio.create_task(request("c", f"small-{i}", 1)) for i in range(3)]
    await settle()
    assert started == [], "smaller requests behind the big one wait for it, they do not starve it"
    gate.release("a", 1.0, slots=3)
    await settle()
    assert started == ["big"] and gate.inflight == 4
    gate.release("b", 1.0, slots=4)
    await settle()
    assert started == ["big", "small-0", "small-1", "small-2"] and gate.inflight == 3
    await asyncio.gather(big, *small)


async def test_gate_answers_503_when_its_queue_is_full_and_forgets_cancelled_waiters() -> None:
    gate = FairGate(max_inflight=1, max_waiting=1)
    await gate.acquire("a", 1.0, cost=1)
    waiter = asyncio.create_task(gate.acquire("b", 1.0, cost=1))
    await settle()
    with pytest.raises(Overloaded):
        await gate.acquire("c", 1.0, cost=1)
    waiter.cancel()
    await settle()
    assert gate.waiting == 0
    gate.release("a", 1.0)
    assert gate.inflight == 0
    await gate.acquire("c", 1.0, cost=1)
    assert gate.inflight == 1


async def test_a_full_queue_sheds_the_flooding_tenants_newest_request_not_a_light_tenants() -> None:
    gate = FairGate(max_inflight=4, max_waiting=16, reserve=0)
    heavy = [asyncio.create_task(gate.acquire("heavy", 1.0, cost=1)) for _ in range(20)]
    await settle()
    assert gate.inflight == 4 and gate.waiting == 16
    with pytest.raises(Overloaded):  # the flooder's own newcomer is refused
        await gate.acquire("heavy", 1.0, cost=1)
    light = [asyncio.create_task(gate.acquire("light", 1.0, cost=1)) for _ in range(5)]
    await settle()
    assert gate.waiting == 16 and gate.queue.waiting_of("light") == 5
    shed = [task for task in heavy if task.done() and task.exception() is not None]
    assert len(shed) == 5 and all(isinstance(task.exception(), Overloaded) for task in shed)
    assert shed == heavy[-5:]  # the newest of the flood
    for _ in range(10):  # as slots free, the two tenants share them (equal counters: they alternate)
        gate.release("heavy", 1.0)
        await settle()
    assert all(task.done() and task.exception() is None for task in light)
    assert gate.queue.waiting_of("heavy") == 6
    for task in heavy:
        task.cancel()
    await settle()


async def acquired_at_once(gate: FairGate, tenant: str, weight: float = 1.0) -> bool:
    """Whether `tenant`'s request gets a slot without waiting (it stays queued otherwise)."""
    task = asyncio.create_task(gate.acquire(tenant, weight, cost=1))
    await settle()
    return task.done()


async def test_a_tenant_alone_may_use_every_slot() -> None:
    gate = FairGate(max_inflight=4, max_waiting=8, reserve=1)
    assert [await acquired_at_once(gate, "solo") for _ in range(5)] == [True] * 4 + [False]


async def test_a_tenant_below_its_share_starts_at_once_while_a_heavy_one_keeps_a_backlog() -> None:
    gate = FairGate(max_inflight=4, max_waiting=20, reserve=1)
    for _ in range(4):
        await gate.acquire("heavy", 1.0, cost=1)  # alone, heavy fills the gate
    backlog = [asyncio.create_task(gate.acquire("heavy", 1.0, cost=1)) for _ in range(10)]
    await settle()
    light = [asyncio.create_task(gate.acquire("light", 1.0, cost=1)) for _ in range(2)]
    await settle()
    for _ in range(2):  # heavy's requests finish: the slots go to light (below its share of 2), not heavy's backlog
        gate.release("heavy", 1.0)
        await settle()
    assert all(task.done() for task in light) and not any(task.done() for task in backlog)
    assert gate.running == {"heavy": 2, "light": 2}
    gate.release("light", 1.0)  # light's request done: heavy, at its share, may not take the reserved slot ...
    await settle()
    assert gate.running == {"heavy": 2, "light": 1}
    assert await acquired_at_once(gate, "light")  # ... so light's next request starts without waiting
    gate.release("light", 1.0)
    gate.release("light", 1.0)  # light has nothing left: heavy alone again, its backlog fills the gate
    await settle()
    assert gate.running == {"heavy": 4} and sum(task.done() for task in backlog) == 2
    for task in backlog:
        task.cancel()
    await asyncio.gather(*backlog, return_exceptions=True)


async def test_shares_follow_the_weights_of_the_busy_tenants() -> None:
    gate = FairGate(max_inflight=8, max_waiting=20, reserve=2)
    gate.weights.update(gold=3.0, bronze=1.0)
    gate.running.update(gold=1, bronze=1)
    assert (gate.share("gold"), gate.share("bronze")) == (6.0, 2.0)
    assert gate.share("newcomer") == 8 / 5  # a newcomer (weight 1) counts itself among the busy


class HeldEngine(FakeHandle):
    """An engine whose requests finish only when the test releases them; records the order they arrive."""

    def __init__(self) -> None:
        self.order: list[str] = []
        self.release = asyncio.Event()

    def _call(
        self, endpoint: Endpoint, body: dict[str, Any], *, adapter: AdapterRecord | None = None, reply_to: Any = None
    ) -> StreamCall:
        self.order.append(body["prompt"])
        return StreamCall(self._answer(body))

    async def _answer(self, body: dict[str, Any]) -> AsyncIterator[ReplicaItem]:
        await self.release.wait()
        self.release.clear()
        yield {"choices": [], "usage": {"prompt_tokens": 20, "completion_tokens": 20}}


async def send(client: Any, key: str, prompt: str) -> int:
    """A completion from `key`; its HTTP status."""
    response = await client.post("/v1/completions", json={"model": BASE, "prompt": prompt}, headers=bearer(key))
    return int(response.status_code)


async def test_router_serves_a_light_tenant_before_a_heavy_tenants_backlog() -> None:
    heavy, heavy_conf = api_key("heavy", base=True)
    light, light_conf = api_key("light", base=True)
    engine = HeldEngine()
    app = make_app(
        [heavy_conf, light_conf],
        engine,
        limiter=LocalRateLimiter(),
        max_inflight=1,
        max_waiting=20,
        public_metrics=True,
    )
    async with client_for(app) as client:
        gate = context_of(app).admitter.gate
        calls = [asyncio.create_task(send(client, heavy, f"heavy-{i}")) for i in range(10)]
        await until(lambda: gate.waiting == 9)
        calls.append(asyncio.create_task(send(client, light, "light-0")))
        await until(lambda: gate.waiting == 10)
        metrics = (await client.get("/metrics")).text
        assert "loraplex_router_waiting 10.0" in metrics and "loraplex_router_inflight 1.0" in metrics
        for served in range(1, 12):
            await until(lambda: len(engine.order) == served)  # noqa: B023 (awaited before the loop moves on)
            engine.release.set()
        assert engine.order[0].startswith("heavy") and engine.order[1] == "light-0"
        assert sorted(await asyncio.gather(*calls)) == [200] * 11
        assert context_of(app).admitter.gate.inflight == 0


async def test_a_light_key_is_served_while_a_heavy_key_floods_the_queue() -> None:
    heavy, heavy_conf = api_key("heavy", base=True)
    light, light_conf = api_key("light", base=True)
    engine = HeldEngine()
    app = make_app([heavy_conf, light_conf], engine, limiter=LocalRateLimiter(), max_inflight=4, max_waiting=16)
    async with client_for(app) as client:
        gate = context_of(app).admitter.gate
        flood = [asyncio.create_task(send(client, heavy, f"heavy-{i}")) for i in range(48)]
        await until(lambda: sum(task.done() for task in flood) == 28)  # 4 at the engine, 16 waiting, 28 refused
        lights = [asyncio.create_task(send(client, light, f"light-{i}")) for i in range(5)]
        await until(lambda: gate.queue.waiting_of("light") == 5)
        while not all(task.done() for task in lights):
            engine.release.set()
            await asyncio.sleep(0.01)
        assert [task.result() for task in lights] == [200] * 5
        while not all(task.done() for task in flood):
            engine.release.set()
            await asyncio.sleep(0.01)
        assert sorted({task.result() for task in flood}) == [200, 503]


async def test_router_answers_503_when_the_fair_queue_is_full() -> None:
    engine = HeldEngine()
    app = make_app([], engine, max_inflight=1, max_waiting=0)
    async with client_for(app) as client:
        first = asyncio.create_task(client.post("/v1/completions", json={"model": BASE, "prompt": "a"}))
        await until(lambda: engine.order == ["a"])
        refused = await client.post("/v1/completions", json={"model": BASE, "prompt": "b"})
        engine.release.set()
        assert (await first).status_code == 200
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["type"] == "overloaded_error"


async def test_a_stream_whose_client_left_before_its_first_byte_still_frees_its_slot() -> None:
    app = make_app([], FakeEngine(lambda *_: ["data: {}\n\n", "data: [DONE]\n\n"]), max_inflight=1)
    body = json.dumps({"model": BASE, "prompt": "x", "stream": True}).encode()
    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
        "method": "POST", "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions",
        "query_string": b"", "root_path": "", "headers": [(b"content-type", b"application/json")],
        "server": ("router", 80), "client": ("tester", 1),
    }  # fmt: skip

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        raise OSError("the client is gone")  # so the server never starts the stream's body

    for _ in range(3):
        with contextlib.suppress(Exception):
            await app(scope, receive, send)
        assert context_of(app).admitter.gate.inflight == 0
