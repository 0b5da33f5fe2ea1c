"""`POST /v1/completions` and `POST /v1/chat/completions`: validate, check scope, resolve the model, admit
(rate limits, fair share), relay the engine, then settle the request's real token usage."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray.serve.exceptions import BackPressureError
from starlette.types import Receive, Scope, Send

from routing.admission import Admission
from routing.auth import KeyDep
from routing.context import ContextDep, RouterContext
from routing.errors import EngineFailure, OpenAIError, Overloaded, UpstreamError, error_response, sse_error
from routing.metrics import RequestTimer
from routing.openapi import json_body
from routing.principals import Principal
from routing.protocol import ChatBody, CompletionBody, Endpoint, parse_body
from serve.wire import EngineError, ReplicaItem, Usage

logger = logging.getLogger("loraplex.router")
router = APIRouter()


@router.post("/v1/completions", response_model=None, openapi_extra=json_body(CompletionBody, streams=True))
async def create_completion(request: Request, context: ContextDep, key: KeyDep) -> Response:
    return await _generate("completions", request, context, key)


@router.post("/v1/chat/completions", response_model=None, openapi_extra=json_body(ChatBody, streams=True))
async def create_chat_completion(request: Request, context: ContextDep, key: KeyDep) -> Response:
    return await _generate("chat", request, context, key)


async def _generate(endpoint: Endpoint, request: Request, context: RouterContext, key: Principal) -> Response:
    config = context.config
    timer = context.metrics.track(context.metrics.label(None, False), endpoint)
    admission: Admission | None = None
    try:
        content_type = request.headers.get("content-type")
        body = parse_body(
            await request.body(), endpoint, max_n=config.max_n, max_tokens=config.max_tokens, content_type=content_type
        )
        key.require_use(context.catalog.name_of(body["model"]), body["model"])
        target = await context.catalog.resolve(body["model"])
        timer.label = context.metrics.label(target.id, target.adapter is not None)
        body["model"] = target.id
        admission = await context.admitter.admit(key, endpoint, body)
        items = context.engine.generate(endpoint, body, target.adapter)
        first = await _first_item(items)
        if isinstance(first, EngineError):
            raise UpstreamError(first)
        if isinstance(first, dict):
            usage = _usage_of(first)
            timer.tokens(*usage)
            timer.finish(200)
            admission.finish(sum(usage))
            return JSONResponse(first)
        if isinstance(first, str):
            timer.first_token_seen()
            return AdmittedStream(_relay(first, items, timer, admission), admission)
        raise EngineFailure(f"engine answered with an unexpected {type(first).__name__}")
    except OpenAIError as exc:
        timer.finish(exc.status)
        if admission is not None:
            admission.finish(0)  # the engine served nothing
        return error_response(exc)
    except BaseException:  # cancelled (the client left) or a bug: free the slot, keep the estimate charged
        if admission is not None:
            admission.finish(None)
        raise


class AdmittedStream(StreamingResponse):
    """An event stream that frees its admission when the response ends, however it ends.

    The relay's own `finally` settles the real usage; this covers a stream whose body never starts
    (the client left first), which would otherwise hold its fair-share slot forever.
    """

    def __init__(self, content: AsyncIterator[str], admission: Admission) -> None:
        super().__init__(content, media_type="text/event-stream")
        self.admission = admission

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.admission.finish(None)


async def _first_item(items: AsyncIterator[ReplicaItem]) -> ReplicaItem:
    try:
        return await anext(items)
    except BackPressureError:
        raise Overloaded("all engine replicas are at capacity; retry shortly") from None
    except StopAsyncIteration:
        raise EngineFailure("engine replica closed the request without an answer") from None
    except OpenAIError:
        raise
    except Exception as exc:  # a replica that died or failed: the handle re-raises its error here
        logger.exception("engine replica failed before answering")
        raise EngineFailure(f"engine replica failed: {type(exc).__name__}") from exc


async def _relay(
    first: str, items: AsyncIterator[ReplicaItem], timer: RequestTimer, admission: Admission
) -> AsyncIterator[str]:
    """Streams the engine's events to the client; a failure mid-stream ends it with an error event."""
    status = 200
    used: int | None = None
    try:
        yield first
        async for item in items:
            if isinstance(item, str):
                yield item
            elif isinstance(item, Usage):
                timer.tokens(item.prompt_tokens, item.completion_tokens)
                used = item.prompt_tokens + item.completion_tokens
    except Exception as exc:
        logger.exception("engine replica failed mid-stream")
        failure = EngineFailure(f"engine replica failed mid-stream: {type(exc).__name__}")
        status = failure.status
        yield sse_error(failure)
    finally:
        timer.finish(status)
        admission.finish(used)


def _usage_of(response: dict[str, Any]) -> tuple[int, int]:
    usage = response.get("usage") or {}
    return int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))
