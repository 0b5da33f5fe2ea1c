"""Tracing: the router's and the engine replica's spans continue the client's `traceparent`, one span per phase.

The real router app runs in-process; its engine handle calls a real `Replica` over the simulated engine, so both
sides' spans (each side with its own tracer, as in two processes) land in one in-memory exporter.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx2
import openai
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import Decision
from opentelemetry.trace import SpanKind, StatusCode

from routing import request_router
from routing.app import create_app
from routing.catalog import ModelCatalog
from serve.config import ApiKeyConfig, AuthConfig, EngineConfig, RouterConfig, TracingConfig
from serve.engines.simulated import SimulatedEngine
from serve.replica import Replica
from serve.wire import AdapterRecord, Endpoint
from serve.wire.sampling import ServerDecides
from serve.wire.tracing import TRACE_KWARG, build_tracer, continued, process_tracer, traces_url
from tests.unit.fake_engine import FakeHandle, FakeRegistry, StreamCall, engine_client, record
from tests.unit.tenancy import api_key, context_of
from tests.unit.test_request_router import FakeReplica, make_router, pending

BASE = "tiny-base"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{CLIENT_SPAN}-01"
CHAT = {"messages": [{"role": "user", "content": "hi there"}], "max_tokens": 3}
ON = TracingConfig(otlp_endpoint="http://127.0.0.1:4318")


class ReplicaHandle(FakeHandle):
    """The engine deployment's handle, calling one in-process `Replica` as Serve would."""

    def __init__(self, replica: Replica) -> None:
        self.replica = replica
        self.traces: list[str | None] = []

    def _call(
        self,
        endpoint: Endpoint,
        body: dict[str, Any],
        *,
        adapter: AdapterRecord | None = None,
        reply_to: Any = None,
        trace: str | None = None,
    ) -> StreamCall:
        self.traces.append(trace)
        return StreamCall(self.replica.generate(endpoint, body, adapter=adapter, reply_to=reply_to, trace=trace))


@pytest.fixture
def spans() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
async def replica(spans: InMemorySpanExporter) -> AsyncIterator[Replica]:
    config = EngineConfig.model_validate(
        {"kind": "simulated", "model": "/models/sim", "simulated": {"step_ms": 2, "adapter_load_ms": 5}}
    )
    replica = Replica(SimulatedEngine(config), None, 0.0, replica_id="r1", tracer=build_tracer(ON, "engine", spans))
    await replica.start()
    yield replica
    replica.__del__()


def router_app(
    replica: Replica,
    spans: InMemorySpanExporter | None,
    keys: list[ApiKeyConfig],
    tracing: TracingConfig = ON,
    **config: Any,
) -> Any:
    handle = ReplicaHandle(replica)
    tracer = build_tracer(tracing, "router", spans) if spans is not None else None
    registry = FakeRegistry({"sql": record("sql")})
    router_config = RouterConfig(auth=AuthConfig(keys=keys), **config)
    app = create_app(engine_client(handle), ModelCatalog(BASE, registry), router_config, tracer=tracer)  # type: ignore[arg-type]
    app.state.handle = handle
    return app


def openai_client(app: Any, key: str) -> openai.AsyncOpenAI:
    """The official SDK, sending the client's `traceparent` on every request, to the app in-process."""
    transport = httpx2.ASGITransport(app=app)
    return openai.AsyncOpenAI(
        api_key=key,
        base_url="http://router.localhost/v1",
        max_retries=0,
        default_headers={"traceparent": TRACEPARENT},
        http_client=httpx2.AsyncClient(transport=transport, base_url="http://router.localhost"),
    )


def by_name(spans: InMemorySpanExporter) -> dict[str, ReadableSpan]:
    finished = spans.get_finished_spans()
    named = {span.name: span for span in finished}
    assert len(named) == len(finished), [span.name for span in finished]
    return named


def trace_id(span: ReadableSpan) -> str:
    return f"{span.context.trace_id:032x}"


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def service(span: ReadableSpan) -> Any:
    return span.resource.attributes["service.name"]


@pytest.mark.parametrize("stream", [False, True])
async def test_a_request_is_one_trace_from_the_clients_traceparent_to_the_engine(
    replica: Replica, spans: InMemorySpanExporter, stream: bool
) -> None:
    key, entry = api_key("team", adapters=["sql"])
    async with openai_client(router_app(replica, spans, [entry]), key) as client:
        if stream:
            chunks = await client.chat.completions.create(model="sql", stream=True, **CHAT)  # type: ignore[call-overload]
            assert len([chunk async for chunk in chunks]) == 3
        else:
            answer = await client.chat.completions.create(model="sql", **CHAT)  # type: ignore[call-overload]
            assert answer.usage.completion_tokens == 3

    named = by_name(spans)
    assert set(named) == {
        "POST /v1/chat/completions", "router.auth", "router.admission",
        "engine.generate", "engine.queue", "engine.adapter_load",
    }  # fmt: skip
    assert {trace_id(span) for span in named.values()} == {TRACE_ID}
    server = named["POST /v1/chat/completions"]
    assert server.kind == SpanKind.SERVER and parent_of(server) == int(CLIENT_SPAN, 16)
    assert server.parent is not None and server.parent.is_remote
    for child in ("router.auth", "router.admission", "engine.generate"):
        assert parent_of(named[child]) == server.context.span_id, child
    generate = named["engine.generate"]
    assert parent_of(named["engine.queue"]) == generate.context.span_id
    assert parent_of(named["engine.adapter_load"]) == named["engine.queue"].context.span_id
    assert {service(server), service(generate)} == {"loraplex-router", "loraplex-engine"}

    assert server.attributes is not None and generate.attributes is not None
    assert dict(server.attributes) == {
        "http.request.method": "POST", "http.route": "/v1/chat/completions", "http.response.status_code": 200,
        "loraplex.endpoint": "chat", "loraplex.key": "team", "gen_ai.request.model": f"{BASE}:sql",
        "loraplex.adapter": "sql", "gen_ai.usage.input_tokens": 6, "gen_ai.usage.output_tokens": 3,
    }  # fmt: skip
    assert named["router.auth"].attributes == {"loraplex.key": "team"}
    assert dict(generate.attributes) == {
        "loraplex.endpoint": "chat", "loraplex.adapter": "sql", "loraplex.replica": "r1", "loraplex.finish": "ok",
        "gen_ai.usage.input_tokens": 6, "gen_ai.usage.output_tokens": 3,
    }  # fmt: skip
    assert [event.name for event in generate.events] == (["first token"] if stream else [])
    assert named["engine.queue"].end_time <= generate.end_time <= server.end_time  # type: ignore[operator]


async def test_a_request_without_a_valid_key_makes_no_span(replica: Replica, spans: InMemorySpanExporter) -> None:
    _, entry = api_key("team", adapters=["sql"])
    app = router_app(replica, spans, [entry])
    async with openai_client(app, "lpx-wrong") as client:
        with pytest.raises(openai.AuthenticationError):
            await client.chat.completions.create(model="sql", **CHAT)  # type: ignore[call-overload]
        with pytest.raises(openai.AuthenticationError):
            await client.models.list()
    transport = httpx2.ASGITransport(app=app)
    async with httpx2.AsyncClient(transport=transport, base_url="http://router.localhost") as keyless:
        answer = await keyless.post("/v1/completions", json={"model": BASE}, headers={"traceparent": TRACEPARENT})
        assert answer.status_code == 401
    assert spans.get_finished_spans() == ()  # not even `router.auth`: nothing written into the client's trace
    assert app.state.handle.traces == []


async def test_a_rate_limited_request_is_a_traced_429_that_failed_in_admission(
    replica: Replica, spans: InMemorySpanExporter
) -> None:
    key, entry = api_key("team", adapters=["sql"], rpm=1)
    app = router_app(replica, spans, [entry])
    async with openai_client(app, key) as client:
        await client.chat.completions.create(model="sql", **CHAT)  # type: ignore[call-overload]
        spans.clear()
        with pytest.raises(openai.RateLimitError):
            await client.chat.completions.create(model="sql", **CHAT)  # type: ignore[call-overload]
    named = by_name(spans)
    assert set(named) == {"POST /v1/chat/completions", "router.auth", "router.admission"}
    server, admission = named["POST /v1/chat/completions"], named["router.admission"]
    assert parent_of(admission) == server.context.span_id and trace_id(admission) == TRACE_ID
    assert admission.status.status_code == StatusCode.ERROR
    assert [event.name for event in admission.events] == ["exception"]
    assert server.attributes is not None and server.attributes["http.response.status_code"] == 429
    assert len(app.state.handle.traces) == 1  # the refused request never reached the engine


async def test_the_replica_continues_the_router_span_it_was_sent(replica: Replica, spans: InMemorySpanExporter) -> None:
    key, entry = api_key("team", base=True)
    app = router_app(replica, spans, [entry])
    async with openai_client(app, key) as client:
        await client.completions.create(model=BASE, prompt="one two", max_tokens=2)
    server = by_name(spans)["POST /v1/completions"]
    assert app.state.handle.traces == [f"00-{TRACE_ID}-{server.context.span_id:016x}-01"]


@pytest.mark.parametrize(("ratio", "flag", "traced"), [(1.0, "00", True), (0.0, "01", False)])
async def test_the_router_decides_sampling_whatever_the_clients_flag_says(
    replica: Replica, spans: InMemorySpanExporter, ratio: float, flag: str, traced: bool
) -> None:
    key, entry = api_key("team", base=True)
    tracing = TracingConfig(otlp_endpoint="http://127.0.0.1:4318", sample_ratio=ratio)
    app = router_app(replica, spans, [entry], tracing)
    async with openai_client(app, key) as client:
        await client.completions.create(
            model=BASE, prompt="x", max_tokens=2, extra_headers={"traceparent": TRACEPARENT[:-2] + flag}
        )
    if not traced:
        assert spans.get_finished_spans() == ()
        assert app.state.handle.traces == [None]
        return
    named = by_name(spans)
    assert {trace_id(span) for span in named.values()} == {TRACE_ID}  # an authenticated client's trace, joined
    assert "engine.generate" in named and app.state.handle.traces[0] is not None


@pytest.mark.parametrize(
    ("kind", "parent_flag", "draw", "sampled"),
    [(SpanKind.SERVER, "01", 0.7, False), (SpanKind.SERVER, "00", 0.3, True), (SpanKind.SERVER, None, 0.7, False),
     (SpanKind.INTERNAL, None, 0.0, False), (SpanKind.INTERNAL, "01", 0.9, True),
     (SpanKind.INTERNAL, "00", 0.0, False)],
)  # fmt: skip
def test_the_routers_sampler_draws_for_server_spans_and_children_follow(
    kind: SpanKind, parent_flag: str | None, draw: float, sampled: bool
) -> None:
    sampler = ServerDecides(0.5, draw=lambda: draw)
    parent = continued({"traceparent": f"00-{'0' * 31}1-{CLIENT_SPAN}-{parent_flag}"}) if parent_flag else None
    result = sampler.should_sample(parent, trace_id=1, name="span", kind=kind)  # trace id 1: under any ratio
    assert (result.decision == Decision.RECORD_AND_SAMPLE) == sampled


async def test_with_tracing_off_no_tracer_middleware_or_trace_exists(replica: Replica) -> None:
    assert build_tracer(TracingConfig(), "router") is None
    assert process_tracer(TracingConfig(), "engine") is None
    key, entry = api_key("team", base=True)
    app = router_app(replica, None, [entry])
    assert context_of(app).tracer is None
    assert [m.cls.__name__ for m in app.user_middleware] == ["BodyLimit"]
    async with openai_client(app, key) as client:
        answer = await client.completions.create(model=BASE, prompt="x", max_tokens=2)
    assert answer.usage is not None and answer.usage.completion_tokens == 2
    assert app.state.handle.traces == [None]  # nothing travels to the replica


async def test_the_replica_choice_is_a_span_in_the_requests_trace(
    spans: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        request_router, "process_tracer", lambda config, component: build_tracer(config, component, spans)
    )
    router = make_router({"r1": 1, "r2": 1})
    router.initialize_state(epsilon=0.25, tracing=ON.model_dump())
    replicas = [FakeReplica("r1", {"adapters": ["sql"]}), FakeReplica("r2")]
    traced = pending("sql")
    traced.kwargs[TRACE_KWARG] = TRACEPARENT
    await router.choose_replicas(replicas, traced)  # type: ignore[arg-type]
    await router.choose_replicas(replicas, pending("sql"))  # type: ignore[arg-type]  # not traced: no span
    (choice,) = spans.get_finished_spans()
    assert choice.name == "router.replica_choice" and trace_id(choice) == TRACE_ID
    assert parent_of(choice) == int(CLIENT_SPAN, 16)
    assert dict(choice.attributes or {}) == {
        "loraplex.adapter": "sql", "loraplex.replica.candidates": 2,
        "loraplex.replica": "r1", "loraplex.replica.holds_adapter": True,
    }  # fmt: skip


def test_the_config_turns_tracing_on_with_an_endpoint_only() -> None:
    assert not TracingConfig().enabled and ON.enabled
    assert traces_url("http://c:4318") == traces_url("http://c:4318/v1/traces/") == "http://c:4318/v1/traces"
    with pytest.raises(ValueError, match="otlp_endpoint"):
        TracingConfig(otlp_endpoint="collector:4318")
    with pytest.raises(ValueError):
        TracingConfig(otlp_endpoint="http://c:4318", sample_ratio=1.5)
