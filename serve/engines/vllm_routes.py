"""How each endpoint reaches vLLM's own serving code in an engine replica, and how its answers become wire items.

vLLM 0.32.0 serves OpenAI's completions, chat and Responses, Anthropic's Messages, and its tokenizer from objects
its `init_app_state` builds; each route here names the request model that checks a body, the serving call that
answers it, how a whole answer is dumped (each API's own aliases and omissions), how a streamed event is written
as server-sent events, and where a stream carries its token usage.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, TypeAdapter

from serve.prompt_limit import RequestModels
from serve.wire import Endpoint, Usage


@dataclass(frozen=True)
class Route:
    """How one endpoint reaches vLLM."""

    parse: Callable[[dict[str, Any]], Any]
    """The body as vLLM's request model (raises pydantic's `ValidationError`)."""
    serve: Callable[[Any], Awaitable[object]]
    error_response: Callable[[Exception], Any]
    dump: Callable[[BaseModel], dict[str, Any]] = lambda answer: answer.model_dump(mode="json")
    usage_api: str = "openai"
    """Where a stream's usage is: `openai` (a closing chunk with `usage`), `responses` or `messages`."""


def build_routes(state: Any, models: RequestModels) -> dict[Endpoint, Route]:
    """The routes of the serving objects in `state` (vLLM's app state); `models`: vLLM's request models, perhaps
    capped (`serve.prompt_limit`)."""
    from vllm.entrypoints.anthropic.protocol import AnthropicMessagesRequest
    from vllm.entrypoints.serve.tokenize.protocol import DetokenizeRequest

    completion, chat = state.openai_serving_completion, state.openai_serving_chat
    responses, messages, tokens = (
        state.openai_serving_responses,
        models.messages_serving(state.anthropic_serving_messages),
        state.serving_tokenization,
    )
    tokenize_request: TypeAdapter[Any] = TypeAdapter(models.tokenize)
    return {
        "completions": Route(
            models.completion.model_validate, completion.create_completion, completion.create_error_response
        ),
        "chat": Route(models.chat.model_validate, chat.create_chat_completion, chat.create_error_response),
        "responses": Route(
            models.responses.model_validate, responses.create_responses, responses.create_error_response,
            dump=lambda answer: answer.model_dump(mode="json", by_alias=True), usage_api="responses",
        ),
        "messages": Route(
            AnthropicMessagesRequest.model_validate, messages.create_messages, messages.create_error_response,
            dump=lambda answer: answer.model_dump(mode="json", exclude_none=True), usage_api="messages",
        ),
        "tokenize": Route(
            tokenize_request.validate_python, lambda request: tokens.create_tokenize(request, None),
            tokens.create_error_response,
        ),
        "detokenize": Route(
            DetokenizeRequest.model_validate, lambda request: tokens.create_detokenize(request, None),
            tokens.create_error_response,
        ),
    }  # fmt: skip


def with_tool_parser(state: Any, parser: str, args: Any) -> Any:
    """vLLM's app `state` as `vllm serve --enable-auto-tool-choice --tool-call-parser PARSER` would build it, for the
    adapters registered with that parser: its chat, Responses and Messages serving objects and the renderer they share,
    copied with that parser (`ParserManager.get_parser`, which vLLM checks against the tokenizer); the rest, the engine
    and the adapters' ids are shared. vLLM builds one parser per server; an adapter fine-tuned on another chat format
    needs its own."""
    from starlette.datastructures import State
    from vllm.parser.parser_manager import ParserManager

    renderer = copy.copy(state.online_renderer)
    renderer.enable_auto_tools = True
    renderer.parser = ParserManager.get_parser(
        tool_parser_name=parser,
        reasoning_parser_name=args.structured_outputs_config.reasoning_parser or None,
        enable_auto_tools=True,
        model_name=renderer.model_config.model,
        is_harmony=renderer.use_harmony,
        tool_strict_level=args.tool_strict_level,
        tokenizer=renderer.renderer.tokenizer,
    )
    variant = State()
    variant.openai_serving_completion = state.openai_serving_completion
    variant.serving_tokenization = state.serving_tokenization
    for name, parser_attribute in (
        ("openai_serving_chat", "parser_cls"),
        ("anthropic_serving_messages", "parser_cls"),
        ("openai_serving_responses", "parser"),
    ):
        serving = copy.copy(getattr(state, name))
        serving.online_renderer = renderer
        serving.enable_auto_tools = True
        setattr(serving, parser_attribute, renderer.parser)
        setattr(variant, name, serving)
    return variant


def sse(event: object) -> str:
    """A streamed event as server-sent events: vLLM's chat, completions and Messages streams yield them written;
    its Responses stream yields event objects, written as its own server writes them (`event:` then `data:`)."""
    if isinstance(event, str):
        return event
    if isinstance(event, BaseModel):
        kind = getattr(event, "type", "unknown")
        return f"event: {kind}\ndata: {event.model_dump_json(indent=None, by_alias=True)}\n\n"
    raise TypeError(f"vLLM streamed a {type(event).__name__}")


class StreamUsage:
    """Reads a stream's token usage from its events, wherever its API puts it."""

    def __init__(self, api: str) -> None:
        self._api = api
        self._prompt = 0

    def read(self, event: str) -> Usage | None:
        """The stream's usage if `event` closes it (OpenAI's closing chunk, Responses' `response.completed`,
        Messages' `message_delta`), else None."""
        if '"usage"' not in event:
            return None
        data = event.split("data: ", 1)[1] if "data: " in event else ""
        if not data.startswith("{"):
            return None
        payload = json.loads(data)
        if self._api == "openai":
            usage = payload.get("usage")
            if payload.get("choices") or not usage:
                return None
            return Usage(prompt_tokens=usage["prompt_tokens"], completion_tokens=usage.get("completion_tokens") or 0)
        if self._api == "responses":
            if payload.get("type") != "response.completed":
                return None
            usage = (payload.get("response") or {}).get("usage") or {}
            return Usage(prompt_tokens=usage.get("input_tokens", 0), completion_tokens=usage.get("output_tokens", 0))
        if payload.get("type") == "message_start":
            self._prompt = ((payload.get("message") or {}).get("usage") or {}).get("input_tokens", 0)
            return None
        if payload.get("type") == "message_delta":
            usage = payload.get("usage") or {}
            prompt = usage.get("input_tokens") or self._prompt
            return Usage(prompt_tokens=prompt, completion_tokens=usage.get("output_tokens", 0))
        return None
