"""Failures the router and an engine replica must survive, against fakes: a replica that dies before or
while answering, a client that leaves, an engine that dies under its replica, and the drain on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from ray.exceptions import ActorDiedError, ActorUnavailableError
from starlette.types import Message

from routing import engine_client as engine_client_module
from routing import request_router
from routing.app import create_app
from routing.catalog import ModelCatalog
from routing.engine_client import REPLICA_RETRIES
from routing.metrics import RouterMetrics
from serve.config import AppConfig, RouterConfig
from serve.replica import NOT_STARTED_EXIT_S, Replica
from serve.wire import NOT_STARTED, Endpoint, LoaderStats, ReplicaItem, ReplicaReport, WireError
from tests.unit.fake_engine import FakeEngine, FakeRegistry, Script, echo_script, engine_client, record
from tests.unit.test_router import BASE, assert_openai_error

COMPLETION = {"model": BASE, "prompt": "x"}


def router_app(engine: Any) -> FastAPI:
    return create_app(engine_client(engine), ModelCatalog(BASE, FakeRegistry({"a1": record("a1")})), RouterConfig())


def inflight(app: FastAPI) -> int:
    """Fair-share slots held toward the engines: every request must give its slot back."""
    return int(app.state.context.admitter.gate.inflight)


def not_started_first(times: int) -> Script:
    """Replicas whose engine had died (they answer `NOT_STARTED`) `times` times, then a healthy one."""
    calls = 0

    def script(endpoint: Endpoint, body: dict[str, Any]) -> list[ReplicaItem | Exception]:
        nonlocal calls
        calls += 1
        if calls > times:
            return echo_script(endpoint, body)
        return [WireError(503, "not started", code=NOT_STARTED, retry_after=1, replica=f"dead-{calls}")]

    return script


@pytest.fixture(autouse=True)
def no_avoided_replicas(monkeypatch: pytest.MonkeyPatch) -> dict[str, float]:
    avoided: dict[str, float] = {}
    monkeypatch.setattr(request_router, "_avoided", avoided)
    monkeypatch.setattr(engine_client_module, "NOT_STARTED_RETRY_S", 0.0)
    return avoided


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_a_request_no_replica_started_goes_to_another_which_is_preferred(
    stream: bool, no_avoided_replicas: dict[str, float]
) -> None:
    engine = FakeEngine(not_started_first(REPLICA_RETRIES))
    app = router_app(engine)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router.localhost") as client:
        response = await client.post("/v1/completions", json={**COMPLETION, "stream": stream})
        metrics = (await client.get("/metrics")).text
    assert response.status_code == 200
    assert ("data: [DONE]" in response.text) if stream else response.json()["choices"]
    assert len(engine.requests) == REPLICA_RETRIES + 1
    assert set(no_avoided_replicas) == {f"dead-{i + 1}" for i in range(REPLICA_RETRIES)}  # passed over for now
    assert inflight(app) == 0
    assert f'loraplex_requests_total{{endpoint="completions",model="{BASE}",status="200"}} 1.0' in metrics
    assert 'status="500"' not in metrics


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize(
    "error",
    [ActorDiedError(), ActorUnavailableError("unreachable", None)],
    ids=["died", "unavailable"],
)
async def test_a_request_whose_replica_was_lost_while_running_it_is_not_replayed(
    stream: bool, error: Exception
) -> None:
    """Serve's handle resends what a replica never took; once one took it, it may be what killed the replica."""
    engine = FakeEngine(lambda *_: [error])
    app = router_app(engine)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router.localhost") as client:
        response = await client.post("/v1/completions", json={**COMPLETION, "stream": stream})
        metrics = (await client.get("/metrics")).text
    assert_openai_error(response, 500)
    assert "not sent again" in response.json()["error"]["message"]
    assert len(engine.requests) == 1
    assert inflight(app) == 0
    assert f'loraplex_requests_total{{endpoint="completions",model="{BASE}",status="500"}} 1.0' in metrics


async def test_retries_are_bounded_and_the_request_fails_cleanly() -> None:
    engine = FakeEngine(not_started_first(REPLICA_RETRIES + 1))
    app = router_app(engine)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router.localhost") as client:
        response = await client.post("/v1/completions", json=COMPLETION)
        metrics = (await client.get("/metrics")).text
    assert_openai_error(response, 503)
    assert response.json()["error"]["code"] == NOT_STARTED and response.headers["retry-after"] == "1"
    assert "dead-" not in response.text  # the replica's id is the router's business
    assert len(engine.requests) == REPLICA_RETRIES + 1
    assert inflight(app) == 0
    assert f'loraplex_requests_total{{endpoint="completions",model="{BASE}",status="503"}} 1.0' in metrics


async def test_other_engine_failures_are_not_sent_again() -> None:
    engine = FakeEngine(lambda *_: [RuntimeError("bug in the replica")])
    app = router_app(engine)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router.localhost") as client:
        assert_openai_error(await client.post("/v1/completions", json=COMPLETION), 500)
    assert len(engine.requests) == 1


async def test_a_stream_that_already_started_ends_with_an_error_event_and_is_not_sent_again() -> None:
    first = f"data: {json.dumps({'model': BASE, 'choices': [{'index': 0, 'text': 'a'}]})}\n\n"
    engine = FakeEngine(lambda *_: [first, ActorDiedError()])
    app = router_app(engine)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router.localhost") as client:
        response = await client.post("/v1/completions", json={**COMPLETION, "stream": True})
    events = [line for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[0] == first.strip()
    assert json.loads(events[-2].removeprefix("data: "))["error"]["type"] == "server_error"
    assert events[-1] == "data: [DONE]"
    assert len(engine.requests) == 1
    assert inflight(app) == 0


def busy_engine(first: list[ReplicaItem]) -> FakeEngine:
    """Every call answers `first` items, then works until cancelled."""
    return FakeEngine(lambda *_: list(first), endless=True)


async def call_asgi(app: FastAPI, body: dict[str, Any], leaves: Callable[[list[Message]], bool]) -> list[Message]:
    """One POST /v1/completions through the raw ASGI interface; the client disconnects once `leaves(sent)`."""
    data = json.dumps(body).encode()
    sent: list[Message] = []
    left = asyncio.Event()
    body_read = False

    async def receive() -> Message:
        nonlocal body_read
        if not body_read:
            body_read = True
            return {"type": "http.request", "body": data, "more_body": False}
        await left.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)
        if leaves(sent):
            left.set()

    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
        "method": "POST", "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions",
        "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1), "server": ("router", 80),
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())],
    }  # fmt: skip
    await asyncio.wait_for(app(scope, receive, send), timeout=10)
    return sent


async def test_a_client_leaving_mid_stream_cancels_the_engine_call_and_frees_its_slot() -> None:
    first = f"data: {json.dumps({'model': BASE, 'choices': [{'index': 0, 'text': 'a'}]})}\n\n"
    engine = busy_engine([first])
    app = router_app(engine)

    def after_first_event(sent: list[Message]) -> bool:
        return any(m["type"] == "http.response.body" and m.get("body") for m in sent)

    sent = await call_asgi(app, {**COMPLETION, "stream": True}, after_first_event)
    assert sent[0]["status"] == 200
    assert [call.cancelled_by_router for call in engine.calls] == [True]
    assert inflight(app) == 0


async def test_a_client_leaving_before_the_answer_cancels_the_engine_call_and_frees_its_slot() -> None:
    engine = busy_engine([])
    app = router_app(engine)
    request = asyncio.create_task(call_asgi(app, COMPLETION, lambda _: False))
    async with asyncio.timeout(5):
        while not engine.calls:
            await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)  # the router now waits for the first item
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request
    assert [call.cancelled_by_router for call in engine.calls] == [True]
    assert inflight(app) == 0


async def test_a_draining_router_answers_503_to_waiting_and_new_requests() -> None:
    engine = busy_engine([])  # the engines are draining: no replica takes the request
    app = router_app(engine)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router.localhost") as client:
        waiting = asyncio.create_task(client.post("/v1/completions", json=COMPLETION))
        async with asyncio.timeout(5):
            while not engine.calls:
                await asyncio.sleep(0.01)
        app.state.context.draining.set()
        for response in (await waiting, await client.post("/v1/completions", json=COMPLETION)):
            assert_openai_error(response, 503)
            assert response.headers["Retry-After"] == "1"
    assert [call.cancelled_by_router for call in engine.calls] == [True]
    assert inflight(app) == 0


def test_replica_running_requests_are_exported() -> None:
    metrics = RouterMetrics(CollectorRegistry(), max_adapters=4)
    report = ReplicaReport(replica="r1", adapters=(), engine_loras=0, stats=LoaderStats(), running=3)
    metrics.replicas.update([report], registry_size=0)
    assert 'loraplex_replica_running_requests{replica="r1"} 3.0' in metrics.render().decode()


class EngineDied(Exception):
    """Stands for the replica's process ending."""


@dataclass
class ScriptedEngine:
    """An `Engine` whose `generate` plays `answer`; `errored` as the test sets it."""

    answer: Callable[[], AsyncIterator[ReplicaItem]] | None = None
    errored: bool = False
    probes: int = 0

    async def start(self) -> None:
        return None

    def generate(self, *_: Any) -> AsyncIterator[ReplicaItem]:
        assert self.answer is not None
        return self.answer()

    async def check_health(self) -> None:
        self.probes += 1

    def held(self) -> list[str]:
        return []

    def shutdown(self) -> None:
        return None


@pytest.fixture
def replica(monkeypatch: pytest.MonkeyPatch) -> Replica:
    """A `Replica` around a scripted engine, whose exit raises `EngineDied` instead of ending pytest."""
    import serve.replica

    def exit_with_dead_engine() -> None:
        raise EngineDied

    monkeypatch.setattr(serve.replica, "exit_with_dead_engine", exit_with_dead_engine)
    return Replica(ScriptedEngine(), FakeRegistry(), stream_batch_s=0.0)  # type: ignore[arg-type]


async def test_a_replica_whose_engine_is_dead_answers_not_started_then_ends(
    replica: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import serve.replica

    ended = asyncio.Event()
    monkeypatch.setattr(serve.replica, "exit_with_dead_engine", ended.set)
    replica._engine.errored = True
    items = [item async for item in replica.generate("completions", COMPLETION)]
    assert len(items) == 1 and isinstance(items[0], WireError)
    assert (items[0].status, items[0].code, items[0].replica) == (503, NOT_STARTED, f"pid-{os.getpid()}")
    assert not ended.is_set()
    await asyncio.wait_for(ended.wait(), 10 * NOT_STARTED_EXIT_S)
    ended.clear()
    await replica.check_health()  # Serve's health check ends it at once
    assert ended.is_set()


@pytest.mark.parametrize("answer", ["data: {error}\n\n", None], ids=["error-event", "exception"])
async def test_an_engine_dying_during_a_request_ends_the_replica_instead_of_answering(
    replica: Any, answer: str | None
) -> None:
    first_taken = asyncio.Event()

    async def answers_then_dies(*_: Any) -> AsyncIterator[ReplicaItem]:
        yield "data: a\n\n"
        await first_taken.wait()
        replica._engine.errored = True
        if answer is None:
            raise RuntimeError("EngineDeadError")
        yield answer

    replica._engine.answer = answers_then_dies
    items = replica.generate("completions", COMPLETION)
    assert await anext(items) == "data: a\n\n"
    first_taken.set()
    with pytest.raises(EngineDied):
        await anext(items)


async def test_closing_a_request_closes_the_engine_stream_at_once(replica: Any) -> None:
    closed = False

    async def endless(*_: Any) -> AsyncIterator[ReplicaItem]:
        nonlocal closed
        try:
            while True:
                yield "data: a\n\n"
        finally:
            closed = True

    replica._engine.answer = endless
    items = replica.generate("completions", COMPLETION)
    await anext(items)
    await items.aclose()
    assert closed


async def test_health_check_makes_a_round_trip_through_the_engine_core(replica: Any) -> None:
    await replica.check_health()
    assert replica._engine.probes == 1


def test_drain_deletes_the_app_and_waits_for_serve_to_finish(monkeypatch: pytest.MonkeyPatch) -> None:
    from ray import serve

    from serve.cli.main import APP_NAME, drain

    deleted: list[tuple[str, bool]] = []
    statuses = iter([{APP_NAME: "DELETING"}, {APP_NAME: "DELETING"}, {}])
    monkeypatch.setattr(serve, "delete", lambda name, _blocking=True: deleted.append((name, _blocking)))
    monkeypatch.setattr(serve, "status", lambda: SimpleNamespace(applications=next(statuses)))
    config = AppConfig.model_validate({"engine": {"model": "/m"}, "router": {"graceful_shutdown_timeout_s": 5}})
    drain(config, threading.Event())
    assert deleted == [(APP_NAME, False)]
    assert next(statuses, None) is None  # waited until the application was gone


def test_a_second_signal_cuts_the_drain_short(monkeypatch: pytest.MonkeyPatch) -> None:
    from ray import serve

    from serve.cli.main import APP_NAME, drain

    monkeypatch.setattr(serve, "delete", lambda name, _blocking=True: None)
    monkeypatch.setattr(serve, "status", lambda: SimpleNamespace(applications={APP_NAME: "DELETING"}))
    hurry = threading.Event()
    hurry.set()
    drain(AppConfig.model_validate({"engine": {"model": "/m"}}), hurry)  # returns at once


def test_graceful_shutdown_timeouts_reach_both_deployments(tmp_path: Any) -> None:
    from serve.app import build_app

    config = AppConfig.model_validate(
        {
            "engine": {"model": str(tmp_path)},
            "engine_deployment": {"graceful_shutdown_timeout_s": 7},
            "router": {"graceful_shutdown_timeout_s": 9},
        }
    )
    router = build_app(config)._bound_deployment  # binding builds the graph; it starts nothing
    engine = router.init_args[0]._bound_deployment
    assert router._deployment_config.graceful_shutdown_timeout_s == 9
    assert engine._deployment_config.graceful_shutdown_timeout_s == 7
