"""Properties of model-id parsing, request validation and error bodies, for any input Hypothesis finds.

Deterministic (`derandomize`), so a failure reproduces on every run and machine.
"""

from __future__ import annotations

import asyncio
import json
from functools import cache
from typing import Any

import httpx
from fastapi import FastAPI
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from routing.app import create_app
from routing.catalog import ModelCatalog, ModelTarget
from routing.errors import (
    EngineFailure,
    InvalidRequest,
    MethodNotAllowed,
    ModelNotFound,
    OpenAIError,
    Overloaded,
    PayloadTooLarge,
    RouteNotFound,
    error_response,
    sse_error,
)
from routing.protocol import MAX_MODEL_ID_CHARS, Endpoint, parse_body
from serve.config import ADAPTER_NAME_PATTERN, RouterConfig
from tests.unit.fake_engine import FakeRegistry, engine_client, record

BASE = "tiny-base"
ADAPTERS = ("a1", "a2")
MAX_N = 8
deterministic = settings(
    max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)

adapter_names = st.from_regex(ADAPTER_NAME_PATTERN, fullmatch=True)
"""Names the registry accepts."""
json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(st.characters(codec=None), max_size=20)
json_values = st.recursive(
    json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
)
"""Any JSON value, NaN, infinities and lone surrogates included (`json.dumps` writes them all)."""


def catalog(*names: str) -> ModelCatalog:
    return ModelCatalog(BASE, FakeRegistry({name: record(name) for name in names}))


def resolve(model_catalog: ModelCatalog, requested: str) -> ModelTarget | OpenAIError:
    try:
        return asyncio.run(model_catalog.resolve(requested))
    except OpenAIError as exc:
        return exc


# Model ids


model_ids = (
    st.text()
    | st.sampled_from([BASE, *ADAPTERS, *(f"{BASE}:{name}" for name in ADAPTERS)])
    | st.builds(lambda rest: f"{BASE}:{rest}", st.text())
    | st.builds(lambda a, b: f"{a}:{b}", st.sampled_from([BASE, *ADAPTERS]), st.sampled_from([BASE, *ADAPTERS]))
)


@deterministic
@given(model_ids)
@example("")
@example(":")
@example(f"{BASE}:")
@example(f"{BASE}:{BASE}:a1")
@example(f"a1:{BASE}")
def test_any_model_id_resolves_to_a_served_model_or_404(requested: str) -> None:
    outcome = resolve(catalog(*ADAPTERS), requested)
    if isinstance(outcome, OpenAIError):
        assert isinstance(outcome, ModelNotFound)
        assert (outcome.status, outcome.param, outcome.code) == (404, "model", "model_not_found")
        assert requested not in {BASE, *ADAPTERS, *(f"{BASE}:{name}" for name in ADAPTERS)}
    elif outcome.adapter is None:
        assert requested == outcome.id == BASE
    else:
        assert outcome.id == f"{BASE}:{outcome.adapter.name}"
        assert requested in {outcome.adapter.name, outcome.id}


@deterministic
@given(adapter_names)
@example(BASE)
@example("a1")
def test_adapter_ids_round_trip(name: str) -> None:
    served = catalog(name)
    full = served.adapter_id(name)
    assert full == f"{BASE}:{name}"
    by_full_id = resolve(served, full)
    assert isinstance(by_full_id, ModelTarget) and by_full_id.id == full
    assert by_full_id.adapter is not None and by_full_id.adapter.name == name
    by_name = resolve(served, name)
    assert isinstance(by_name, ModelTarget)
    assert by_name.id == (BASE if name == BASE else full)  # the base model's own id wins over a same-named adapter


# Request validation


def check_body(raw: bytes, endpoint: Endpoint) -> dict[str, Any] | OpenAIError:
    """`parse_body`'s contract: a dict, or an `OpenAIError` with 400; never any other exception."""
    try:
        return parse_body(raw, endpoint, max_n=MAX_N).body
    except OpenAIError as exc:
        assert isinstance(exc, InvalidRequest)
        assert exc.status == 400
        return exc


endpoints = st.sampled_from(["completions", "chat"])


@deterministic
@given(st.binary(max_size=200), endpoints)
@example(b"", "completions")
@example(b"\xef\xbb\xbf{}", "chat")
@example(b'{"model": "m", "prompt": "x"}\xff', "completions")
@example(b'{"model": "m", "prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}", "completions")
@example(b'{"model": "m", "prompt": "x", "temperature": NaN}', "completions")
@example(b"[" * 50_000, "chat")
def test_any_bytes_give_a_body_or_a_400(raw: bytes, endpoint: Endpoint) -> None:
    check_body(raw, endpoint)


@deterministic
@given(json_values, endpoints)
def test_any_json_value_gives_a_body_or_a_400(value: Any, endpoint: Endpoint) -> None:
    outcome = check_body(json.dumps(value).encode(), endpoint)
    if isinstance(outcome, dict):
        assert outcome == value
        assert isinstance(outcome["model"], str) and 0 < len(outcome["model"]) <= MAX_MODEL_ID_CHARS


def completion_bodies() -> st.SearchStrategy[dict[str, Any]]:
    prompts = st.text() | st.lists(st.text(), max_size=3) | st.lists(st.integers(0, 2**31 - 1), max_size=5)
    optional = {
        "max_tokens": st.integers(1, 2**31 - 1),
        "temperature": st.floats(0, 2),
        "top_p": st.floats(0, 1, exclude_min=True),
        "n": st.integers(1, MAX_N),
        "seed": st.integers(-(2**63), 2**63 - 1),
        "stop": st.text() | st.lists(st.text(), max_size=16),
        "logprobs": st.integers(0, 20),
        "echo": st.booleans(),
        "user": st.text(),
    }
    return st.fixed_dictionaries(
        {"model": st.text(min_size=1, max_size=MAX_MODEL_ID_CHARS), "prompt": prompts},
        optional=optional,
    )


def chat_bodies() -> st.SearchStrategy[dict[str, Any]]:
    messages = st.lists(
        st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": st.text()}),
        min_size=1,
        max_size=4,
    )
    optional = {
        "max_completion_tokens": st.integers(1, 2**31 - 1),
        "top_logprobs": st.integers(0, 20),
        "stream": st.just(True),
        "tools": st.lists(st.fixed_dictionaries({"type": st.just("function")}), max_size=2),
    }
    bodies = st.fixed_dictionaries({"model": st.sampled_from([BASE, "a1"]), "messages": messages}, optional=optional)
    return bodies.map(lambda b: {**b, "logprobs": True} if "top_logprobs" in b else b)


def utf8_safe(body: dict[str, Any]) -> bool:
    """Generated text may hold lone surrogates, which are rightly refused; the valid-body tests skip them."""
    try:
        json.dumps(body, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return False
    return True


@deterministic
@given(completion_bodies().filter(utf8_safe))
def test_valid_completion_bodies_are_accepted_unchanged(body: dict[str, Any]) -> None:
    assert parse_body(json.dumps(body, ensure_ascii=False).encode(), "completions", max_n=MAX_N).body == body


@deterministic
@given(chat_bodies().filter(utf8_safe))
def test_valid_chat_bodies_are_accepted_unchanged(body: dict[str, Any]) -> None:
    assert parse_body(json.dumps(body).encode(), "chat", max_n=MAX_N).body == body


@deterministic
@given(chat_bodies(), st.data())
def test_truncated_bodies_are_400(body: dict[str, Any], data: st.DataObject) -> None:
    raw = json.dumps(body).encode()
    cut = data.draw(st.integers(0, len(raw) - 1))
    assert isinstance(check_body(raw[:cut], "chat"), InvalidRequest)


# Error bodies


ERROR_TYPES = [InvalidRequest, ModelNotFound, RouteNotFound, MethodNotAllowed, PayloadTooLarge, EngineFailure]


@deterministic
@given(st.sampled_from(ERROR_TYPES), st.text(st.characters(codec=None)), st.none() | st.text(st.characters(codec=None)))
@example(InvalidRequest, "lone \ud800 surrogate", "x\udfff")
def test_error_bodies_are_always_openai_shaped(kind: type[OpenAIError], message: str, param: str | None) -> None:
    error = kind(message, param=param)
    response = error_response(error)
    assert response.status_code == error.status
    assert_error_shape(json.loads(response.body), message, param)
    event, done = sse_error(error).split("\n\n")[:2]
    assert done == "data: [DONE]"
    assert_error_shape(json.loads(event.removeprefix("data: ")), message, param)


@deterministic
@given(st.text(st.characters(codec=None)), st.integers(1, 3600))
def test_overloaded_always_says_when_to_retry(message: str, seconds: int) -> None:
    response = error_response(Overloaded(message, retry_after=seconds))
    assert (response.status_code, response.headers["retry-after"]) == (503, str(seconds))
    assert_error_shape(json.loads(response.body), message, None)


def assert_error_shape(body: Any, message: str, param: str | None) -> None:
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"] == message
    assert body["error"]["param"] == param
    assert isinstance(body["error"]["type"], str) and body["error"]["type"]


# The whole app, over HTTP (schemathesis does this from the OpenAPI schema: tests/unit/test_fuzz_schema.py)


@cache
def app() -> FastAPI:
    registry = FakeRegistry({name: record(name) for name in ADAPTERS})
    return create_app(engine_client(), ModelCatalog(BASE, registry), RouterConfig(max_n=MAX_N))


async def post(path: str, content: bytes, headers: dict[str, str]) -> httpx.Response:
    transport = httpx.ASGITransport(app=app())
    async with httpx.AsyncClient(transport=transport, base_url="http://router.localhost") as client:
        return await client.post(path, content=content, headers=headers)


POST_ROUTES = ["/v1/completions", "/v1/chat/completions", "/v1/adapters", "/v1/load_lora_adapter"]
bodies = (
    json_values.map(lambda value: json.dumps(value).encode())
    | (completion_bodies() | chat_bodies()).map(lambda body: json.dumps(body).encode())
    | st.binary(max_size=100)
)
content_types = st.sampled_from(["application/json", "application/json; charset=utf-8", "text/plain", None])


@deterministic
@given(st.sampled_from(POST_ROUTES), bodies, content_types)
def test_any_post_is_answered_below_500_in_openai_shape(path: str, content: bytes, content_type: str | None) -> None:
    headers = {} if content_type is None else {"content-type": content_type}
    response = asyncio.run(post(path, content, headers))
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        body = response.json()
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    elif path in POST_ROUTES[:2] and response.headers["content-type"].startswith("text/event-stream"):
        assert response.text.endswith("data: [DONE]\n\n")
