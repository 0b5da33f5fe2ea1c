"""Per-key rate limits (token buckets, the shared limiter's client) and per-request input limits."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from routing import ratelimit
from routing.admission import estimate_completion_tokens, estimate_prompt_tokens
from routing.ratelimit import ADMITTED, LocalRateLimiter, ServeRateLimiter, SharedRateLimiter, TokenBuckets
from serve.wire import Usage, WireError
from tests.unit.fake_engine import FakeEngine
from tests.unit.tenancy import BASE, api_key, bearer, client_for, context_of, make_app


class Clock:
    """Time that moves only when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_requests_bucket_refills_at_rpm_per_minute() -> None:
    clock = Clock()
    buckets = TokenBuckets(clock)
    assert buckets.admit("k", rpm=2, tpm=None, estimated_tokens=0) == ADMITTED
    assert buckets.admit("k", rpm=2, tpm=None, estimated_tokens=0) == ADMITTED
    refused = buckets.admit("k", rpm=2, tpm=None, estimated_tokens=0)
    assert (refused.retry_after, refused.limit) == (30.0, "requests")
    assert buckets.admit("other", rpm=2, tpm=None, estimated_tokens=0).admitted  # keys do not share buckets
    clock.now += 30
    assert buckets.admit("k", rpm=2, tpm=None, estimated_tokens=0).admitted


def test_tokens_are_estimated_then_settled_with_real_usage() -> None:
    clock = Clock()
    buckets = TokenBuckets(clock)
    assert buckets.admit("k", rpm=None, tpm=600, estimated_tokens=500).admitted
    assert buckets.admit("k", rpm=None, tpm=600, estimated_tokens=200).limit == "tokens"
    buckets.charge("k", -400)  # used 100 of the 500 estimated
    assert buckets.admit("k", rpm=None, tpm=600, estimated_tokens=200).admitted
    buckets.charge("k", 700)  # a request that used far more than estimated puts the key in debt
    refused = buckets.admit("k", rpm=None, tpm=600, estimated_tokens=100)
    assert refused.retry_after == pytest.approx((100 + 400) * 60 / 600)
    buckets.charge("k", -10_000)  # refunds never lift a bucket above its capacity
    assert not buckets.admit("k", rpm=None, tpm=600, estimated_tokens=601).admitted
    too_large = buckets.admit("k", rpm=None, tpm=600, estimated_tokens=601)
    assert too_large.too_large and too_large.retry_after == 60.0


def test_a_lowered_limit_applies_at_once() -> None:
    buckets = TokenBuckets(Clock())
    assert buckets.admit("k", rpm=100, tpm=None, estimated_tokens=0).admitted
    assert buckets.admit("k", rpm=1, tpm=None, estimated_tokens=0).admitted
    assert not buckets.admit("k", rpm=1, tpm=None, estimated_tokens=0).admitted


class FakeHandle:
    """Stands in for a Serve `DeploymentHandle`: `handle.method.remote(...)` is awaitable."""

    def __init__(self, target: Any, fail: bool = False, hang: bool = False) -> None:
        self._target = target
        self._fail = fail
        self._hang = hang

    def __getattr__(self, name: str) -> Any:
        outer = self

        class Method:
            async def remote(self, *args: Any) -> Any:
                if outer._fail:
                    raise RuntimeError("actor died")
                if outer._hang:
                    await asyncio.sleep(3600)  # a limiter that stopped answering
                return await getattr(outer._target, name)(*args)

        return Method()


async def test_serve_client_reaches_the_shared_limiter_and_fails_open() -> None:
    shared = SharedRateLimiter(Clock())
    client = ServeRateLimiter(FakeHandle(shared))
    assert (await client.admit("k", 1, None, 0)).admitted
    assert (await client.admit("k", 1, None, 0)).limit == "requests"
    await client.charge("k", 5)
    broken = ServeRateLimiter(FakeHandle(shared, fail=True))
    assert (await broken.admit("k", 1, None, 0)).admitted
    await broken.charge("k", 5)  # logged, not raised


async def test_a_limiter_that_stops_answering_admits_after_its_timeout_and_is_counted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ratelimit, "LIMITER_TIMEOUT_S", 0.1)
    hung = ServeRateLimiter(FakeHandle(SharedRateLimiter(Clock()), hang=True))
    started = time.monotonic()
    assert (await hung.admit("k", 1, None, 0)).admitted
    await hung.charge("k", 5)
    assert time.monotonic() - started < 2 and hung.unreachable == 2
    key, conf = api_key("limited", base=True, rpm=10)
    app = make_app([conf], FakeEngine(), limiter=hung, public_metrics=True)
    async with client_for(app) as client:
        response = await client.post("/v1/completions", json={"model": BASE, "prompt": "x"}, headers=bearer(key))
        assert response.status_code == 200
        metrics = (await client.get("/metrics")).text
    assert f"loraplex_rate_limiter_unreachable_total {float(hung.unreachable)}" in metrics
    assert hung.unreachable >= 3  # that request's admission too


def usage_script(prompt: int, completion: int) -> Any:
    def script(endpoint: Any, body: dict[str, Any]) -> list[Any]:
        if body.get("stream"):
            return ["data: {}\n\n", "data: [DONE]\n\n", Usage(prompt, completion)]
        return [{"choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": completion}}]

    return script


async def test_429_with_retry_after_once_rpm_is_spent() -> None:
    key, conf = api_key("k", base=True, rpm=2)
    app = make_app([conf], limiter=LocalRateLimiter(Clock()))
    async with client_for(app) as client:
        statuses = [
            (await client.post("/v1/completions", json={"model": BASE, "prompt": "x"}, headers=bearer(key)))
            for _ in range(3)
        ]
    assert [r.status_code for r in statuses] == [200, 200, 429]
    refused = statuses[-1]
    assert refused.headers["retry-after"] == "30"
    error = refused.json()["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
    assert "requests per minute" in error["message"]


@pytest.mark.parametrize("stream", [False, True])
async def test_429_once_tpm_is_spent_counting_real_usage(stream: bool) -> None:
    key, conf = api_key("k", base=True, tpm=100)
    engine = FakeEngine(usage_script(prompt=50, completion=40))
    app = make_app([conf], engine, limiter=LocalRateLimiter(Clock()))
    request = {"model": BASE, "prompt": "x", "max_tokens": 40, "stream": stream}  # estimated 1 + 40 tokens
    async with client_for(app) as client:
        assert (await client.post("/v1/completions", json=request, headers=bearer(key))).status_code == 200
        await context_of(app).admitter.settled()  # real usage, 90 tokens, leaves 10
        refused = await client.post("/v1/completions", json=request, headers=bearer(key))
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "19"  # 31 tokens missing at 100 per minute: 18.6 s
    assert "tokens per minute" in refused.json()["error"]["message"]


async def test_a_request_larger_than_the_whole_tpm_is_429_and_says_why() -> None:
    key, conf = api_key("k", base=True, tpm=100)
    async with client_for(make_app([conf], limiter=LocalRateLimiter(Clock()))) as client:
        request = {"model": BASE, "prompt": "x", "max_tokens": 500}
        refused = await client.post("/v1/completions", json=request, headers=bearer(key))
    assert refused.status_code == 429
    assert "lower max_tokens" in refused.json()["error"]["message"]


class CountingLimiter(LocalRateLimiter):
    """Counts the admissions it is asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    async def admit(self, key_id: str, rpm: int | None, tpm: int | None, estimated_tokens: int) -> Any:
        self.calls += 1
        return await super().admit(key_id, rpm, tpm, estimated_tokens)


async def test_keys_without_limits_never_ask_the_limiter() -> None:
    key, conf = api_key("k", base=True)
    limiter = CountingLimiter()
    async with client_for(make_app([conf], limiter=limiter)) as client:
        for _ in range(5):
            response = await client.post("/v1/completions", json={"model": BASE, "prompt": "x"}, headers=bearer(key))
            assert response.status_code == 200
    assert limiter.calls == 0


@pytest.mark.parametrize(
    ("endpoint", "body", "prompt", "completion"),
    [
        ("completions", {"prompt": "x" * 40, "max_tokens": 8}, 10, 8),
        ("completions", {"prompt": [1, 2, 3], "max_tokens": 8, "n": 2}, 3, 16),
        ("completions", {"prompt": ["abcd", "abcdefgh"], "max_tokens": 8}, 3, 16),
        ("completions", {"prompt": [[1, 2], [3]]}, 3, 32),  # vLLM's completions default: 16 each
        # vLLM reads only max_tokens on /v1/completions: a tiny max_completion_tokens must not hide 200 tokens.
        ("completions", {"prompt": "x", "max_tokens": 200, "max_completion_tokens": 1}, 1, 200),
        ("chat", {"messages": [{"role": "user", "content": "x" * 8}], "max_completion_tokens": 5}, 6, 5),
        ("chat", {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}, 4 + 1, 256),
        # Each API's estimate reads the field its vLLM request model reads; the others are decoys.
        ("responses", {"input": "x", "max_output_tokens": 1000, "max_tokens": 1}, 1, 1000),
        ("responses", {"input": "x", "max_tokens": 1}, 1, 256),  # vLLM: the rest of the context
        (
            "messages",
            {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1000, "max_completion_tokens": 1},
            5,
            1000,
        ),
        (
            "chat",
            {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1000, "max_completion_tokens": 3},
            5,
            3,
        ),
    ],
)
def test_token_estimates(endpoint: Any, body: dict[str, Any], prompt: int, completion: int) -> None:
    assert (estimate_prompt_tokens(endpoint, body), estimate_completion_tokens(endpoint, body)) == (prompt, completion)


RENDERED = [
    ("chat", {"messages": [{"role": "user", "content": "x"}]},
     {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"d": "y" * 4000}}}]}),
    ("chat", {"messages": [{"role": "user", "content": "x"}]},
     {"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {"d": "y" * 4000}}}}),
    ("chat", {"messages": [{"role": "user", "content": "x"}]},
     {"messages": [{"role": "assistant", "content": "x", "tool_calls": [{"id": "y" * 4000}]}]}),
    ("messages", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1},
     {"tools": [{"name": "y" * 4000, "input_schema": {}}]}),
    ("responses", {"input": "x"}, {"text": {"format": {"type": "json_schema", "schema": {"d": "y" * 4000}}}}),
    ("responses", {"input": "x"}, {"tools": [{"type": "function", "name": "f", "parameters": {"d": "y" * 4000}}]}),
    ("tokenize", {"messages": [{"role": "user", "content": "x"}]},
     {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"d": "y" * 4000}}}]}),
]  # fmt: skip


@pytest.mark.parametrize(("endpoint", "body", "extra"), RENDERED)
def test_tools_tool_calls_and_schemas_count_as_prompt(
    endpoint: Any, body: dict[str, Any], extra: dict[str, Any]
) -> None:
    """The chat template renders tools and tool calls into the prompt, and the grammar compiler reads schemas: 4,000
    characters of them are about 1,000 tokens of the estimate."""
    added = estimate_prompt_tokens(endpoint, {**body, **extra}) - estimate_prompt_tokens(endpoint, body)
    assert 1000 <= added <= 1020, added


def test_a_chat_without_max_tokens_is_estimated_at_the_rest_of_the_engines_context() -> None:
    """What vLLM lets it generate (issue 15): not a guess of 256."""
    body = {"messages": [{"role": "user", "content": "x" * 40}]}
    prompt = estimate_prompt_tokens("chat", body)
    assert estimate_completion_tokens("chat", body, max_model_len=2048, prompt_tokens=prompt) == 2048 - prompt
    assert estimate_completion_tokens("chat", {**body, "max_tokens": 7}, max_model_len=2048, prompt_tokens=prompt) == 7
    assert estimate_completion_tokens("chat", {**body, "n": 2}, max_model_len=100, prompt_tokens=prompt) == 2 * (
        100 - prompt
    )
    completions = {"prompt": "x"}  # vLLM's completions default stays 16
    assert estimate_completion_tokens("completions", completions, max_model_len=2048, prompt_tokens=1) == 16


INPUT_LIMITS: list[tuple[str, dict[str, Any], int, str | None]] = [
    ("/v1/completions", {"prompt": "x", "max_tokens": 65}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 65}, 400,
     "max_completion_tokens"),
    ("/v1/completions", {"prompt": "x", "n": 3}, 400, "n"),
    ("/v1/completions", {"prompt": "x" * 3000}, 413, None),
]  # fmt: skip


@pytest.mark.parametrize(("path", "payload", "status", "param"), INPUT_LIMITS)
async def test_input_limits_are_configured_and_name_the_field(
    path: str, payload: dict[str, Any], status: int, param: str | None
) -> None:
    engine = FakeEngine()
    app = make_app([], engine, max_tokens=64, max_n=2, max_body_bytes=2048)
    async with client_for(app) as client:
        response = await client.post(path, json={"model": BASE, **payload})
    assert response.status_code == status
    assert response.json()["error"]["param"] == param
    assert engine.requests == []


async def test_max_tokens_cap_is_sent_when_a_request_gives_none() -> None:
    engine = FakeEngine()
    async with client_for(make_app([], engine, max_tokens=64)) as client:
        await client.post("/v1/completions", json={"model": BASE, "prompt": "x"})
        await client.post("/v1/completions", json={"model": BASE, "prompt": "x", "max_tokens": 3})
    assert [body["max_tokens"] for _, body in engine.requests] == [64, 3]


async def test_a_stream_without_its_usage_is_charged_at_least_what_it_sent() -> None:
    """A chat without max_tokens is admitted on an estimate of 256 completion tokens; vLLM may send far more.
    When the real usage never comes (the client left mid-stream; the replica failed), the key is charged at
    least the tokens relayed, not just the estimate. (httpx's ASGI transport cannot leave a stream early, so
    the stream here ends without its usage, which takes the same path.)"""
    key, conf = api_key("k", base=True, tpm=100_000)
    events = [f'data: {{"choices":[{{"index":0,"delta":{{"content":"t{i}"}}}}]}}\n\n' for i in range(400)]
    limiter = LocalRateLimiter(Clock())
    app = make_app([conf], FakeEngine(lambda *_: list(events)), limiter=limiter)
    body = {"model": BASE, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    async with client_for(app) as client:
        response = await client.post("/v1/chat/completions", json=body, headers=bearer(key))
        assert response.text.count("data: ") == 400
        await context_of(app).admitter.settled()
    spent = 100_000 - limiter._buckets._buckets[("k", "tokens")].level
    assert spent >= 400  # the tokens it was sent, not the 256 it was admitted on


def test_requests_per_minute_count_sequences_not_requests() -> None:
    """A batch of prompts x n is the work of that many requests: it pays for each (issue 15)."""
    buckets = TokenBuckets(Clock())
    assert buckets.admit("k", rpm=10, tpm=None, estimated_tokens=0, requests=4).admitted
    assert buckets.admit("k", rpm=10, tpm=None, estimated_tokens=0, requests=4).admitted
    refused = buckets.admit("k", rpm=10, tpm=None, estimated_tokens=0, requests=4)
    assert (refused.admitted, refused.limit, refused.too_large) == (False, "requests", False)
    alone = buckets.admit("other", rpm=10, tpm=None, estimated_tokens=0, requests=11)
    assert (alone.limit, alone.too_large) == ("requests", True)


async def test_a_completions_batch_is_charged_one_request_per_sequence() -> None:
    key, conf = api_key("k", base=True, rpm=4)
    app = make_app([conf], limiter=LocalRateLimiter(Clock()))
    async with client_for(app) as client:
        batch = {"model": BASE, "prompt": ["a", "b", "c"], "n": 1}
        first = await client.post("/v1/completions", json=batch, headers=bearer(key))
        second = await client.post("/v1/completions", json=batch, headers=bearer(key))
        huge = await client.post(
            "/v1/completions", json={"model": BASE, "prompt": ["a", "b", "c"], "n": 2}, headers=bearer(key)
        )
    assert first.status_code == 200
    assert second.status_code == 429, "3 + 3 sequences are more than 4 requests per minute"
    assert "counts as 3" in second.json()["error"]["message"]
    assert huge.status_code == 429
    assert "6 sequences" in huge.json()["error"]["message"]


async def test_a_chat_without_max_tokens_is_charged_as_the_engine_may_generate() -> None:
    key, conf = api_key("k", base=True, tpm=1000)
    app = make_app([conf], limiter=LocalRateLimiter(Clock()), max_model_len=2048)
    async with client_for(app) as client:
        chat = {"model": BASE, "messages": [{"role": "user", "content": "Hi"}]}
        open_ended = await client.post("/v1/chat/completions", json=chat, headers=bearer(key))
        bounded = await client.post("/v1/chat/completions", json={**chat, "max_tokens": 50}, headers=bearer(key))
    assert open_ended.status_code == 429, "up to 2,042 tokens: more than the key's whole minute"
    assert "lower max_tokens" in open_ended.json()["error"]["message"]
    assert bounded.status_code == 200


async def test_a_decoy_token_field_does_not_hide_a_responses_generation_from_tpm() -> None:
    """vLLM's Responses read only `max_output_tokens`: a `max_tokens` of 1 beside it changes nothing the engine does,
    so it changes nothing the key is charged (issue 34)."""
    key, conf = api_key("k", base=True, tpm=300)
    app = make_app([conf], limiter=LocalRateLimiter(Clock()))
    decoy = {"model": BASE, "input": "Hi", "max_output_tokens": 1000, "max_tokens": 1}
    async with client_for(app) as client:
        refused = await client.post("/v1/responses", json=decoy, headers=bearer(key))
        honest = await client.post("/v1/responses", json={**decoy, "max_output_tokens": 100}, headers=bearer(key))
    assert refused.status_code == 429, refused.text
    assert "lower max_tokens" in refused.json()["error"]["message"]
    assert honest.status_code == 200


STREAMED_TOKENS = [
    ("/v1/responses", {"input": "hi"},
     'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","output_index":0,"delta":"t"}\n\n'),
    ("/v1/messages", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
     'event: content_block_delta\ndata: {"type":"content_block_delta","delta":{"text":"t"}}\n\n'),
]  # fmt: skip


@pytest.mark.parametrize(("path", "body", "event"), STREAMED_TOKENS)
async def test_every_apis_streamed_tokens_are_counted_as_they_are_relayed(
    path: str, body: dict[str, Any], event: str
) -> None:
    """A Responses or Messages stream that ends without its usage (the client left) is charged at least the tokens
    it was sent, as a chat stream is: each API's delta events are counted."""
    key, conf = api_key("k", base=True, tpm=100_000)
    limiter = LocalRateLimiter(Clock())
    app = make_app([conf], FakeEngine(lambda *_: [event] * 400), limiter=limiter)
    async with client_for(app) as client:
        response = await client.post(path, json={"model": BASE, "stream": True, **body}, headers=bearer(key))
        assert response.text.count("data: ") == 400
        await context_of(app).admitter.settled()
    spent = 100_000 - limiter._buckets._buckets[("k", "tokens")].level
    assert spent >= 400, "the tokens it was sent, not just the prompt and the estimate it was admitted on"


async def test_an_engine_refusal_is_charged_the_prompt_it_rendered() -> None:
    """A body the engine renders and tokenizes (tools, schemas: megabytes) and then refuses costs its prompt; only
    the completion it never generated is refunded. A capacity answer (503) is refunded whole."""
    key, conf = api_key("k", base=True, tpm=1_000_000)
    limiter = LocalRateLimiter(Clock())
    answers = iter([WireError(400, "bad tool", "tools"), WireError(503, "busy", retry_after=1)])
    app = make_app([conf], FakeEngine(lambda *_: [next(answers)]), limiter=limiter, max_schema_bytes=1_000_000)
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"description": "y" * 400_000}}}]
    body = {"model": BASE, "messages": [{"role": "user", "content": "x"}], "tools": tools, "max_tokens": 10}
    async with client_for(app) as client:
        refused = await client.post("/v1/chat/completions", json=body, headers=bearer(key))
        await context_of(app).admitter.settled()
        spent = 1_000_000 - limiter._buckets._buckets[("k", "tokens")].level
        busy = await client.post("/v1/chat/completions", json=body, headers=bearer(key))
        await context_of(app).admitter.settled()
    assert (refused.status_code, busy.status_code) == (400, 503)
    assert 100_000 <= spent < 110_000, spent
    assert 1_000_000 - limiter._buckets._buckets[("k", "tokens")].level == pytest.approx(spent, abs=1)
