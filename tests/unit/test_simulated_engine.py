"""The simulated engine answers in vLLM's shapes, at its step rate, batching at most max_num_seqs sequences."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from serve.config import EngineConfig
from serve.engines.simulated import SimulatedEngine
from serve.wire import ReplicaItem, Usage, WireError
from tests.unit.fake_engine import record


def engine_config(**simulated: Any) -> EngineConfig:
    return EngineConfig.model_validate(
        {"kind": "simulated", "model": "/models/sim", "max_num_seqs": 4, "simulated": {"step_ms": 5, **simulated}}
    )


@pytest.fixture
async def engine() -> AsyncIterator[SimulatedEngine]:
    sim = SimulatedEngine(engine_config())
    await sim.start()
    yield sim
    sim.shutdown()


async def answer(engine: SimulatedEngine, endpoint: str, body: dict[str, Any]) -> list[ReplicaItem]:
    return [item async for item in engine.generate(endpoint, body, None)]  # type: ignore[arg-type]


def payloads(items: list[ReplicaItem]) -> list[dict[str, Any]]:
    text = "".join(item for item in items if isinstance(item, str))
    assert text.endswith("data: [DONE]\n\n")
    return [json.loads(event.removeprefix("data: ")) for event in text.split("\n\n")[:-2]]


async def test_a_streamed_completion_has_vllms_chunks_usage_and_done(engine: SimulatedEngine) -> None:
    body = {"model": "sim", "prompt": "one two three", "max_tokens": 5, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    items = await answer(engine, "completions", body)
    assert items[-1] == Usage(prompt_tokens=3, completion_tokens=5)
    chunks = payloads(items)
    assert [c["choices"][0]["finish_reason"] for c in chunks[:5]] == [None, None, None, None, "length"]
    assert all(c["object"] == "text_completion" and c["model"] == "sim" for c in chunks)
    assert all(isinstance(c["choices"][0]["text"], str) for c in chunks[:5])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5


async def test_usage_is_sent_to_the_client_only_when_asked(engine: SimulatedEngine) -> None:
    items = await answer(engine, "completions", {"model": "sim", "prompt": "x", "max_tokens": 2, "stream": True})
    assert all("usage" not in chunk for chunk in payloads(items))
    assert items[-1] == Usage(prompt_tokens=1, completion_tokens=2)


async def test_a_streamed_chat_opens_with_the_role_and_parses_as_openai_chunks(engine: SimulatedEngine) -> None:
    body = {"model": "sim", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True, "n": 2}
    chunks = [ChatCompletionChunk.model_validate(c) for c in payloads(await answer(engine, "chat", body))]
    for index in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices[0].index == index]
        assert len(mine) == 3 and mine[0].delta.role == "assistant" and mine[-1].finish_reason == "length"


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
async def test_a_whole_answer_is_one_openai_response(engine: SimulatedEngine, endpoint: str) -> None:
    body = {"model": "sim", "max_tokens": 4, "prompt": "a b", "messages": [{"role": "user", "content": "a"}]}
    [whole] = await answer(engine, endpoint, body)
    assert isinstance(whole, dict)
    parsed = (Completion if endpoint == "completions" else ChatCompletion).model_validate(whole)
    assert parsed.usage is not None and parsed.usage.completion_tokens == 4


async def test_bad_input_is_an_engine_error(engine: SimulatedEngine) -> None:
    [error] = await answer(engine, "chat", {"model": "sim", "messages": []})
    assert isinstance(error, WireError) and error.status == 400 and error.param == "messages"


async def test_steps_run_at_most_max_num_seqs_sequences() -> None:
    sim = SimulatedEngine(engine_config(step_ms=20))
    await sim.start()
    body = {"model": "sim", "prompt": "x", "max_tokens": 3}
    started = time.monotonic()
    await asyncio.gather(*(answer(sim, "completions", body) for _ in range(8)))
    elapsed = time.monotonic() - started
    sim.shutdown()
    # 8 sequences, 4 at a time, 3 steps each: two rounds, 6 steps (5 waits); all 8 at once would take 3.
    assert elapsed >= 5 * 0.02 * 0.95


async def test_closing_a_stream_aborts_its_sequence(engine: SimulatedEngine) -> None:
    items = engine.generate("completions", {"model": "sim", "prompt": "x", "max_tokens": 1000, "stream": True}, None)
    await anext(items)
    await items.aclose()
    await asyncio.sleep(0.02)
    assert (await engine.report("r")).running == 0


async def test_adapters_load_once_into_an_lru_of_max_cpu_loras() -> None:
    sim = SimulatedEngine(EngineConfig.model_validate({"kind": "simulated", "model": "/m", "max_loras": 2}))
    await sim.start()
    body = {"model": "m", "prompt": "x", "max_tokens": 1}
    for name in ("a", "b", "a", "c"):
        [item async for item in sim.generate("completions", body, record(name))]
    report = await sim.report("r")
    sim.shutdown()
    assert sim.held() == ["a", "c"]
    assert (report.stats.misses, report.stats.hits, report.stats.evictions) == (3, 1, 1)
