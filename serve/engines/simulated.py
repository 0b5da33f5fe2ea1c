"""An engine with no model: OpenAI-shaped answers at a set step rate, for the serving path and router tests.

It behaves like vLLM where the serving path can tell: it runs steps, each giving every running sequence
(at most `max_num_seqs`; the rest wait) `tokens_per_step` tokens; a stream's events have vLLM's shape
(completions and chat chunks, `finish_reason`, the usage event, `[DONE]`); adapters are loaded on first
use (taking `adapter_load_ms`) into an LRU of `max_cpu_loras`; closing a request aborts it. llm-d's vLLM
simulator serves the same purpose for its router.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections import OrderedDict, deque
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field, replace
from typing import Any

from serve.config import EngineConfig
from serve.engines.sim_scheduler import Queued, SimScheduler
from serve.slots import SlotPolicy
from serve.tracing import phase
from serve.wire import AdapterRecord, Endpoint, LoaderStats, ReplicaItem, ReplicaReport, Usage, WireError

WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "and", "runs", "far", "away")
_ids = itertools.count(1)


@dataclass
class _Request:
    """One request's sequences (prompts x n) and the events produced for it, not yet taken."""

    endpoint: Endpoint
    stream: bool
    prompt_tokens: int
    max_tokens: int
    choices: int
    head: str
    """The JSON text of every chunk up to its `choices` array."""
    events: deque[str] = field(default_factory=deque)
    produced: list[int] = field(default_factory=list)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    queued: Queued | None = None
    """Its place in the scheduler, from when it is queued."""
    done: bool = False

    def __post_init__(self) -> None:
        self.produced = [0] * self.choices


class SimulatedEngine:
    """Answers in the wire protocol at `EngineConfig.simulated`'s rate; holds no model."""

    def __init__(self, config: EngineConfig) -> None:
        self._config = config
        self._sim = config.simulated
        slots = config.lora_slots(on_cpu=False) if self._sim.lora_slots else None
        wait_s = config.slot_wait_s
        policy = SlotPolicy(wait_s, config.slot_hold_s, config.slot_pause_s) if wait_s is not None else None
        self.scheduler = SimScheduler(config.max_num_seqs, slots, policy)
        self._requests: dict[Queued, _Request] = {}
        self._wake = asyncio.Event()
        self._stepper: asyncio.Task[None] | None = None
        self._adapters: OrderedDict[str, str] = OrderedDict()
        self._capacity = config.max_cpu_loras or config.lora_slots(on_cpu=False)
        self._stats = LoaderStats()

    @property
    def errored(self) -> bool:
        return self._stepper is not None and self._stepper.done()

    async def start(self) -> None:
        self._stepper = asyncio.create_task(self._run())

    async def generate(
        self, endpoint: Endpoint, body: dict[str, Any], adapter: AdapterRecord | None
    ) -> AsyncGenerator[ReplicaItem, None]:
        request = self._request(endpoint, body)
        if isinstance(request, WireError):
            yield request
            return
        if adapter is not None:
            await self._load(adapter)
        wants_usage = request.stream and bool((body.get("stream_options") or {}).get("include_usage"))
        request.queued = Queued(adapter.name if adapter else None, request.choices, arrived=time.monotonic())
        self._requests[request.queued] = request
        self.scheduler.add(request.queued)
        self._wake.set()
        try:
            if not request.stream:
                while not request.done:
                    request.ready.clear()
                    await request.ready.wait()
                yield self._whole(request, body["model"])
                return
            while True:
                if not request.events and not request.done:
                    request.ready.clear()
                    await request.ready.wait()
                while request.events:
                    yield request.events.popleft()
                if request.done:
                    break
            usage = self._usage(request)
            if wants_usage:
                yield self._usage_event(request, usage)
            yield "data: [DONE]\n\n"
            yield usage
        finally:
            self._abort(request)

    def _request(self, endpoint: Endpoint, body: dict[str, Any]) -> _Request | WireError:
        if endpoint not in ("completions", "chat"):
            return WireError(404, f"the simulated engine serves completions and chat, not {endpoint}")
        if endpoint == "completions":
            prompt = body.get("prompt")
            prompts = prompt if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) else [prompt]
            if any(p is None or p == "" for p in prompts):
                return WireError(400, "prompt must not be empty", "prompt")
            prompt_tokens = sum(len(str(p).split()) or 1 for p in prompts)
            limit = body.get("max_tokens")
            kind, prefix = "text_completion", "cmpl"
        else:
            messages = body.get("messages") or []
            if not messages:
                return WireError(400, "messages must not be empty", "messages")
            prompt_tokens = sum(len(str(m.get("content") or "").split()) + 4 for m in messages)
            limit = body.get("max_completion_tokens") or body.get("max_tokens")
            kind, prefix = "chat.completion.chunk", "chatcmpl"
            prompts = [None]
        if prompt_tokens >= self._config.max_model_len:
            return WireError(400, "the prompt is longer than the model's context", "prompt")
        n = int(body.get("n") or 1)
        head = json.dumps({"id": f"{prefix}-sim{next(_ids)}", "object": kind, "created": int(time.time()),
                           "model": body["model"]}, separators=(",", ":"))[:-1]  # fmt: skip
        return _Request(
            endpoint=endpoint,
            stream=bool(body.get("stream")),
            prompt_tokens=prompt_tokens,
            max_tokens=min(int(limit or self._sim.default_max_tokens), self._config.max_model_len - prompt_tokens),
            choices=len(prompts) * n,
            head=head,
        )

    async def _load(self, adapter: AdapterRecord, ahead: bool = False) -> None:
        if self._adapters.get(adapter.name) == adapter.content_hash:
            self._adapters.move_to_end(adapter.name)
            self._stats.hits += 1
            return
        if ahead:
            self._stats.warmed += 1
        else:
            self._stats.misses += 1
        started = time.perf_counter()
        with phase("engine.adapter_load", adapter=adapter.name, version=adapter.version):  # for a traced request
            await asyncio.sleep(self._sim.adapter_load_ms / 1000)
        self._adapters[adapter.name] = adapter.content_hash
        self._stats.observe_load(time.perf_counter() - started)
        while len(self._adapters) > self._capacity:
            self._adapters.popitem(last=False)
            self._stats.evictions += 1

    async def _run(self) -> None:
        """The step loop: admit waiting sequences, give each running one its tokens, wake its reader."""
        step_s = self._sim.step_ms / 1000
        while True:
            if not self._requests:
                self._wake.clear()
                await self._wake.wait()
            started = time.monotonic()
            prefill_s = self._sim.prefill_ms / 1000
            for queued in self.scheduler.schedule(started):
                request = self._requests[queued]
                admitted = queued.admitted_at if queued.admitted_at is not None else started
                if not request.done and started - admitted >= prefill_s:
                    self._step(request)
                if request.done:
                    self.scheduler.remove(queued)
            await asyncio.sleep(max(0.0, started + step_s - time.monotonic()))

    def _step(self, request: _Request) -> None:
        for index in range(request.choices):
            start = request.produced[index]
            count = min(self._sim.tokens_per_step, request.max_tokens - start)
            request.produced[index] = start + count
            if request.stream:
                last = request.produced[index] >= request.max_tokens
                request.events.append(self._chunk(request, index, start, count, last))
        request.done = all(p >= request.max_tokens for p in request.produced)
        request.ready.set()

    def _chunk(self, request: _Request, index: int, start: int, count: int, last: bool) -> str:
        text = json.dumps("".join(" " + WORDS[(start + i) % len(WORDS)] for i in range(count)))
        finish = '"length"' if last else "null"
        if request.endpoint == "completions":
            choice = f'{{"index":{index},"text":{text},"logprobs":null,"finish_reason":{finish},"stop_reason":null}}'
        else:
            role = '"role":"assistant",' if start == 0 else ""
            choice = f'{{"index":{index},"delta":{{{role}"content":{text}}},"logprobs":null,"finish_reason":{finish}}}'
        return f'data: {request.head},"choices":[{choice}]}}\n\n'

    def _whole(self, request: _Request, model: str) -> dict[str, Any]:
        text = "".join(" " + WORDS[i % len(WORDS)] for i in range(request.max_tokens))
        head = json.loads(request.head + "}")
        choices: list[dict[str, Any]]
        if request.endpoint == "completions":
            choices = [{"index": i, "text": text, "logprobs": None, "finish_reason": "length", "stop_reason": None}
                       for i in range(request.choices)]  # fmt: skip
            kind = "text_completion"
        else:
            message = {"role": "assistant", "content": text}
            choices = [{"index": i, "message": message, "logprobs": None, "finish_reason": "length"}
                       for i in range(request.choices)]  # fmt: skip
            kind = "chat.completion"
        usage = self._usage(request)
        return {**head, "object": kind, "model": model, "choices": choices, "usage": _usage_json(usage)}

    def _usage(self, request: _Request) -> Usage:
        return Usage(prompt_tokens=request.prompt_tokens, completion_tokens=sum(request.produced))

    def _usage_event(self, request: _Request, usage: Usage) -> str:
        return f'data: {request.head},"choices":[],"usage":{json.dumps(_usage_json(usage))}}}\n\n'

    def _abort(self, request: _Request) -> None:
        request.done = True
        if request.queued is not None and self._requests.pop(request.queued, None) is not None:
            self.scheduler.remove(request.queued)

    async def check_health(self) -> None:
        if self._stepper is not None and self._stepper.done():
            self._stepper.result()  # raises what stopped the step loop
            raise RuntimeError("the simulated engine's step loop ended")

    def held(self) -> list[str]:
        return sorted(self._adapters)

    def lora_slots(self) -> int | None:
        return self.scheduler.max_loras

    async def warm(self, adapter: AdapterRecord) -> bool:
        if adapter.name not in self._adapters and len(self._adapters) >= self._capacity:
            return False
        if self._adapters.get(adapter.name) != adapter.content_hash:
            await self._load(adapter, ahead=True)
        return True

    async def prefetch(self, adapter: AdapterRecord) -> None:
        if self._adapters.get(adapter.name) != adapter.content_hash:
            await self._load(adapter, ahead=True)

    async def stage(self, adapter: AdapterRecord) -> bool:
        return False  # no node cache: its load time models the whole cold path

    async def forget(self, name: str) -> None:
        if self._adapters.pop(name, None) is not None:
            self._stats.unloads += 1

    async def report(self, replica: str) -> ReplicaReport:
        held = tuple(self.held())
        return ReplicaReport(
            replica=replica,
            adapters=held,
            engine_loras=len(held),
            resident=held,
            stats=replace(self._stats, load_buckets=list(self._stats.load_buckets)),
            running=sum(r.choices for r in self._requests.values() if not r.done),
        )

    def shutdown(self) -> None:
        if self._stepper is not None:
            self._stepper.cancel()


def _usage_json(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    }
