"""Bad input, byte by byte: every JSON route answers 400 or 413 in OpenAI's shape and never reaches an engine.

`BAD_BODIES` holds bodies that any JSON route refuses alike (sent to each of them); `BAD_REQUESTS` holds
what is wrong with one route's fields. `tests/integration/test_bad_input_live.py` replays both tables
against the real stack.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from starlette.types import Message, Receive, Scope, Send

from routing.app import create_app
from routing.body_limit import MAX_BODY_BYTES, BodyLimit
from routing.catalog import ModelCatalog
from routing.protocol import MAX_JSON_DEPTH
from serve.config import RouterConfig
from tests.unit.fake_engine import FakeEngine, FakeRegistry, engine_client, record

BASE = "tiny-base"
COMPLETIONS, CHAT, ADAPTERS = "/v1/completions", "/v1/chat/completions", "/v1/adapters"
JSON_ROUTES = (COMPLETIONS, CHAT, ADAPTERS)
VALID: dict[str, dict[str, Any]] = {
    COMPLETIONS: {"model": BASE, "prompt": "Once upon a time"},
    CHAT: {"model": BASE, "messages": [{"role": "user", "content": "hi"}]},
    ADAPTERS: {"name": "bad-input-probe", "source": "/adapters/bad-input-probe"},
}


@dataclass(frozen=True)
class Raw:
    """Exactly these bytes, with this Content-Type (None: no Content-Type header)."""

    data: bytes
    content_type: str | None = "application/json"


@dataclass(frozen=True)
class Spliced:
    """The route's valid body with raw JSON members added at its end (they win over earlier duplicates)."""

    members: bytes


@dataclass(frozen=True)
class Typed:
    """The route's valid body, sent with this Content-Type (None: no Content-Type header)."""

    content_type: str | None


Payload = Raw | Spliced | Typed | dict[str, Any]
"""A dict is merged into the route's valid body and sent as JSON."""


def request_for(path: str, payload: Payload) -> tuple[bytes, dict[str, str]]:
    """The bytes and headers that `payload` means for the route at `path`."""
    valid = json.dumps(VALID[path]).encode()
    content_type: str | None = "application/json"
    if isinstance(payload, Raw):
        data, content_type = payload.data, payload.content_type
    elif isinstance(payload, Spliced):
        data = valid[:-1] + b", " + payload.members + b"}"
    elif isinstance(payload, Typed):
        data, content_type = valid, payload.content_type
    else:
        data = json.dumps({**VALID[path], **payload}).encode()
    return data, {} if content_type is None else {"content-type": content_type}


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


BAD_BODIES: list[tuple[Payload, int, str | None]] = [
    # not JSON at all, or not all of it
    (Raw(b""), 400, None),
    (Raw(b"{"), 400, None),
    (Raw(b'{"model": "tiny-base", "prompt": "Once upon'), 400, None),
    (Raw(b'{"model": "tiny-base"} trailing'), 400, None),
    (Raw(b"{'model': 'tiny-base'}"), 400, None),
    # JSON, but not an object
    (Raw(b"[]"), 400, None),
    (Raw(b"null"), 400, None),
    (Raw(b'"model"'), 400, None),
    (Raw(b"42"), 400, None),
    # not UTF-8
    (Raw(b'{"model": "\xff"}'), 400, None),
    (Raw(b'{"model": "\xc3\x28"}'), 400, None),
    (Raw(b'{"model": "\xed\xa0\x80"}'), 400, None),  # a surrogate, encoded (CESU-8)
    (Raw('{"model": "tiny-base"}'.encode("utf-16")), 400, None),
    (Raw('{"model": "tiny-base"}'.encode("utf-32")), 400, None),
    # nested past any stack, or past MAX_JSON_DEPTH
    (Raw(nested(100_000)), 400, None),
    (Raw(b'{"a": ' + b"{" * 100_000), 400, None),
    (Spliced(b'"deep": ' + nested(MAX_JSON_DEPTH + 1)), 400, "deep"),
    (Spliced(b'"deep": ' + nested(500)), 400, "deep"),
    # numbers JSON does not have, or Python will not parse
    (Spliced(b'"x": NaN'), 400, "x"),
    (Spliced(b'"x": Infinity'), 400, "x"),
    (Spliced(b'"x": -Infinity'), 400, "x"),
    (Spliced(b'"x": 1e999'), 400, "x"),
    (Spliced(b'"x": {"y": [1, NaN]}'), 400, "x.y.1"),
    (Spliced(b'"x": ' + b"9" * 5000), 400, None),
    # unpaired UTF-16 surrogates, escaped
    (Spliced(b'"x": "\\ud800"'), 400, "x"),
    (Spliced(b'"x": ["fine", "tail \\udfff"]'), 400, "x.1"),
    (Spliced(b'"\\udc00": 1'), 400, None),
    # not declared as JSON
    (Typed(None), 400, None),
    (Typed("text/plain"), 400, None),
    (Typed("application/x-www-form-urlencoded"), 400, None),
    (Typed("multipart/form-data; boundary=x"), 400, None),
    (Typed("application/jsonx"), 400, None),
]  # fmt: skip

BAD_REQUESTS: list[tuple[str, Payload, int, str | None]] = [
    (COMPLETIONS, {"prompt": ["p"] * 257}, 400, "prompt"),  # more sequences than router.max_sequences (256)
    (COMPLETIONS, {"prompt": [[1, 2]] * 129, "n": 2}, 400, "prompt"),  # prompts x n
    (COMPLETIONS, {"model": ""}, 400, "model"),
    (COMPLETIONS, {"model": "m" * 5000}, 400, "model"),
    (COMPLETIONS, {"model": 7}, 400, "model"),
    (COMPLETIONS, {"model": None}, 400, "model"),
    (COMPLETIONS, Spliced(b'"model": "\\ud800"'), 400, "model"),
    (COMPLETIONS, {"max_tokens": 10**30}, 400, "max_tokens"),
    (COMPLETIONS, {"max_tokens": 2**31}, 400, "max_tokens"),
    (COMPLETIONS, {"max_tokens": -1}, 400, "max_tokens"),
    (COMPLETIONS, {"n": 10**30}, 400, "n"),
    (COMPLETIONS, {"seed": 2**64}, 400, "seed"),
    (COMPLETIONS, {"seed": -(2**64)}, 400, "seed"),
    (COMPLETIONS, {"logprobs": 10**30}, 400, "logprobs"),
    (COMPLETIONS, Spliced(b'"temperature": NaN'), 400, "temperature"),
    (COMPLETIONS, Spliced(b'"top_p": Infinity'), 400, "top_p"),
    (COMPLETIONS, {"prompt": [10**30]}, 400, "prompt"),
    (COMPLETIONS, {"prompt": [-1]}, 400, "prompt"),
    (COMPLETIONS, {"prompt": [[1, 2], [3, -4]]}, 400, "prompt"),
    (COMPLETIONS, {"prompt": {"text": "x"}}, 400, "prompt"),
    (COMPLETIONS, Spliced(b'"prompt": "\\ud83d"'), 400, "prompt"),
    (COMPLETIONS, {"stop": ["s"] * 17}, 400, "stop"),
    (COMPLETIONS, {"stop": [1]}, 400, "stop"),
    (CHAT, {"messages": "hi"}, 400, "messages"),
    (CHAT, {"messages": [{"role": ""}]}, 400, "messages.0.role"),
    (COMPLETIONS, {"max_completion_tokens": "x"}, 400, "max_completion_tokens"),
    (COMPLETIONS, {"max_completion_tokens": -5}, 400, "max_completion_tokens"),
    (CHAT, {"messages": [{"role": "user", "content": "a"}, {"role": "wizard"}]}, 400, "messages.1.role"),
    (CHAT, {"messages": [None]}, 400, "messages.0"),
    (CHAT, {"max_completion_tokens": 10**30}, 400, "max_completion_tokens"),
    (CHAT, {"top_logprobs": 10**30, "logprobs": True}, 400, "top_logprobs"),
    (CHAT, Spliced(b'"messages": [{"role": "user", "content": "\\udbff"}]'), 400, "messages.0.content"),
    (ADAPTERS, {"name": ""}, 400, "name"),
    (ADAPTERS, {"name": "n" * 65}, 400, "name"),
    (ADAPTERS, {"name": 7}, 400, "name"),
    (ADAPTERS, {"source": ""}, 400, "source"),
    (ADAPTERS, {"pinned": "maybe"}, 400, "pinned"),
    (ADAPTERS, {"rank": 8}, 400, "rank"),
    (ADAPTERS, Spliced(b'"source": "/adapters/\\ud800"'), 400, "source"),
]  # fmt: skip


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def registry() -> FakeRegistry:
    return FakeRegistry({"a1": record("a1")})


@pytest.fixture
async def client(engine: FakeEngine, registry: FakeRegistry) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(engine_client(engine), ModelCatalog(BASE, registry), RouterConfig())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router.localhost") as client:
        yield client


def assert_openai_error(response: httpx.Response, status: int, param: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param, error
    return dict(error)


@pytest.mark.parametrize("path", JSON_ROUTES)
@pytest.mark.parametrize(("payload", "status", "param"), BAD_BODIES)
async def test_bad_bodies_are_refused_alike_by_every_json_route(
    client: httpx.AsyncClient,
    engine: FakeEngine,
    registry: FakeRegistry,
    path: str,
    payload: Payload,
    status: int,
    param: str | None,
) -> None:
    data, headers = request_for(path, payload)
    assert_openai_error(await client.post(path, content=data, headers=headers), status, param)
    assert engine.requests == []
    assert set(registry.records) == {"a1"}


@pytest.mark.parametrize(("path", "payload", "status", "param"), BAD_REQUESTS)
async def test_bad_fields_are_400_naming_the_field(
    client: httpx.AsyncClient, engine: FakeEngine, path: str, payload: Payload, status: int, param: str | None
) -> None:
    data, headers = request_for(path, payload)
    assert_openai_error(await client.post(path, content=data, headers=headers), status, param)
    assert engine.requests == []


@pytest.mark.parametrize("path", JSON_ROUTES)
def test_every_table_row_is_bad_only_for_its_stated_reason(path: str) -> None:
    """The valid bodies the tables start from are themselves valid JSON objects (so each row tests one thing)."""
    data, headers = request_for(path, {})
    assert json.loads(data) == VALID[path]
    assert headers == {"content-type": "application/json"}


@pytest.mark.parametrize(
    "payload",
    [
        Typed("application/json; charset=utf-8"),
        Typed("Application/JSON"),
        Typed("application/vnd.api+json"),
        Raw(b"\xef\xbb\xbf" + json.dumps(VALID[COMPLETIONS]).encode()),  # a UTF-8 byte-order mark is ignored
        Spliced(b'"user": "\\ud83d\\ude00 paired surrogates are one character"'),
        Spliced(b'"deep": ' + nested(MAX_JSON_DEPTH - 1)),
        {"max_tokens": 2**31 - 1, "seed": -(2**63), "n": 1},
        {"prompt": ["p"] * 32, "n": 8},  # exactly max_sequences
        {"prompt": [1, 2, 3] * 400, "n": 8},  # one long prompt of token ids is one prompt
    ],
)
async def test_good_edge_cases_pass(client: httpx.AsyncClient, engine: FakeEngine, payload: Payload) -> None:
    data, headers = request_for(COMPLETIONS, payload)
    response = await client.post(COMPLETIONS, content=data, headers=headers)
    assert response.status_code == 200, response.text
    if isinstance(payload, Spliced) and b"paired" in payload.members:
        assert engine.requests[-1][1]["user"].startswith("\N{GRINNING FACE}")


# The size limit: one place (routing.body_limit), every route.


@pytest.mark.parametrize("path", JSON_ROUTES)
async def test_body_over_the_limit_is_413(client: httpx.AsyncClient, engine: FakeEngine, path: str) -> None:
    data = json.dumps({**VALID[path], "pad": "x" * MAX_BODY_BYTES}).encode()
    response = await client.post(path, content=data, headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"
    assert engine.requests == []


@pytest.mark.parametrize("path", JSON_ROUTES)
async def test_chunked_body_is_cut_off_at_the_limit(client: httpx.AsyncClient, path: str) -> None:
    """No Content-Length: the body is counted as it arrives and refused before it is all read."""
    sent = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal sent
        while True:
            sent += 64 * 1024
            yield b" " * (64 * 1024)

    response = await client.post(path, content=endless(), headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"
    assert sent <= MAX_BODY_BYTES + 64 * 1024


async def test_chunked_body_under_the_limit_arrives_whole(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    data = json.dumps({**VALID[COMPLETIONS], "pad": "x" * 300_000}).encode()

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(data), 7_000):
            yield data[start : start + 7_000]

    response = await client.post(COMPLETIONS, content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text
    assert engine.requests[-1][1]["pad"] == "x" * 300_000


async def test_streaming_answer_still_follows_a_buffered_body(client: httpx.AsyncClient) -> None:
    response = await client.post(COMPLETIONS, json={**VALID[COMPLETIONS], "stream": True})
    assert response.status_code == 200
    assert response.text.endswith("data: [DONE]\n\n")


class Recorder:
    """An ASGI app that reads its whole body and answers 200, for testing `BodyLimit` alone."""

    def __init__(self) -> None:
        self.body: bytes | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        self.body = b"".join(chunks)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


async def call_limited(
    messages: list[Message], headers: list[tuple[bytes, bytes]], max_bytes: int = 10
) -> tuple[Recorder, list[Message], int]:
    """Runs `BodyLimit(Recorder())` on one request; returns the app, what was sent and how many messages were read."""
    app, sent, read = Recorder(), [], 0

    async def receive() -> Message:
        nonlocal read
        read += 1
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/", "headers": headers}
    await BodyLimit(app, max_bytes=max_bytes)(scope, receive, send)
    return app, sent, read


def body(data: bytes, more: bool = False) -> Message:
    return {"type": "http.request", "body": data, "more_body": more}


async def test_declared_length_over_the_limit_is_refused_without_reading() -> None:
    app, sent, read = await call_limited([body(b"x" * 11)], [(b"content-length", b"11")])
    assert (sent[0]["status"], read, app.body) == (413, 0, None)
    assert json.loads(sent[1]["body"])["error"]["code"] == "payload_too_large"


async def test_body_longer_than_declared_is_still_cut_at_the_limit() -> None:
    chunks = [body(b"x" * 6, more=True), body(b"x" * 6, more=True), body(b"never read")]
    app, sent, read = await call_limited(chunks, [(b"content-length", b"5")])
    assert (sent[0]["status"], read, app.body) == (413, 2, None)


@pytest.mark.parametrize("length", [b"-1", b"abc", b"1e3", b"", b" 5"])
async def test_malformed_content_length_is_400(length: bytes) -> None:
    app, sent, read = await call_limited([body(b"x")], [(b"content-length", length)])
    assert (sent[0]["status"], read, app.body) == (400, 0, None)
    assert set(json.loads(sent[1]["body"])["error"]) == {"message", "type", "param", "code"}


async def test_conflicting_content_lengths_are_400() -> None:
    _, sent, _ = await call_limited([body(b"x")], [(b"content-length", b"1"), (b"content-length", b"2")])
    assert sent[0]["status"] == 400


async def test_content_length_of_thousands_of_digits_is_413_not_a_crash() -> None:
    _, sent, _ = await call_limited([body(b"x")], [(b"content-length", b"9" * 5000)])
    assert sent[0]["status"] == 413


async def test_body_at_the_limit_passes_whole() -> None:
    app, sent, _ = await call_limited([body(b"12345", more=True), body(b"67890")], [(b"content-length", b"0010")])
    assert (sent[0]["status"], app.body) == (200, b"1234567890")


async def test_client_gone_mid_body_gets_no_answer() -> None:
    app, sent, _ = await call_limited([body(b"123", more=True)], [])
    assert (sent, app.body) == ([], None)


async def test_roles_a_chat_template_needs_can_be_allowed_in_config(registry: FakeRegistry) -> None:
    app = create_app(engine_client(), ModelCatalog(BASE, registry), RouterConfig(extra_chat_roles=("ipython",)))
    body = {"model": BASE, "messages": [{"role": "ipython", "content": "42"}]}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router.localhost") as client:
        assert (await client.post("/v1/chat/completions", json=body)).status_code == 200
        body["messages"][0]["role"] = "wizard"
        assert_openai_error(await client.post("/v1/chat/completions", json=body), 400, "messages.0.role")
