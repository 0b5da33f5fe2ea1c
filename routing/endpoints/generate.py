"""The routes that reach an engine: `POST /v1/completions`, `/v1/chat/completions`, `/v1/responses`, `/v1/messages`,
`/tokenize` and `/detokenize`. Each validates, checks scope, resolves the model (an adapter, the version a rollout
gives this request, or an inline composite), admits (rate limits, fair share), relays the engine, then settles the
request's real token usage. An inline composite (`compose`, with the compose scope) is admitted before the registry
is asked for it: a request refused by its key's limits builds nothing.

A request no engine replica started goes to another (`routing.engine_client`); one whose replica was lost
while running it is not sent again; a client that leaves cancels the engine's work too."""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from opentelemetry.trace import get_current_span
from starlette.types import Receive, Scope, Send

from routing.admission import Admission
from routing.auth import KeyDep
from routing.catalog import ModelTarget
from routing.context import ContextDep, RouterContext
from routing.engine_client import SHUTTING_DOWN, EngineCall
from routing.errors import (
    EngineFailure,
    InvalidRequest,
    OpenAIError,
    Overloaded,
    PermissionDenied,
    error_response,
    sse_error,
    upstream,
)
from routing.grammar_limits import check_grammar_inputs
from routing.media import check_media_urls
from routing.metrics import RequestTimer
from routing.openapi import json_body
from routing.principals import Principal
from routing.protocol import (
    ChatBody,
    CompletionBody,
    ComposeSpec,
    DetokenizeBody,
    Endpoint,
    MessagesBody,
    ResponsesBody,
    RoutedRequest,
    TokenizeBody,
    parse_body,
)
from routing.rollout_choice import choose_version
from routing.tracing import describe_request, record_usage
from serve.wire import GENERATING, INLINE_COMPOSITE_LABEL, AdapterRecord, Composition, Usage, WireError
from serve.wire.channel import ReplicaFailed
from serve.wire.tracing import traceparent_of

logger = logging.getLogger("loraplex.router")
TOKEN_EVENTS: dict[Endpoint, str] = {
    "completions": '"index":',  # a choice in an OpenAI chunk
    "chat": '"index":',
    "responses": ".delta\ndata:",  # `event: response.output_text.delta` (reasoning and tool-argument deltas too)
    "messages": "_delta\ndata:",  # `event: content_block_delta` (and the closing `message_delta`)
}
"""Marks a streamed event that carries about one generated token, in each API's server-sent events (the event
line is written before its data, so no generated text can fake it): what a stream is charged at least when
its usage never comes (the client left)."""
router = APIRouter()


@router.post("/v1/completions", response_model=None, openapi_extra=json_body(CompletionBody, streams=True))
async def create_completion(request: Request, context: ContextDep, key: KeyDep) -> Response:
    return await _generate("completions", request, context, key)


@router.post("/v1/chat/completions", response_model=None, openapi_extra=json_body(ChatBody, streams=True))
async def create_chat_completion(request: Request, context: ContextDep, key: KeyDep) -> Response:
    return await _generate("chat", request, context, key)


@router.post("/v1/responses", response_model=None, openapi_extra=json_body(ResponsesBody, streams=True))
async def create_response(request: Request, context: ContextDep, key: KeyDep) -> Response:
    """OpenAI's Responses API, answered by vLLM's own Responses serving code in the engine replica."""
    return await _generate("responses", request, context, key)


@router.post("/v1/messages", response_model=None, openapi_extra=json_body(MessagesBody, streams=True))
async def create_message(request: Request, context: ContextDep, key: KeyDep) -> Response:
    """Anthropic's Messages API, answered by vLLM's own Messages serving code; errors in Anthropic's shape."""
    return await _generate("messages", request, context, key)


@router.post("/tokenize", response_model=None, openapi_extra=json_body(TokenizeBody))
async def tokenize(request: Request, context: ContextDep, key: KeyDep) -> Response:
    """vLLM's tokenizer endpoint for `model` (messages are counted with its chat template); rate-limited as a
    request, costing no generation."""
    return await _generate("tokenize", request, context, key)


@router.post("/detokenize", response_model=None, openapi_extra=json_body(DetokenizeBody))
async def detokenize(request: Request, context: ContextDep, key: KeyDep) -> Response:
    """vLLM's detokenizer endpoint for `model`."""
    return await _generate("detokenize", request, context, key)


async def _generate(endpoint: Endpoint, request: Request, context: RouterContext, key: Principal) -> Response:
    config = context.config
    timer = context.metrics.track(context.metrics.label(None, False), endpoint)
    admission: Admission | None = None
    refused = False  # the engine rendered the request and refused it (the prompt is charged)
    try:
        if context.draining.is_set():
            raise Overloaded(SHUTTING_DOWN)
        routed = parse_body(
            await request.body(),
            endpoint,
            max_n=config.max_n,
            max_tokens=config.max_tokens,
            content_type=request.headers.get("content-type"),
            extra_chat_roles=config.extra_chat_roles,
            max_sequences=config.max_sequences,
        )
        if endpoint in GENERATING:
            check_grammar_inputs(
                routed.body, max_bytes=config.max_schema_bytes, max_repetition=config.max_schema_repetition
            )
        check_media_urls(routed.body, config.allowed_media_domains)
        if routed.compose is None:
            target = await _named_target(context, key, routed, timer)
        else:
            composition = _composition(context, key, routed.model, routed.compose)
            timer.label = context.metrics.label(context.catalog.adapter_id(INLINE_COMPOSITE_LABEL), True)
        admission = await _admit(context, key, endpoint, routed.body)  # first: a request refused builds nothing
        if routed.compose is not None:
            target = await _composite(context, key, composition)
        trace = _traced(context, key, endpoint, target)
        first, items = await context.engine.start(
            endpoint, routed.for_engine(target.id), target.adapter, context.draining, trace
        )
        if isinstance(first, WireError):
            refused = _engine_refused(first)
            raise upstream(first)
        if isinstance(first, dict):
            usage = _usage_of(first)
            timer.tokens(*usage)
            if trace is not None:
                record_usage(*usage)
            timer.finish(200)
            admission.finish(sum(usage))
            return JSONResponse(first)
        if isinstance(first, str):
            timer.first_token_seen()
            relay = _relay(first, items, timer, admission, endpoint, traced=trace is not None)
            return AdmittedStream(relay, items, admission)
        raise EngineFailure(f"engine answered with an unexpected {type(first).__name__}")
    except OpenAIError as exc:
        timer.finish(exc.status)
        if admission is not None:  # the engine generated nothing; a refusal still cost it the prompt's rendering
            admission.finish(admission.prompt_estimate if refused else 0)
        return error_response(exc.shown_to(key.admin), anthropic=endpoint == "messages")
    except BaseException:  # cancelled (the client left) or a bug: free the slot, keep the estimate charged
        if admission is not None:
            admission.finish(None)
        raise


async def _named_target(
    context: RouterContext, key: Principal, routed: RoutedRequest, timer: RequestTimer
) -> ModelTarget:
    """The model a request names, if the key may use it: the base, an adapter (the version a rollout gives this
    request) or a registered composite."""
    key.require_use(context.catalog.name_of(routed.model), routed.model)
    target = await context.catalog.resolve(routed.model)
    timer.label = context.metrics.label(target.id, target.adapter is not None)
    timer.model = target.id  # the adapter, whichever version of it serves the request
    if target.adapter is not None and target.adapter.composition is not None:
        _require_components(key, target.adapter.composition.adapters, param="model")
    if target.adapter is not None and target.adapter.canary is not None:
        target = _rollout_version(context, target.adapter, routed.user, timer)
    return target


def _rollout_version(
    context: RouterContext, adapter: AdapterRecord, user: str | None, timer: RequestTimer
) -> ModelTarget:
    """The version of `adapter`, in a rollout, that serves this request (`routing.rollout_choice`)."""
    chosen = choose_version(adapter, user)
    timer.version = str(chosen.version)
    return ModelTarget(id=context.catalog.adapter_id(chosen.name), adapter=chosen)


def _traced(context: RouterContext, key: Principal, endpoint: Endpoint, target: ModelTarget) -> str | None:
    """The `traceparent` the replica continues for a request whose span is recorded (tracing on); None otherwise."""
    if context.tracer is None:
        return None
    describe_request(key, endpoint, target.id, target.adapter.name if target.adapter is not None else None)
    return traceparent_of(get_current_span())


async def _admit(context: RouterContext, key: Principal, endpoint: Endpoint, body: dict[str, Any]) -> Admission:
    """The key's rate limits and fair share (`routing.admission`), in a span of its own when traced."""
    if context.tracer is None:
        return await context.admitter.admit(key, endpoint, body)
    with context.tracer.start_as_current_span("router.admission"):
        return await context.admitter.admit(key, endpoint, body)


def _composition(context: RouterContext, key: Principal, model: str, spec: ComposeSpec) -> Composition:
    """What a request's `compose` asks for, if the key may compose and use every component: checked here, before
    anything reaches the registry."""
    key.require_compose()
    if context.catalog.name_of(model) is not None:
        raise InvalidRequest(f"compose combines adapters of the base model: set model to `{context.catalog.base_id}`",
                             param="model")  # fmt: skip
    names = [context.catalog.name_of(component.name) or component.name for component in spec.adapters]
    _require_components(key, names)
    return spec.composition(names)


async def _composite(context: RouterContext, key: Principal, composition: Composition) -> ModelTarget:
    """The inline composite `composition`, made by the registry if it is new (within the key's build bounds)."""
    target, built = await context.catalog.composite(composition, key.name)
    if built:
        context.metrics.composite_builds.inc()
    return target


def _require_components(key: Principal, components: tuple[str, ...] | list[str], param: str | None = None) -> None:
    """A key may use a composite only if it may use every adapter it is made of."""
    for i, component in enumerate(components):
        if not key.may_use(component):
            raise PermissionDenied(f"This API key may not use the adapter `{component}`, a component of this "
                                   "composite.", param=param or f"compose.adapters.{i}.name")  # fmt: skip


class AdmittedStream(StreamingResponse):
    """An event stream that frees its admission and the engine's work when the response ends, however it ends.

    The relay's own `finally` settles the real usage and, if the client left, cancels the engine call;
    this runs it at once (a relay left waiting to send would otherwise wait for the garbage collector),
    and covers a stream whose body never started, which would hold its fair-share slot forever.
    """

    def __init__(self, relay: AsyncGenerator[str, None], items: EngineCall, admission: Admission) -> None:
        super().__init__(relay, media_type="text/event-stream")
        self.relay = relay
        self.items = items
        self.admission = admission

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.relay.aclose()
            if not self.admission.finished:  # the relay never started: the client left first
                self.items.cancel()
                self.admission.finish(None)


async def _relay(
    first: str,
    items: EngineCall,
    timer: RequestTimer,
    admission: Admission,
    endpoint: Endpoint,
    *,
    traced: bool = False,
) -> AsyncGenerator[str, None]:
    """Streams the engine's events to the client; a failure mid-stream ends it with an error event. `traced`: the
    request's server span is recorded, and gets the usage."""
    status = 200
    used: int | None = None
    anthropic = endpoint == "messages"
    token_event = TOKEN_EVENTS.get(endpoint, TOKEN_EVENTS["completions"])
    relayed = first.count(token_event)
    ended = False
    try:
        yield first
        async for item in items:
            if isinstance(item, str):
                relayed += item.count(token_event)
                yield item
            elif isinstance(item, Usage):
                timer.tokens(item.prompt_tokens, item.completion_tokens)
                used = item.prompt_tokens + item.completion_tokens
                if traced:
                    record_usage(item.prompt_tokens, item.completion_tokens)
        ended = True
    except Exception as exc:
        ended = True
        logger.exception("engine replica failed mid-stream")
        name = exc.name if isinstance(exc, ReplicaFailed) else type(exc).__name__
        failure = EngineFailure(f"engine replica failed mid-stream: {name}")
        status = failure.status
        yield sse_error(failure, anthropic=anthropic)
    finally:
        if not ended:  # the client left (cancelled, or closed while we waited to send)
            items.cancel()
        timer.finish(status)
        admission.finish(used, relayed_tokens=relayed)


def _engine_refused(error: WireError) -> bool:
    """An engine's 4xx answer: it rendered and tokenized the request (tools, schemas and all) before refusing it, so
    the prompt is charged; capacity answers (429, 503) and failures cost the engine nothing and are refunded."""
    return 400 <= error.status < 500 and error.status != 429


def _usage_of(response: dict[str, Any]) -> tuple[int, int]:
    """(prompt, completion) tokens of a whole answer: OpenAI's usage names, the Responses and Messages APIs'
    (`input_tokens`, `output_tokens`), or a tokenizer answer's `count` (prompt tokens, nothing generated)."""
    usage = response.get("usage") or {}
    if "count" in response and not usage:
        return int(response["count"]), 0
    prompt = usage.get("prompt_tokens", usage.get("input_tokens", 0))
    return int(prompt or 0), int(usage.get("completion_tokens", usage.get("output_tokens", 0)) or 0)
