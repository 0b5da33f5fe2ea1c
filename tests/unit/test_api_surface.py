"""The router's newer APIs (issue 18): Responses, Anthropic's Messages, and vLLM's tokenizer, under the same keys,
scopes, limits, usage accounting and bad-input rules as completions and chat; Messages' errors in Anthropic's
shape. The engine is faked here; tests/integration/test_api_surface.py runs them through the official SDKs on
the real stack."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from routing.app import create_app
from routing.catalog import ModelCatalog
from serve.config import AuthConfig, RouterConfig
from serve.wire import Endpoint, ReplicaItem, Usage
from tests.unit.fake_engine import FakeEngine, FakeRegistry, engine_client, record
from tests.unit.tenancy import api_key, bearer

BASE = "tiny-base"


def script(endpoint: Endpoint, body: dict[str, Any]) -> list[ReplicaItem | Exception]:
    """What vLLM answers on each API, in its own shapes."""
    if endpoint == "tokenize":
        return [{"count": 7, "max_model_len": 2048, "tokens": list(range(7))}]
    if endpoint == "detokenize":
        return [{"prompt": "hello"}]
    if endpoint == "responses" and not body.get("stream"):
        return [{"object": "response", "model": body["model"], "usage": {"input_tokens": 5, "output_tokens": 3}}]
    if endpoint == "messages" and not body.get("stream"):
        return [{"type": "message", "model": body["model"], "usage": {"input_tokens": 6, "output_tokens": 4}}]
    event = "event: message_delta\ndata: {}\n\n" if endpoint == "messages" else "event: response.created\ndata: {}\n\n"
    return [event, event, Usage(prompt_tokens=6, completion_tokens=2)]


Router = tuple[httpx.AsyncClient, FakeEngine, dict[str, str]]
"""A client of the router app, the fake engine behind it, and API keys by name."""


@pytest.fixture
async def router() -> AsyncIterator[Router]:
    engine = FakeEngine(script=script)
    keys = {name: api_key(name, **scope) for name, scope in {
        "tenant": {"adapters": ["alpha"], "base": True},
        "limited": {"adapters": ["alpha"], "rpm": 2},
        "ops": {"admin": True, "metrics": True, "adapters": ["*"], "base": True},
    }.items()}  # fmt: skip
    config = RouterConfig(auth=AuthConfig(keys=[entry for _, entry in keys.values()]), max_tokens=512)
    registry = FakeRegistry({name: record(name) for name in ("alpha", "beta")})
    app = create_app(engine_client(engine), ModelCatalog(BASE, registry), config)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router.localhost") as client:
        yield client, engine, {name: key for name, (key, _) in keys.items()}


REQUESTS = [
    ("/v1/responses", "responses", {"model": "alpha", "input": "Hi"}),
    ("/v1/messages", "messages", {"model": "alpha", "max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}]}),
    ("/tokenize", "tokenize", {"model": "alpha", "messages": [{"role": "user", "content": "Hi"}]}),
    ("/detokenize", "detokenize", {"model": BASE, "tokens": [1, 2, 3]}),
]


@pytest.mark.parametrize(("path", "endpoint", "body"), REQUESTS)
async def test_each_api_reaches_the_engine_with_the_resolved_model_and_settles_usage(
    router: Router, path: str, endpoint: str, body: dict[str, Any]
) -> None:
    client, engine, keys = router
    answer = await client.post(path, json=body, headers=bearer(keys["tenant"]))
    assert answer.status_code == 200, answer.text
    sent_endpoint, sent = engine.requests[-1]
    assert sent_endpoint == endpoint and sent["model"] == (f"{BASE}:alpha" if body["model"] == "alpha" else BASE)
    if endpoint == "responses":
        assert sent["max_output_tokens"] == 512, "the router's cap is sent as the API's own field"
    metrics = (await client.get("/metrics", headers=bearer(keys["ops"]))).text
    assert f'loraplex_requests_total{{endpoint="{endpoint}"' in metrics


async def test_streams_of_the_newer_apis_are_relayed(router: Router) -> None:
    client, _, keys = router
    for path, body in (("/v1/responses", {"model": "alpha", "input": "Hi", "stream": True}),
                       ("/v1/messages", {"model": "alpha", "max_tokens": 8, "stream": True,
                                         "messages": [{"role": "user", "content": "Hi"}]})):  # fmt: skip
        async with client.stream("POST", path, json=body, headers=bearer(keys["tenant"])) as answer:
            text = "".join([chunk async for chunk in answer.aiter_text()])
        assert answer.status_code == 200 and text.count("event: ") == 2, text


async def test_the_anthropic_sdk_key_header_and_anthropic_shaped_errors_on_messages(
    router: Router,
) -> None:
    client, engine, keys = router
    body = {"model": "alpha", "max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}]}
    assert (await client.post("/v1/messages", json=body, headers={"x-api-key": keys["tenant"]})).status_code == 200
    cases = [
        ({}, body, 401, "authentication_error"),
        ({"x-api-key": keys["tenant"]}, {**body, "model": "beta"}, 403, "permission_error"),
        ({"x-api-key": keys["ops"]}, {**body, "model": "ghost"}, 404, "not_found_error"),
        ({"x-api-key": keys["tenant"]}, {k: v for k, v in body.items() if k != "max_tokens"}, 400,
         "invalid_request_error"),
        ({"x-api-key": keys["tenant"]}, {**body, "temperature": 1.5}, 400, "invalid_request_error"),
    ]  # fmt: skip
    sent = len(engine.requests)
    for headers, payload, status, kind in cases:
        answer = await client.post("/v1/messages", json=payload, headers=headers)
        assert answer.status_code == status, answer.text
        assert answer.json()["type"] == "error" and answer.json()["error"]["type"] == kind
        assert answer.json()["error"]["message"]
    assert len(engine.requests) == sent, "nothing refused reached the engine"
    openai_shaped = await client.post("/v1/responses", json={"model": "beta", "input": "x"},
                                      headers=bearer(keys["tenant"]))  # fmt: skip
    assert openai_shaped.status_code == 403 and openai_shaped.json()["error"]["param"] == "model"


BAD = [
    ("/v1/responses", {"model": "alpha"}, "input"),
    ("/v1/responses", {"model": "alpha", "input": "x", "max_output_tokens": 10_000}, "max_output_tokens"),
    ("/v1/responses", {"model": "alpha", "input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ("/tokenize", {"model": "alpha"}, "prompt"),
    ("/tokenize", {"model": "alpha", "prompt": "x", "messages": [{"role": "user", "content": "y"}]}, "prompt"),
    ("/tokenize", {"model": "alpha", "messages": [{"role": "robot", "content": "y"}]}, "messages.0.role"),
    ("/detokenize", {"model": "alpha", "tokens": []}, "tokens"),
    ("/detokenize", {"model": "alpha", "tokens": [-1]}, "tokens.0"),
]


@pytest.mark.parametrize(("path", "body", "param"), BAD)
async def test_bad_input_is_400_naming_the_field(router: Router, path: str, body: dict[str, Any], param: str) -> None:
    client, engine, keys = router
    answer = await client.post(path, json=body, headers=bearer(keys["tenant"]))
    assert answer.status_code == 400 and answer.json()["error"]["param"] == param, answer.text
    assert not engine.requests


async def test_tokenizer_requests_count_against_the_request_rate(
    router: Router,
) -> None:
    client, _, keys = router
    body = {"model": "alpha", "prompt": "count me"}
    statuses = [(await client.post("/tokenize", json=body, headers=bearer(keys["limited"]))).status_code
                for _ in range(3)]  # fmt: skip
    assert statuses == [200, 200, 429]
