"""No adapter waits behind the popular ones: on the real stack (4 LoRA slots, the slot policy at its defaults), a
rare adapter is answered while four popular adapters keep every slot busy, and every answer, the popular
streams' too (paused and resumed to make room), still equals transformers + PEFT."""

from __future__ import annotations

import asyncio
import shutil
import time

import httpx
import openai

from serve.config import EngineConfig
from serve.demo.reference import Greedy, Reference, assert_close, served_greedy
from tests.integration.conftest import Stack

POPULAR = tuple(f"slot-pop{i}" for i in range(4))  # the stack's 4 slots, each held by one of these
RARE = "slot-rare"
LONG, SHORT = 160, 12
DEFAULTS = EngineConfig(model="/m")
WITHOUT_THE_POLICY_S = 20.0
"""What the rare request would wait without the policy: until a popular stream of LONG tokens ends (longer)."""


def register(stack: Stack, name: str, weights: str) -> None:
    folder = stack.uploads / name
    if not folder.exists():
        shutil.copytree(stack.adapters[weights], folder)
    response = httpx.post(f"{stack.base_url}/v1/adapters", json={"name": name, "source": str(folder)}, timeout=120)
    assert response.status_code in (200, 201), response.text


async def test_a_rare_adapter_is_served_while_popular_ones_hold_every_slot(
    async_client: openai.AsyncOpenAI, stack: Stack, reference: Reference
) -> None:
    for name in POPULAR:
        register(stack, name, "ext-qv")  # four adapters, four slots: copies of one adapter's weights
    register(stack, RARE, "ext-all")
    prompt = reference.chat_prompt("Write a short story about a lighthouse keeper.")
    greedy = {"temperature": 0, "logprobs": 5, "extra_body": {"return_tokens_as_token_ids": True, "ignore_eos": True}}
    first_tokens = [asyncio.Event() for _ in range(2 * len(POPULAR))]

    async def popular(index: int) -> tuple[Greedy, float]:
        model = f"{stack.model_id}:{POPULAR[index % len(POPULAR)]}"
        stream = await async_client.completions.create(
            model=model, prompt=prompt, max_tokens=LONG, stream=True, **greedy
        )
        tokens: list[int] = []
        top: list[set[int]] = []
        async for chunk in stream:
            for choice in chunk.choices:
                if choice.logprobs is None:
                    continue  # the closing chunk
                one = served_greedy(choice)
                tokens += one.tokens
                top += one.top
            first_tokens[index].set()
        return Greedy(tokens, top), time.monotonic()

    streams = [asyncio.create_task(popular(i)) for i in range(len(first_tokens))]
    try:
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in first_tokens)), timeout=120)
        sent = time.monotonic()
        rare = await async_client.completions.create(
            model=f"{stack.model_id}:{RARE}", prompt=prompt, max_tokens=SHORT, **greedy
        )
        answered = time.monotonic()
        results = await asyncio.wait_for(asyncio.gather(*streams), timeout=600)
    finally:
        for task in streams:
            task.cancel()
    # Served while the popular streams still held the slots, within the bound and well before any of them ended.
    assert answered - sent < DEFAULTS.slot_wait_s + DEFAULTS.slot_hold_s + WITHOUT_THE_POLICY_S / 2
    assert all(answered < ended for _, ended in results), "the rare adapter waited for a popular stream to end"
    assert_close(reference.greedy("ext-all", prompt, SHORT), served_greedy(rare.choices[0]), "the rare adapter")
    want = reference.greedy("ext-qv", prompt, LONG)
    for index, (got, _) in enumerate(results):
        assert_close(want, got, f"popular stream {index} (paused and resumed while the rare adapter ran)")
    for name in (*POPULAR, RARE):
        httpx.delete(f"{stack.base_url}/v1/adapters/{name}", timeout=60)
