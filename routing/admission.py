"""Whether a generation request may go now: the key's rate limits, then the fair-share gate.

The router cannot tokenize, so it estimates: prompt text at `CHARS_PER_TOKEN` characters a token,
and the completion at its `max_tokens` (times `n`). Estimates are charged at admission and settled
against the engine's real usage when the response ends (`Admission.finish`), for both the token
buckets and the fair-share counters.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any

from routing.errors import RateLimited
from routing.fairness import FairGate
from routing.principals import Principal
from routing.protocol import prompt_count
from routing.ratelimit import Decision, RateLimiter
from serve.wire import GENERATING, Endpoint

logger = logging.getLogger("loraplex.router")
CHARS_PER_TOKEN = 4
MESSAGE_OVERHEAD_TOKENS = 4
"""Chat templates add a few tokens per message (role markers, separators)."""
DEFAULT_COMPLETION_TOKENS = 256
"""Assumed completion length of a chat request without `max_tokens` when the engine's `max_model_len` is not known
(when `router.max_tokens` is set, the router sends it as the request's `max_tokens`)."""
VLLM_COMPLETIONS_MAX_TOKENS = 16
"""vLLM's `max_tokens` for a `/v1/completions` request that gives none."""
OUTPUT_FIELDS: dict[Endpoint, tuple[str, ...]] = {
    "completions": ("max_tokens",),  # vLLM's completions ignore max_completion_tokens
    "chat": ("max_completion_tokens", "max_tokens"),  # the first one set wins, as in vLLM's ChatCompletionRequest
    "responses": ("max_output_tokens",),  # vLLM's ResponsesRequest reads no other field
    "messages": ("max_tokens",),  # vLLM's Messages serving sends it as both chat fields
}
"""The fields that bound a generation, as each API's vLLM request model reads them."""
RENDERED_FIELDS: dict[Endpoint, tuple[str, ...]] = {
    "completions": ("response_format", "structured_outputs"),
    "chat": ("tools", "functions", "tool_choice", "response_format", "structured_outputs"),
    "responses": ("tools", "tool_choice", "text", "structured_outputs"),
    "messages": ("tools", "tool_choice", "output_config"),
    "tokenize": ("tools",),
}
"""Fields besides the prompt that the engine renders into the prompt or compiles into a grammar, counted by size."""


def estimate_prompt_tokens(endpoint: Endpoint, body: dict[str, Any]) -> int:
    """Prompt tokens of a checked request body, estimated from its characters (token ids are counted): the text the
    engine renders, tool definitions, tool calls and output schemas included (the chat template renders tools into
    the prompt; the grammar compiler reads schemas)."""
    rendered = sum(_text_tokens(body.get(name)) for name in RENDERED_FIELDS.get(endpoint, ()))
    if endpoint in ("chat", "messages") or (endpoint == "tokenize" and body.get("messages")):
        messages = body.get("messages") or []
        system = _text_tokens(body.get("system")) if endpoint == "messages" else 0
        return rendered + system + sum(_message_tokens(message) for message in messages)
    if endpoint == "responses":
        return rendered + _text_tokens(body.get("instructions")) + _text_tokens(body.get("input"))
    if endpoint == "detokenize":
        return len(body.get("tokens") or ())
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
        return rendered + len(prompt)
    if isinstance(prompt, list):
        return rendered + sum(len(p) if isinstance(p, list) else _text_tokens(p) for p in prompt)
    return rendered + _text_tokens(prompt)


def _message_tokens(message: dict[str, Any]) -> int:
    """A chat message: its content, and the tool calls an assistant message carries, which the template renders."""
    calls = message.get("tool_calls") or message.get("function_call")
    return MESSAGE_OVERHEAD_TOKENS + _text_tokens(message.get("content")) + _text_tokens(calls)


def sequences(endpoint: Endpoint, body: dict[str, Any]) -> int:
    """How many sequences a checked request body generates: `n` for each prompt of a completions batch (a
    tokenizer request counts as one request, as it is one)."""
    prompts = prompt_count(body.get("prompt") or "") if endpoint == "completions" else 1
    return prompts * int(body.get("n") or 1)


def estimate_completion_tokens(
    endpoint: Endpoint, body: dict[str, Any], max_model_len: int | None = None, prompt_tokens: int = 0
) -> int:
    """The most completion tokens a request may produce, read as vLLM reads the body: for each choice of each
    prompt, from the field its engine reads (`OUTPUT_FIELDS`): other fields of the body are decoys vLLM ignores.
    Without one, vLLM's completions generate 16 tokens and the other APIs the rest of the context (`max_model_len`
    minus the prompt). The router has checked they are positive integers. Tokenizer requests generate nothing."""
    if endpoint not in GENERATING:
        return 0
    limit = next((body[name] for name in OUTPUT_FIELDS[endpoint] if body.get(name) is not None), None)
    if limit is None and endpoint == "completions":
        limit = VLLM_COMPLETIONS_MAX_TOKENS
    elif limit is None:
        limit = DEFAULT_COMPLETION_TOKENS if max_model_len is None else max(1, max_model_len - prompt_tokens)
    return int(limit) * sequences(endpoint, body)


def _text_tokens(content: Any) -> int:
    """A string, or chat content parts: the text of text parts, anything else by its JSON size."""
    if content is None:
        return 0
    if isinstance(content, list):
        return sum(_text_tokens(part.get("text") if _is_text_part(part) else part) for part in content)
    text = content if isinstance(content, str) else json.dumps(content)
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def _is_text_part(part: Any) -> bool:
    return isinstance(part, dict) and isinstance(part.get("text"), str)


@dataclass
class Admission:
    """One admitted request: it holds its fair-share slots and its estimated tokens until `finish`."""

    admitter: Admitter
    principal: Principal
    prompt_estimate: int
    estimate: int
    slots: int = 1
    finished: bool = field(default=False)

    def finish(self, used_tokens: int | None, relayed_tokens: int = 0) -> None:
        """Frees the slot and settles the estimate with the real usage.

        None: unknown (the client left mid-stream, say): the estimate stays charged, and at least the prompt
        plus the `relayed_tokens` the client was sent, should that be more (a chat without `max_tokens`).
        Idempotent, and safe to call from a finalizer: it never awaits.
        """
        if self.finished:
            return
        self.finished = True
        key = self.principal
        if used_tokens is None:
            correction = relayed_tokens
            extra = self.prompt_estimate + relayed_tokens - self.estimate
        else:
            correction = used_tokens - self.prompt_estimate
            extra = used_tokens - self.estimate
        self.admitter.gate.release(key.name, key.weight, correction, self.slots)
        if key.tpm is not None and extra != 0 and (used_tokens is not None or extra > 0):
            self.admitter.charge_later(key.name, extra)


class Admitter:
    """Rate limits, then the fair-share gate, for one router replica."""

    def __init__(self, limiter: RateLimiter, gate: FairGate, max_model_len: int | None = None) -> None:
        self.limiter = limiter
        self.gate = gate
        self.max_model_len = max_model_len
        """The engine's context length: what vLLM lets a chat request without `max_tokens` generate."""
        self._charges: set[asyncio.Task[None]] = set()

    async def admit(self, key: Principal, endpoint: Endpoint, body: dict[str, Any]) -> Admission:
        """Waits for its slots (one per sequence); raises `RateLimited` (429) or `Overloaded` (503)."""
        prompt = estimate_prompt_tokens(endpoint, body)
        estimate = prompt + estimate_completion_tokens(endpoint, body, self.max_model_len, prompt)
        count = sequences(endpoint, body)
        if key.rpm is not None or key.tpm is not None:
            decision = await self.limiter.admit(key.name, key.rpm, key.tpm, estimate, count)
            if not decision.admitted:
                raise _rate_limited(key, decision, estimate, count)
        slots = self.gate.slots_for(count)
        try:
            await self.gate.acquire(key.name, key.weight, prompt, slots)
        except BaseException:  # 503 or the client left: the tokens were never used
            if key.tpm is not None:
                self.charge_later(key.name, -estimate)
            raise
        return Admission(self, key, prompt, estimate, slots)

    async def admit_read(self, key: Principal) -> None:
        """One request against the key's `rpm` that generates nothing (listings, the console, `/metrics`); raises
        `RateLimited` (429) past it. Read routes take no fair-share slot: they never reach an engine."""
        if key.rpm is None:
            return
        decision = await self.limiter.admit(key.name, key.rpm, None, 0, 1)
        if not decision.admitted:
            raise _rate_limited(key, decision, 0)

    def charge_later(self, key_id: str, tokens: int) -> None:
        """Settles tokens with the limiter in the background, off the response's path."""
        try:
            task = asyncio.get_running_loop().create_task(self.limiter.charge(key_id, tokens))
        except RuntimeError:  # no running loop (a finalizer at shutdown): nothing left to settle for
            return
        self._charges.add(task)
        task.add_done_callback(self._charges.discard)

    async def settled(self) -> None:
        """Waits for background charges (tests and shutdown)."""
        while self._charges:
            await asyncio.gather(*self._charges, return_exceptions=True)


def _rate_limited(key: Principal, decision: Decision, estimate: int, count: int = 1) -> RateLimited:
    retry_after = max(1, math.ceil(decision.retry_after or 1))
    if decision.too_large and decision.limit == "requests":
        message = (
            f"This request generates {count} sequences (prompts x n), each counted as a request: more than the "
            f"{key.rpm} requests per minute key `{key.name}` may make; send fewer prompts or a smaller n."
        )
    elif decision.too_large:
        message = (
            f"This request needs about {estimate} tokens (prompt + max_tokens), more than the {key.tpm} tokens "
            f"per minute key `{key.name}` may use; lower max_tokens or shorten the prompt."
        )
    elif decision.limit == "requests":
        message = f"Rate limit reached for key `{key.name}` on requests per minute (limit {key.rpm}"
        message += f", this request counts as {count})." if count > 1 else ")."
    else:
        message = (
            f"Rate limit reached for key `{key.name}` on tokens per minute (limit {key.tpm}, "
            f"this request needs about {estimate})."
        )
    return RateLimited(f"{message} Retry after {retry_after} s.", retry_after=retry_after)
