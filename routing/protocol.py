"""Request bodies as the router checks them before anything reaches an engine.

Only what the router must understand or bound is modelled; every other OpenAI or vLLM parameter
passes through untouched (`extra="allow"`) and vLLM's serving layer validates it in the replica.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from routing.errors import InvalidRequest, PayloadTooLarge, validation_param

Endpoint = Literal["completions", "chat"]
StopSequences = str | Annotated[list[str], Field(max_length=16)] | None


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    stream: bool = False
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int = Field(default=1, ge=1)
    seed: int | None = None
    stop: StopSequences = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    stream_options: dict[str, Any] | None = None


class CompletionBody(_Body):
    """`POST /v1/completions`."""

    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str = Field(min_length=1)


class ChatBody(_Body):
    """`POST /v1/chat/completions`."""

    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    max_completion_tokens: int | None = Field(default=None, ge=1)


BODY_MODELS: dict[Endpoint, type[_Body]] = {"completions": CompletionBody, "chat": ChatBody}


def parse_body(
    raw: bytes, endpoint: Endpoint, *, max_bytes: int, max_n: int, max_tokens: int | None = None
) -> dict[str, Any]:
    """Checks a raw request body; returns it as a dict or raises an `OpenAIError`.

    With a `max_tokens` cap, a larger `max_tokens` / `max_completion_tokens` is refused and a
    request giving neither is sent with `max_tokens` set to the cap.
    """
    if len(raw) > max_bytes:
        raise PayloadTooLarge(f"request body is {len(raw)} bytes; the limit is {max_bytes}")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidRequest("request body must be a JSON object")
    try:
        body = BODY_MODELS[endpoint].model_validate(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        raise InvalidRequest(first["msg"], param=validation_param(tuple(first["loc"]))) from None
    if body.n > max_n:
        raise InvalidRequest(f"n must be at most {max_n}", param="n")
    if max_tokens is not None:
        _cap_max_tokens(body, data, max_tokens)
    if body.stream_options is not None and not body.stream:
        raise InvalidRequest("stream_options is only allowed with stream=true", param="stream_options")
    if endpoint == "chat" and isinstance(body, ChatBody) and body.top_logprobs and not body.logprobs:
        raise InvalidRequest("top_logprobs requires logprobs=true", param="top_logprobs")
    return data


def _cap_max_tokens(body: _Body, data: dict[str, Any], cap: int) -> None:
    asked = {"max_tokens": body.max_tokens}
    if isinstance(body, ChatBody):
        asked["max_completion_tokens"] = body.max_completion_tokens
    for param, value in asked.items():
        if value is not None and value > cap:
            raise InvalidRequest(f"{param} must be at most {cap}", param=param)
    if all(value is None for value in asked.values()):
        data["max_tokens"] = cap
