"""The router's trace sampler: the server decides which requests are traced, never the client.

A client's `traceparent` carries a sampled flag and a trace id of its choosing; following the flag (OpenTelemetry's
`ParentBased`) would let any client have every request traced, and a ratio read from the trace id
(`TraceIdRatioBased`) would let it pick ids under the ratio. So the router draws for each request's server span
itself; the spans under it, in this process or the next (the engine replica's, which continue the router's
`traceparent`), follow that span. A span with no parent is never recorded: in the router it can only be one made
before a request was authenticated, which gets no trace (`routing.tracing`).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from opentelemetry.context import Context
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult
from opentelemetry.trace import Link, SpanKind, get_current_span
from opentelemetry.trace.span import TraceState
from opentelemetry.util.types import Attributes


class ServerDecides(Sampler):
    """Samples each server span at `ratio` by the router's own draw; other spans follow their parent."""

    def __init__(self, ratio: float, draw: Callable[[], float] = random.random) -> None:
        self.ratio = ratio
        self._draw = draw

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: TraceState | None = None,
    ) -> SamplingResult:
        parent = get_current_span(parent_context).get_span_context()
        if kind == SpanKind.SERVER:
            sampled = self._draw() < self.ratio
        else:
            sampled = parent.is_valid and parent.trace_flags.sampled
        if not sampled:
            return SamplingResult(Decision.DROP)
        return SamplingResult(
            Decision.RECORD_AND_SAMPLE, attributes, trace_state=parent.trace_state if parent.is_valid else None
        )

    def get_description(self) -> str:
        return f"ServerDecides{{{self.ratio}}}"
