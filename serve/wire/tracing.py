"""Traces across the router and engine replicas: how tracers are built, and how a trace crosses the process boundary.

Both sides import this, as they import the rest of the wire contract. A trace travels from the router to a replica as
one W3C `traceparent` string, the `TRACE_KWARG` argument of the replica's `generate`; it is sent only for a request
whose router span is recorded, so a request that is not traced costs the replica nothing.

Tracers are built by a factory, never at import, and once per process (`process_tracer`): a router replica and an
engine replica each own one OpenTelemetry `TracerProvider`, exporting in batches over OTLP. Tests build their own
with an in-memory exporter (`build_tracer`). The global tracer provider is left alone: Ray and vLLM may own it.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import TYPE_CHECKING, Literal

from opentelemetry.context import Context
from opentelemetry.trace import Span, Tracer, set_span_in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from serve.config import TracingConfig

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter

Component = Literal["router", "engine"]
"""Which process a tracer is for: its spans' `service.name` ends so."""
TRACE_KWARG = "trace"
"""The replica `generate` argument that carries a request's `traceparent` (absent when the request is not traced)."""
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
SCOPE = "loraplex"
"""The instrumentation scope of every loraplex span."""
_propagator = TraceContextTextMapPropagator()


def build_tracer(config: TracingConfig, component: Component, exporter: SpanExporter | None = None) -> Tracer | None:
    """A tracer with its own provider: spans to `exporter` one by one (tests), or else to the config's OTLP endpoint
    in batches; None when tracing is off (no endpoint and no exporter)."""
    if exporter is None and config.otlp_endpoint is None:
        return None
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, Sampler, TraceIdRatioBased

    from serve.wire.sampling import ServerDecides

    resource = Resource.create({"service.name": f"{config.service_name}-{component}"})
    # The router decides; an engine replica follows the router's `traceparent`, its only parent.
    ratio = config.sample_ratio
    sampler: Sampler = ServerDecides(ratio) if component == "router" else ParentBased(TraceIdRatioBased(ratio))
    provider = TracerProvider(resource=resource, sampler=sampler)
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        provider.add_span_processor(BatchSpanProcessor(_otlp_exporter(config)))
    return provider.get_tracer(SCOPE)


@functools.cache
def process_tracer(config: TracingConfig, component: Component) -> Tracer | None:
    """This process's tracer for `config` (built on first use, then shared: the router's app and its request router
    get the same one); None when tracing is off."""
    return build_tracer(config, component)


def _otlp_exporter(config: TracingConfig) -> SpanExporter:
    endpoint = config.otlp_endpoint or ""
    if config.otlp_protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        return GrpcExporter(endpoint=endpoint)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

    return HttpExporter(endpoint=traces_url(endpoint))


def traces_url(endpoint: str) -> str:
    """The OTLP/HTTP traces URL of a collector's base URL (as `OTEL_EXPORTER_OTLP_ENDPOINT` is read)."""
    endpoint = endpoint.rstrip("/")
    return endpoint if endpoint.endswith("/v1/traces") else f"{endpoint}/v1/traces"


def traceparent_of(span: Span) -> str | None:
    """The `traceparent` that continues `span` in another process, or None when `span` is not recorded."""
    if not span.is_recording():
        return None
    carrier: dict[str, str] = {}
    _propagator.inject(carrier, context=set_span_in_context(span))
    return carrier.get(TRACEPARENT)


def continued(headers: Mapping[str, str]) -> Context:
    """The context of a `traceparent` (and `tracestate`) carrier: an empty one when it holds no valid trace."""
    return _propagator.extract(headers)
