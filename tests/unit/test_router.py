"""The router alone, against a fake engine: model resolution, validation, errors, streaming, metrics."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from ray.serve.exceptions import BackPressureError

from routing.app import create_app
from routing.catalog import ModelCatalog
from serve.config import RouterConfig
from serve.wire import LoaderStats, ReplicaReport, Usage, WireError
from tests.unit.fake_engine import FakeEngine, FakeRegistry, engine_client, record

BASE = "tiny-base"
CHAT = {"messages": [{"role": "user", "content": "hi"}]}


def make_client(engine: FakeEngine, registry: FakeRegistry | None = None, **config: Any) -> httpx.AsyncClient:
    registry = registry or FakeRegistry({name: record(name) for name in ("a1", "a2")})
    app = create_app(engine_client(engine), ModelCatalog(BASE, registry), RouterConfig(**config))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router.localhost")


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
async def client(engine: FakeEngine) -> AsyncIterator[httpx.AsyncClient]:
    async with make_client(engine) as client:
        yield client


def assert_openai_error(response: httpx.Response, status: int, param: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    assert error["param"] == param
    return error


async def test_models_lists_base_then_adapters_with_parent(client: httpx.AsyncClient) -> None:
    data = (await client.get("/v1/models")).json()["data"]
    assert [(m["id"], m["parent"]) for m in data] == [
        (BASE, None), (f"{BASE}:a1", BASE), (f"{BASE}:a2", BASE),
    ]  # fmt: skip


@pytest.mark.parametrize("requested", [f"{BASE}:a1", "a1"])
async def test_adapter_id_and_bare_name_reach_the_engine_as_canonical_id(
    client: httpx.AsyncClient, engine: FakeEngine, requested: str
) -> None:
    response = await client.post("/v1/completions", json={"model": requested, "prompt": "x"})
    assert response.status_code == 200
    assert engine.requests[-1][1]["model"] == f"{BASE}:a1"
    assert engine.adapters[-1] == record("a1")
    assert response.json()["model"] == f"{BASE}:a1"


async def test_retrieve_model(client: httpx.AsyncClient) -> None:
    assert (await client.get("/v1/models/a2")).json()["id"] == f"{BASE}:a2"
    assert_openai_error(await client.get("/v1/models/zzz"), 404, "model")


BAD_REQUESTS: list[tuple[str, Any, int, str | None]] = [
    ("/v1/completions", {"model": "nope", "prompt": "x"}, 404, "model"),
    ("/v1/chat/completions", {"model": f"{BASE}:nope", **CHAT}, 404, "model"),
    ("/v1/completions", {"prompt": "x"}, 400, "model"),
    ("/v1/completions", {"model": BASE}, 400, "prompt"),
    ("/v1/completions", {"model": BASE, "prompt": "x", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"model": BASE, "prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"model": BASE, "prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"model": BASE, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"model": BASE, "prompt": "x", "n": 99}, 400, "n"),
    ("/v1/completions", {"model": BASE, "prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ("/v1/completions", {"model": BASE, "prompt": "x", "stream_options": {"include_usage": True}}, 400,
     "stream_options"),
    ("/v1/chat/completions", {"model": BASE, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": BASE, "messages": [{"content": "hi"}]}, 400, "messages.0.role"),
    ("/v1/chat/completions", {"model": BASE, **CHAT, "top_logprobs": 3}, 400, "top_logprobs"),
    ("/v1/chat/completions", [1, 2], 400, None),
]  # fmt: skip


@pytest.mark.parametrize(("path", "payload", "status", "param"), BAD_REQUESTS)
async def test_bad_requests_get_openai_errors(
    client: httpx.AsyncClient, engine: FakeEngine, path: str, payload: Any, status: int, param: str | None
) -> None:
    assert_openai_error(await client.post(path, json=payload), status, param)
    assert engine.requests == []


@pytest.mark.parametrize("raw", [b"{not json", b"\xff\xfe", b'{"model": "x"', b"[" * 100_000])
async def test_unparseable_bodies_are_400(client: httpx.AsyncClient, raw: bytes) -> None:
    response = await client.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert_openai_error(response, 400)


async def test_oversized_body_is_413(client: httpx.AsyncClient) -> None:
    payload = {"model": BASE, "prompt": "x" * (5 * 1024 * 1024)}
    assert_openai_error(await client.post("/v1/completions", json=payload), 413)


async def test_unknown_route_and_method_use_the_error_shape(client: httpx.AsyncClient) -> None:
    assert_openai_error(await client.get("/v1/nothing"), 404)
    not_allowed = await client.get("/v1/completions")
    assert_openai_error(not_allowed, 405)
    assert not_allowed.headers["allow"] == "POST"


async def test_engine_error_passes_through_with_its_status_and_param() -> None:
    error = WireError(status=400, message="prompt too long", type="invalid_request_error", param="prompt")
    async with make_client(FakeEngine(lambda *_: [error])) as client:
        response = await client.post("/v1/completions", json={"model": BASE, "prompt": "x"})
    assert_openai_error(response, 400, "prompt")


async def test_engine_failure_before_answer_is_500_and_router_keeps_serving() -> None:
    calls = iter([[RuntimeError("replica died")], None])
    engine = FakeEngine(lambda e, b: next(calls) or FakeEngine().script(e, b))
    async with make_client(engine) as client:
        assert_openai_error(await client.post("/v1/completions", json={"model": BASE, "prompt": "x"}), 500)
        assert (await client.post("/v1/completions", json={"model": BASE, "prompt": "x"})).status_code == 200


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("path", "body"), [("/v1/completions", {"prompt": "x"}), ("/v1/chat/completions", CHAT)])
async def test_backpressure_is_503_with_retry_after(path: str, body: dict[str, Any], stream: bool) -> None:
    """Engine replicas at capacity: Ray Serve raises `BackPressureError` before any item, for streams too."""
    engine = FakeEngine(lambda *_: [BackPressureError(num_queued_requests=1, max_queued_requests=1)])
    async with make_client(engine) as c:
        response = await c.post(path, json={"model": "a1", **body, "stream": stream})
        metrics = (await c.get("/metrics")).text
    error = assert_openai_error(response, 503)
    assert (error["type"], error["code"]) == ("overloaded_error", "overloaded")
    assert response.headers["retry-after"] == "1"
    assert response.headers["content-type"] == "application/json"
    assert f'model="{BASE}:a1",status="503"' in metrics


async def test_stream_relays_events_and_hides_usage_item(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/completions", json={"model": "a2", "prompt": "x", "stream": True})
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [line for line in response.text.split("\n\n") if line]
    assert events[-1] == "data: [DONE]"
    assert [json.loads(e[6:])["choices"][0]["text"] for e in events[:-1]] == ["a", "b"]


async def test_failure_mid_stream_ends_with_error_event_then_done() -> None:
    def script(endpoint: Any, body: Any) -> list[Any]:
        return ['data: {"choices": []}\n\n', RuntimeError("replica died")]

    async with make_client(FakeEngine(script)) as client:
        response = await client.post("/v1/completions", json={"model": BASE, "prompt": "x", "stream": True})
    events = [line for line in response.text.split("\n\n") if line]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["error"]["type"] == "server_error"


async def test_metrics_count_requests_and_tokens_per_model(client: httpx.AsyncClient) -> None:
    await client.post("/v1/completions", json={"model": "a1", "prompt": "x"})
    await client.post("/v1/completions", json={"model": "a1", "prompt": "x", "stream": True})
    await client.post("/v1/completions", json={"model": "zzz", "prompt": "x"})
    text = (await client.get("/metrics")).text
    a1 = f'model="{BASE}:a1"'
    assert f'loraplex_requests_total{{endpoint="completions",{a1},status="200"}} 2.0' in text
    assert f"loraplex_completion_tokens_total{{{a1}}} 4.0" in text
    assert f"loraplex_prompt_tokens_total{{{a1}}} 6.0" in text
    assert f"loraplex_time_to_first_token_seconds_count{{{a1}}} 1.0" in text
    assert 'loraplex_requests_total{endpoint="completions",model="unknown",status="404"} 1.0' in text


async def test_adapter_labels_are_capped_and_fold_into_other(engine: FakeEngine) -> None:
    async with make_client(engine, max_adapter_labels=1) as client:
        for model in ("a1", "a2", BASE):
            await client.post("/v1/completions", json={"model": model, "prompt": "x"})
        text = (await client.get("/metrics")).text
    assert f'model="{BASE}:a1"' in text
    assert f'model="{BASE}:a2"' not in text
    assert 'model="other"' in text
    assert f'model="{BASE}"' in text


async def test_health(client: httpx.AsyncClient) -> None:
    assert (await client.get("/health")).json() == {"status": "ok"}


async def test_health_shows_a_replicas_recent_adapter_cache_trouble_and_metrics_count_it(engine: FakeEngine) -> None:
    """A node whose disk is full answers new adapters with 503: an operator sees it in /health and /metrics."""
    import time

    stats = LoaderStats(cache_bytes=4096, cache_errors=2, cache_error="no space left", cache_error_at=time.time() - 5)
    registry = FakeRegistry({"a1": record("a1")})
    registry.reports = [ReplicaReport(replica="r1", adapters=(), engine_loras=0, stats=stats)]
    async with make_client(engine, registry) as client:
        health = await client.get("/health")
        text = (await client.get("/metrics")).text
    assert health.status_code == 200
    body = health.json()
    assert body["status"] == "degraded" and "no space left" in body["warnings"][0] and "r1" in body["warnings"][0]
    assert 'loraplex_adapter_cache_errors_total{replica="r1"} 2.0' in text
    assert 'loraplex_adapter_cache_bytes{replica="r1"} 4096.0' in text
    stats.cache_error_at = time.time() - 3600  # long ago: no longer a warning
    async with make_client(engine, registry) as client:
        assert (await client.get("/health")).json() == {"status": "ok"}


def test_usage_item_type_is_plain_data() -> None:
    assert Usage(1, 2) == Usage(prompt_tokens=1, completion_tokens=2)


async def test_metrics_include_replica_reports_and_registry_size(engine: FakeEngine) -> None:
    stats = LoaderStats(hits=5, misses=2, unloads=1)
    stats.observe_load(0.04)
    stats.observe_load(3.0)
    registry = FakeRegistry({"a1": record("a1")})
    registry.reports = [ReplicaReport(replica="r1", adapters=("a1",), engine_loras=1, stats=stats)]
    async with make_client(engine, registry) as client:
        text = (await client.get("/metrics")).text
    assert "loraplex_registry_adapters 1.0" in text
    assert 'loraplex_replica_adapters_loaded{replica="r1"} 1.0' in text
    assert 'loraplex_adapter_cache_hits_total{replica="r1"} 5.0' in text
    assert 'loraplex_adapter_cache_misses_total{replica="r1"} 2.0' in text
    assert 'loraplex_adapter_load_seconds_bucket{le="0.05",replica="r1"} 1.0' in text
    assert 'loraplex_adapter_load_seconds_bucket{le="+Inf",replica="r1"} 2.0' in text
    assert 'loraplex_adapter_load_seconds_count{replica="r1"} 2.0' in text


def test_one_wire_error_maps_status_to_openai_type_in_one_place() -> None:
    """Engine and registry errors are one type; a registry 500 is a server_error (it was invalid_request_error)."""
    from routing.errors import UpstreamError

    assert [WireError(status, "m").type for status in (400, 404, 422, 500, 503)] == [
        "invalid_request_error", "not_found_error", "invalid_request_error", "server_error", "server_error"
    ]  # fmt: skip
    refused = UpstreamError(WireError(500, "the registry could not save its state"))
    assert (refused.status, refused.type, refused.headers()) == (500, "server_error", {})
    busy = UpstreamError(WireError(503, "adapter cache full", retry_after=30))
    assert busy.headers() == {"Retry-After": "30"}
