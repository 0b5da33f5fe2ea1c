"""The engine replica's spans for one traced request: the whole generation, its queue and adapter load, its end.

A request the router traced arrives with its `traceparent` (`serve.wire.tracing`); the replica then wraps the
engine's stream in `traced_generation`. Untraced requests (tracing off, or not sampled) are not wrapped at all:
they pay nothing here. Traced ones get spans per phase, never per token: the stream's items pass through one
generator step each, and only the first and the last are looked at.

`engine.queue` runs from the request's arrival to the engine's first output: adapter loading, waiting for a
batch slot and prefill. Engines mark their adapter loads with `phase`, which finds the request's tracer in the
context the engine's first step runs in, so engines need no tracer of their own.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import AbstractContextManager, aclosing, nullcontext
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer, set_span_in_context

from serve.wire import ReplicaItem, Usage, WireError
from serve.wire.tracing import TRACEPARENT, continued

_TRACER_KEY = otel_context.create_key("loraplex.tracer")
"""Where the request's tracer sits in the context of its engine's first step."""
_NO_SPAN: AbstractContextManager[None] = nullcontext()


def phase(name: str, **attributes: str | int | bool) -> AbstractContextManager[Span | None]:
    """A span for a phase of the traced request whose engine step this is (`engine.adapter_load`, say), a child
    of its queue span; nothing outside a traced request."""
    tracer = otel_context.get_value(_TRACER_KEY)
    if not isinstance(tracer, Tracer):
        return _NO_SPAN
    return tracer.start_as_current_span(name, attributes=attributes)


async def traced_generation(
    tracer: Tracer, traceparent: str, stream: AsyncIterator[ReplicaItem], attributes: dict[str, str]
) -> AsyncGenerator[ReplicaItem, None]:
    """`stream` in an `engine.generate` span continuing `traceparent`: an `engine.queue` child up to the first item
    (a `first token` event when it starts a stream), then the outcome, status and token counts when it ends.

    Closing this closes `stream` at once (the engine aborts the request), as closing `stream` would.
    """
    span = tracer.start_span(
        "engine.generate", context=continued({TRACEPARENT: traceparent}), kind=SpanKind.SERVER, attributes=attributes
    )
    generating = set_span_in_context(span)
    queue = tracer.start_span("engine.queue", context=generating)
    queued = True
    outcome = "cancelled"  # unless the stream ends or fails: the router closed it (the client left)
    try:
        async with aclosing(stream):  # type: ignore[type-var]
            # The engine's first step (adapter load, admission, prefill) runs in the queue span's context; attached
            # and detached within one step of this generator, so the context never leaks to the caller.
            token = otel_context.attach(otel_context.set_value(_TRACER_KEY, tracer, set_span_in_context(queue)))
            try:
                last = await anext(stream, None)
            finally:
                otel_context.detach(token)
            queue.end()
            queued = False
            if isinstance(last, str):
                span.add_event("first token")
            if last is not None:
                yield last
            async for item in stream:
                last = item
                yield item
        outcome = _finished(span, last)
    except Exception as exc:
        outcome = "failed"
        span.record_exception(exc)
        span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
        raise
    finally:
        if queued:
            queue.end()
        span.set_attribute("loraplex.finish", outcome)
        span.end()


def _finished(span: Span, last: ReplicaItem | None) -> str:
    """Records how a stream that ran to its end finished (`ok` or `error`), from its last item."""
    if isinstance(last, WireError):
        span.set_attribute("loraplex.error.status", last.status)
        if last.status >= 500:
            span.set_status(Status(StatusCode.ERROR, last.message))
        return "error"
    tokens = _tokens(last)
    if tokens is not None:
        span.set_attributes({"gen_ai.usage.input_tokens": tokens[0], "gen_ai.usage.output_tokens": tokens[1]})
    return "ok"


def _tokens(item: Any) -> tuple[int, int] | None:
    """(prompt, completion) tokens of a stream's closing `Usage` or a whole answer's `usage` (OpenAI's names, or the
    Responses and Messages APIs')."""
    if isinstance(item, Usage):
        return item.prompt_tokens, item.completion_tokens
    usage = item.get("usage") if isinstance(item, dict) else None
    if not isinstance(usage, dict):
        return None
    prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
    return int(prompt or 0), int(usage.get("completion_tokens", usage.get("output_tokens")) or 0)
