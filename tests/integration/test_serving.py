"""The whole stack through the official `openai` client: reference-correct LoRA, streaming, chat, errors."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from serve.demo.reference import Greedy, Reference, assert_close, served_greedy
from tests.integration.conftest import Stack

MAX_TOKENS = 12
PROMPTS = ("What is the capital of France?", "Write a haiku about the sea.")
ADAPTERS = ("ext-qv", "ext-all", "alpha")
TARGETS: tuple[str | None, ...] = (None, *ADAPTERS)


def model_for(stack: Stack, adapter: str | None) -> str:
    return stack.model_id if adapter is None else f"{stack.model_id}:{adapter}"


GREEDY = {"max_tokens": MAX_TOKENS, "temperature": 0, "logprobs": 5}
TOKEN_IDS = {"return_tokens_as_token_ids": True, "ignore_eos": True}


@pytest.mark.parametrize("adapter", TARGETS, ids=lambda a: a or "base")
def test_greedy_output_matches_transformers_peft(
    client: openai.OpenAI, stack: Stack, reference: Reference, adapter: str | None
) -> None:
    for text in PROMPTS:
        prompt = reference.chat_prompt(text)
        response = client.completions.create(
            model=model_for(stack, adapter), prompt=prompt, extra_body=TOKEN_IDS, **GREEDY
        )
        want = reference.greedy(adapter, prompt, MAX_TOKENS)
        assert_close(want, served_greedy(response.choices[0]), f"{adapter or 'base'} on {text!r}")


def test_adapters_change_the_output(client: openai.OpenAI, stack: Stack, reference: Reference) -> None:
    """Guards the reference test against adapters that do nothing."""
    prompt = reference.chat_prompt(PROMPTS[1])
    outputs = {
        adapter: client.completions.create(model=model_for(stack, adapter), prompt=prompt, max_tokens=MAX_TOKENS,
                                           temperature=0).choices[0].text
        for adapter in TARGETS
    }  # fmt: skip
    assert len(set(outputs.values())) == len(TARGETS), outputs


async def test_mixed_concurrent_batch_matches_each_reference(
    async_client: openai.AsyncOpenAI, stack: Stack, reference: Reference
) -> None:
    jobs = [(adapter, reference.chat_prompt(text)) for _ in range(2) for adapter in TARGETS for text in PROMPTS]

    async def run(adapter: str | None, prompt: list[int]) -> Greedy:
        response = await async_client.completions.create(
            model=model_for(stack, adapter), prompt=prompt, extra_body=TOKEN_IDS, **GREEDY
        )
        return served_greedy(response.choices[0])

    served = await asyncio.gather(*(run(adapter, prompt) for adapter, prompt in jobs))
    for (adapter, prompt), got in zip(jobs, served, strict=True):
        assert_close(reference.greedy(adapter, prompt, MAX_TOKENS), got, f"{adapter or 'base'} in a mixed batch")


@pytest.mark.parametrize("adapter", [None, "ext-all"], ids=["base", "adapter"])
def test_completion_stream_equals_non_stream(client: openai.OpenAI, stack: Stack, adapter: str | None) -> None:
    args: dict[str, Any] = {"model": model_for(stack, adapter), "prompt": "Once upon a time", "max_tokens": 16,
                            "temperature": 0}  # fmt: skip
    whole = client.completions.create(**args)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **args))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(chunk.model == args["model"] for chunk in chunks)


def test_chat_stream_equals_non_stream_and_matches_reference(
    client: openai.OpenAI, stack: Stack, reference: Reference
) -> None:
    messages: Any = [{"role": "user", "content": PROMPTS[0]}]
    whole = client.chat.completions.create(model=stack.model_id, messages=messages, max_tokens=24, temperature=0)
    stream = client.chat.completions.create(
        model=stack.model_id, messages=messages, max_tokens=24, temperature=0, stream=True
    )
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert streamed == whole.choices[0].message.content
    greedy = reference.greedy(None, reference.chat_prompt(PROMPTS[0]), 24)
    expected = reference.tokenizer.decode(greedy.tokens, skip_special_tokens=True)
    assert expected.startswith(whole.choices[0].message.content)
    assert whole.choices[0].finish_reason in {"stop", "length"}
    assert whole.usage.prompt_tokens == len(reference.chat_prompt(PROMPTS[0]))


def test_stream_without_usage_request_has_no_usage_chunk(client: openai.OpenAI, stack: Stack) -> None:
    chunks = list(client.completions.create(model="alpha", prompt="Hi", max_tokens=4, temperature=0, stream=True))
    assert chunks and all(chunk.usage is None and chunk.choices for chunk in chunks)


def test_chat_logprobs_stop_n_and_seed(client: openai.OpenAI, stack: Stack) -> None:
    messages: Any = [{"role": "user", "content": "Count from one to ten."}]
    model = f"{stack.model_id}:ext-qv"
    top = client.chat.completions.create(
        model=model, messages=messages, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3
    )
    content = top.choices[0].logprobs.content
    assert len(content) == top.usage.completion_tokens and all(len(t.top_logprobs) == 3 for t in content)

    several = client.chat.completions.create(model=model, messages=messages, max_tokens=8, n=3, temperature=1, seed=7)
    assert [c.index for c in several.choices] == [0, 1, 2]
    again = client.chat.completions.create(model=model, messages=messages, max_tokens=8, n=3, temperature=1, seed=7)
    assert [c.message.content for c in several.choices] == [c.message.content for c in again.choices]

    full = client.completions.create(model=model, prompt="1, 2, 3, 4,", max_tokens=16, temperature=0).choices[0]
    stop_at = full.text.strip().split(",")[1].strip() or ","
    stopped = client.completions.create(model=model, prompt="1, 2, 3, 4,", max_tokens=16, temperature=0, stop=[stop_at])
    assert stopped.choices[0].finish_reason == "stop"
    assert stop_at not in stopped.choices[0].text
    assert full.text.startswith(stopped.choices[0].text)


def test_models_lists_base_and_adapters(client: openai.OpenAI, stack: Stack) -> None:
    models = {model.id: model for model in client.models.list()}
    assert next(iter(models)) == stack.model_id
    assert {stack.model_id, *(f"{stack.model_id}:{name}" for name in stack.adapters)} <= set(models)
    for name in stack.adapters:
        assert models[f"{stack.model_id}:{name}"].model_extra["parent"] == stack.model_id


BAD_REQUESTS: list[tuple[dict[str, Any], type[openai.APIStatusError], str | None]] = [
    ({"model": "no-such-adapter"}, openai.NotFoundError, "model"),
    ({"model": "smol-copy:nope"}, openai.NotFoundError, "model"),
    ({"temperature": -0.5}, openai.BadRequestError, "temperature"),
    ({"top_p": 1.5}, openai.BadRequestError, "top_p"),
    ({"max_tokens": 0}, openai.BadRequestError, "max_tokens"),
    ({"n": 1000}, openai.BadRequestError, "n"),
    ({"max_tokens": 100_000}, openai.BadRequestError, None),  # beyond max_model_len: vLLM's own check
]


@pytest.mark.parametrize(("change", "error", "param"), BAD_REQUESTS)
def test_bad_requests_get_openai_errors(
    client: openai.OpenAI, stack: Stack, change: dict[str, Any], error: type[openai.APIStatusError], param: str | None
) -> None:
    args = {"model": "ext-qv", "prompt": "hello", "max_tokens": 4, **change}
    with pytest.raises(error) as caught:
        client.completions.create(**args)
    body = caught.value.body
    assert isinstance(body, dict) and body["message"]
    if param is not None:
        assert body["param"] == param


@pytest.mark.parametrize(
    ("raw", "status"),
    [(b"{oops", 400), (b"[]", 400), (b'{"model": "smol-copy", "prompt": "x", "max_tokens": 2', 400)],
)
def test_malformed_bodies_are_400_and_server_keeps_serving(
    stack: Stack, client: openai.OpenAI, raw: bytes, status: int
) -> None:
    response = httpx.post(f"{stack.base_url}/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == status
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert client.completions.create(model="alpha", prompt="ok", max_tokens=2).choices[0].text is not None


def test_metrics_have_per_adapter_series(client: openai.OpenAI, stack: Stack) -> None:
    for adapter in TARGETS:
        list(client.completions.create(model=model_for(stack, adapter), prompt="Hi", max_tokens=3, stream=True))
    text = httpx.get(f"{stack.base_url}/metrics").text
    for adapter in TARGETS:
        label = f'model="{model_for(stack, adapter)}"'
        assert f'loraplex_requests_total{{endpoint="completions",{label},status="200"}}' in text
        assert f"loraplex_time_to_first_token_seconds_count{{{label}}}" in text
        assert f"loraplex_completion_tokens_total{{{label}}}" in text
        assert f'loraplex_request_latency_seconds_bucket{{endpoint="completions",le="+Inf",{label}}}' in text


def test_unknown_route_is_openai_shaped(stack: Stack) -> None:
    response = httpx.get(f"{stack.base_url}/v1/engines")
    assert response.status_code == 404
    assert json.loads(response.text)["error"]["type"] == "not_found_error"


def processes_named(comm: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "comm").read_text().strip() == comm:
                found.append(int(entry.name))
        except OSError:
            continue
    return found


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs at least 2 CPUs")
def processes_titled(prefix: str) -> list[int]:
    """Processes whose title (Ray sets it as the command line) starts with `prefix`; `comm` keeps only 15 bytes."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "cmdline").read_bytes().startswith(prefix.encode()):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def test_model_worker_has_cores_of_its_own(stack: Stack) -> None:
    """vLLM's worker must not share the core where `loraplex serve` keeps Ray's processes (it did: 0.8x of vLLM)."""
    workers, routers = processes_named("VLLM::Worker"), processes_titled("ray::ServeReplica:loraplex:LoraplexRouter")
    assert workers and routers
    for worker in workers:
        for router in routers:
            assert not os.sched_getaffinity(worker) & os.sched_getaffinity(router)


def test_the_engine_runs_loraplex_cpu_lora_ops(stack: Stack) -> None:
    """The reference tests above pass with vLLM's own ops too; this shows the worker built loraplex's."""
    from serve.cpu_lora import INSTALLED_MESSAGE

    assert INSTALLED_MESSAGE in stack.log.read_text(errors="replace")
