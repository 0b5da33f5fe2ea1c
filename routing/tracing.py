"""The router's spans: one server span per generation request, continuing the client's `traceparent`, with a child
per phase that can make it wait (auth, admission, replica choice).

Everything here is installed or called only when the router has a tracer (`TracingConfig.otlp_endpoint`): without
one the app has no tracing middleware and a generation request passes over it with one `is None` check. Spans are per
request and per phase, never per streamed item.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry.trace import (
    INVALID_SPAN,
    Span,
    SpanKind,
    Status,
    StatusCode,
    Tracer,
    get_current_span,
    set_span_in_context,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from routing.errors import OpenAIError
from routing.principals import Principal
from serve.wire.tracing import TRACE_KWARG, TRACEPARENT, TRACESTATE, continued

GENERATION_ROUTES = frozenset(
    {"/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/messages", "/tokenize", "/detokenize"}
)
"""The routes that get a server span: those that reach an engine."""
_TRACE_HEADERS = (TRACEPARENT.encode(), TRACESTATE.encode())


class TraceRequests:
    """ASGI middleware, outside the body limit: a server span around each authenticated generation request, current
    while it is served.

    A request without a valid key gets no span (`authenticate` raises; None: an open server, where every request is
    its anonymous principal's). The span continues the trace of the client's `traceparent` header (a new trace without
    one), but whether it is recorded is the router's draw (`serve.wire.sampling`), never the client's flag. It is
    current while the route runs (so phases become its children) and ends once the response is sent, a stream's last
    event included. It records the HTTP status; a 5xx is an error, a 4xx is the client's.
    """

    def __init__(
        self, app: ASGIApp, tracer: Tracer, authenticate: Callable[[str | None, str | None], Any] | None = None
    ) -> None:
        self.app = app
        self.tracer = tracer
        self.authenticate = authenticate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in GENERATION_ROUTES:
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        if self.authenticate is not None:
            try:
                self.authenticate(_text(headers.get(b"authorization")), _text(headers.get(b"x-api-key")))
            except OpenAIError:  # the body limit answers it, untraced
                await self.app(scope, receive, send)
                return
        carrier = {name.decode(): value.decode("latin-1") for name, value in scope["headers"] if name in _TRACE_HEADERS}
        route = scope["path"]
        span = self.tracer.start_span(
            f"POST {route}",
            context=continued(carrier),
            kind=SpanKind.SERVER,
            attributes={"http.request.method": "POST", "http.route": route},
        )
        status = 500  # unless a response starts: an exception nobody answered

        async def send_noting_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        token = otel_context.attach(set_span_in_context(span))
        try:
            await self.app(scope, receive, send_noting_status)
        except BaseException as exc:
            span.record_exception(exc)
            raise
        finally:
            otel_context.detach(token)
            span.set_attribute("http.response.status_code", status)
            if status >= 500:
                span.set_status(Status(StatusCode.ERROR))
            span.end()


def _text(value: bytes | None) -> str | None:
    return value.decode("latin-1") if value is not None else None


def traced_authentication(
    tracer: Tracer, authenticate: Callable[[str | None, str | None], Principal]
) -> Callable[[str | None, str | None], Principal]:
    """`authenticate` in a `router.auth` span naming the key it found (the check before the body is read)."""

    def authenticate_in_span(authorization: str | None, api_key: str | None = None) -> Principal:
        with tracer.start_as_current_span("router.auth") as span:
            principal = authenticate(authorization, api_key)
            span.set_attribute("loraplex.key", principal.name)
            return principal

    return authenticate_in_span


def describe_request(key: Principal, endpoint: str, model: str, adapter: str | None) -> None:
    """Names, on the current (server) span, what the request asked for and who asked."""
    get_current_span().set_attributes(
        {
            "loraplex.endpoint": endpoint,
            "loraplex.key": key.name,
            "gen_ai.request.model": model,
            "loraplex.adapter": adapter or "",
        }
    )


def record_usage(prompt_tokens: int, completion_tokens: int) -> None:
    """The engine's real token counts, on the current (server) span."""
    get_current_span().set_attributes(
        {"gen_ai.usage.input_tokens": prompt_tokens, "gen_ai.usage.output_tokens": completion_tokens}
    )


def replica_choice_span(
    tracer: Tracer, request: Any, adapter: str | None, candidates: int
) -> AbstractContextManager[Span]:
    """A `router.replica_choice` span in the trace of `request` (Serve's `PendingRequest` of a `generate` call, whose
    arguments carry the `traceparent`); `INVALID_SPAN`, which records nothing, for a request that is not traced."""
    traceparent = request.kwargs.get(TRACE_KWARG) if request is not None else None
    if not traceparent:
        return contextlib.nullcontext(INVALID_SPAN)
    return tracer.start_as_current_span(
        "router.replica_choice",
        context=continued({TRACEPARENT: traceparent}),
        attributes={"loraplex.adapter": adapter or "", "loraplex.replica.candidates": candidates},
    )
