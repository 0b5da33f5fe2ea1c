"""Request bodies as the router checks them before anything reaches an engine.

Only what the router must understand or bound is modelled; every other OpenAI or vLLM parameter
passes through untouched (`extra="allow"`) and vLLM's serving layer validates it in the replica.
What passes through is still plain JSON (RFC 8259): UTF-8, finite numbers, no unpaired surrogates,
and nested at most `MAX_JSON_DEPTH` deep, so no engine or serializer downstream meets anything else.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import Request, Response
from fastapi.routing import APIRoute
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    field_validator,
)
from pydantic_core import PydanticCustomError

from routing.errors import InvalidRequest, validation_param
from serve.wire import COMPOSE_METHODS, MAX_WEIGHT, WEIGHT_DECIMALS, Composition, Endpoint, canonical

INT32_MAX = 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_JSON_DEPTH = 64
"""Containers inside containers: far beyond any OpenAI body (tool schemas included), far below recursion limits."""
MAX_MODEL_ID_CHARS = 1024


def _one_of(expected: str) -> WrapValidator:
    """Reports a value that fits no member of a union as one error on the field, not one per member."""

    def validate(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            return handler(value)
        except ValidationError:
            raise PydanticCustomError("union_type", f"Input should be {expected}") from None

    return WrapValidator(validate)


Int64 = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]
Count = Annotated[int, Field(ge=1, le=INT32_MAX)]
"""Tokens or choices: bounded so no engine meets an integer its C types cannot hold."""
TokenId = Annotated[int, Field(ge=0, le=INT32_MAX)]
Prompt = Annotated[
    str | list[str] | list[TokenId] | list[list[TokenId]],
    _one_of("a string, a list of strings, or a list (or list of lists) of token ids (integers ≥ 0)"),
]
StopSequences = Annotated[
    str | Annotated[list[str], Field(max_length=16)] | None, _one_of("a string or a list of at most 16 strings")
]


MAX_COMPONENTS = 8
"""Adapters one composite may combine."""


class ComposeComponent(BaseModel):
    """One adapter of a composite and its weight."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        min_length=1, max_length=MAX_MODEL_ID_CHARS, description="A registered adapter, `NAME` or `BASE:NAME`."
    )
    weight: float = Field(
        ge=-MAX_WEIGHT,
        le=MAX_WEIGHT,
        description=(
            f"Its weight in the combination (negative subtracts it), counted to {WEIGHT_DECIMALS} decimals; not 0."
        ),
    )

    @field_validator("weight")
    @classmethod
    def _not_zero(cls, weight: float) -> float:
        if round(weight, WEIGHT_DECIMALS) == 0:
            raise ValueError(f"a weight of 0 at {WEIGHT_DECIMALS} decimals adds nothing: leave the adapter out")
        return weight


class ComposeSpec(BaseModel):
    """A weighted combination of registered adapters, made with PEFT's `add_weighted_adapter`."""

    model_config = ConfigDict(extra="forbid")

    adapters: list[ComposeComponent] = Field(min_length=1, max_length=MAX_COMPONENTS)
    method: Literal[COMPOSE_METHODS] = Field(  # type: ignore[valid-type]
        default="cat",
        description=(
            "PEFT's combination type: `cat` (exact; rank = sum of ranks), `svd` (rank = largest rank), `linear`, "
            "`ties`, `dare_linear`, `dare_ties` (components of one rank)."
        ),
    )
    density: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description=f"Share of weights kept: ties and dare only; counted to {WEIGHT_DECIMALS} decimals.",
    )
    seed: int = Field(
        default=0,
        ge=0,
        le=INT32_MAX,
        description="Seeds DARE's random pruning (`dare_linear`, `dare_ties`): the same seed, the same adapter. Other "
        "methods do not use it: their composite is one whatever the seed.",
    )

    def composition(self, names: list[str]) -> Composition:
        """As the registry takes it, with the components' bare `names`: canonical (`serve.wire.canonical`)."""
        return canonical(
            Composition(
                method=self.method,
                adapters=tuple(names),
                weights=tuple(component.weight for component in self.adapters),
                density=self.density,
                seed=self.seed,
            )
        )


class _Routed(BaseModel):
    """What every body the router sends to an engine carries: the model it resolves, and perhaps a composite."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(
        min_length=1, max_length=MAX_MODEL_ID_CHARS, description="The base model's id, `BASE:NAME`, or a bare `NAME`."
    )
    compose: ComposeSpec | None = Field(
        default=None,
        description=(
            "loraplex: serve this request with a weighted combination of registered adapters, built once and cached "
            "(`model` must then be the base model). The openai SDK sends it through `extra_body`."
        ),
    )


class _Body(_Routed):
    stream: bool = Field(default=False, description="Answer with server-sent events, ending with `data: [DONE]`.")
    max_tokens: Count | None = Field(default=None, description="Most tokens to generate.")
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: Count = Field(default=1, description="Choices to generate; at most the router's `max_n`.")
    seed: Int64 | None = None
    stop: StopSequences = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    stream_options: dict[str, Any] | None = Field(default=None, description="Only with `stream`.")


class CompletionBody(_Body):
    """`POST /v1/completions`; other OpenAI and vLLM parameters pass through to the engine."""

    prompt: Prompt = Field(description="Text, texts, or token ids.")
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    max_completion_tokens: Count | None = Field(
        default=None, description="Checked like `max_tokens`, but vLLM's completions use only `max_tokens`."
    )


class ChatMessage(BaseModel):
    """One chat message; `content` and the rest are checked by the engine's chat template."""

    model_config = ConfigDict(extra="allow")

    role: str = Field(min_length=1)


class ChatBody(_Body):
    """`POST /v1/chat/completions`; other OpenAI and vLLM parameters pass through to the engine."""

    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20, description="Only with `logprobs`.")
    max_completion_tokens: Count | None = None


class ResponsesBody(_Routed):
    """`POST /v1/responses` (OpenAI's Responses API, as vLLM serves it); the rest passes through to the engine."""

    input: str | list[Any] = Field(description="Text, or a list of input items (messages, tool outputs, ...).")
    instructions: str | None = None
    stream: bool = Field(default=False, description="Answer with the Responses API's server-sent events.")
    max_output_tokens: Count | None = Field(default=None, description="Most tokens to generate.")
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)


class MessagesBody(_Routed):
    """`POST /v1/messages` (Anthropic's Messages API, as vLLM serves it); the rest passes through to the engine."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Count = Field(description="Most tokens to generate (Anthropic requires it).")
    system: str | list[Any] | None = None
    stream: bool = Field(default=False, description="Answer with Anthropic's server-sent events.")
    temperature: float | None = Field(default=None, ge=0, le=1)
    top_p: float | None = Field(default=None, gt=0, le=1)


class TokenizeBody(_Routed):
    """`POST /tokenize` (vLLM's): a `prompt`, or chat `messages` counted with the chat template."""

    prompt: str | list[TokenId] | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)


class DetokenizeBody(_Routed):
    """`POST /detokenize` (vLLM's): token ids back to text."""

    tokens: list[TokenId] = Field(min_length=1)


CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
"""The roles of OpenAI's chat schema; others are refused unless `router.extra_chat_roles` lists them."""
BODY_MODELS: dict[Endpoint, type[_Routed]] = {
    "completions": CompletionBody,
    "chat": ChatBody,
    "responses": ResponsesBody,
    "messages": MessagesBody,
    "tokenize": TokenizeBody,
    "detokenize": DetokenizeBody,
}
TOKEN_FIELDS: dict[Endpoint, tuple[str, ...]] = {
    "completions": ("max_tokens",),  # vLLM's completions read only max_tokens
    "chat": ("max_tokens", "max_completion_tokens"),
    "responses": ("max_output_tokens",),
    "messages": ("max_tokens",),
}
"""The fields that bound a request's output, the first set to the router's cap when none is given."""


@dataclass(frozen=True)
class RoutedRequest:
    """A checked request on its way to an engine, as `parse_body` gives it to its route: the JSON body the engine gets
    (`compose` taken out) and the inline composite it asks for, if any. `model` is the name the client gave; the
    engine gets the id the router resolved it to (`for_engine`)."""

    endpoint: Endpoint
    body: dict[str, Any]
    compose: ComposeSpec | None = None

    @property
    def model(self) -> str:
        return str(self.body["model"])

    @property
    def user(self) -> str | None:
        """The client's `user`: which version of an adapter in a rollout it gets (`routing.rollout_choice`)."""
        user = self.body.get("user")
        return user if isinstance(user, str) else None

    def for_engine(self, model_id: str) -> dict[str, Any]:
        """The body the engine gets: the client's, naming `model_id` (the adapter version or composite it resolved)."""
        return {**self.body, "model": model_id}


def parse_body(
    raw: bytes,
    endpoint: Endpoint,
    *,
    max_n: int,
    max_tokens: int | None = None,
    content_type: str | None = "application/json",
    extra_chat_roles: tuple[str, ...] = (),
    max_sequences: int | None = None,
) -> RoutedRequest:
    """Checks a raw request body (already within the size limit); returns it routed or raises `InvalidRequest`.

    With a `max_tokens` cap, a larger `max_tokens` / `max_completion_tokens` is refused and a
    request giving neither is sent with `max_tokens` set to the cap.
    """
    require_json(content_type)
    data = parse_json(raw)
    if not isinstance(data, dict):
        raise InvalidRequest("request body must be a JSON object")
    try:
        body = BODY_MODELS[endpoint].model_validate(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        raise InvalidRequest(first["msg"], param=validation_param(tuple(first["loc"]))) from None
    if isinstance(body, _Body):
        _check_choices(body, max_n, max_sequences)
    if max_tokens is not None:
        _cap_max_tokens(endpoint, data, max_tokens)
    if isinstance(body, TokenizeBody) and (body.prompt is None) == (body.messages is None):
        raise InvalidRequest("give a prompt or messages (one of them)", param="prompt")
    if isinstance(body, ChatBody) and body.top_logprobs and not body.logprobs:
        raise InvalidRequest("top_logprobs requires logprobs=true", param="top_logprobs")
    if isinstance(body, ChatBody | MessagesBody | TokenizeBody):
        for i, message in enumerate(body.messages or ()):
            if message.role not in CHAT_ROLES and message.role not in extra_chat_roles:
                known = ", ".join(sorted(CHAT_ROLES | set(extra_chat_roles)))
                raise InvalidRequest(f"messages[{i}].role must be one of {known}", param=f"messages.{i}.role")
    data.pop("compose", None)
    return RoutedRequest(endpoint, data, body.compose)


def _check_choices(body: _Body, max_n: int, max_sequences: int | None) -> None:
    if body.n > max_n:
        raise InvalidRequest(f"n must be at most {max_n}", param="n")
    if max_sequences is not None and isinstance(body, CompletionBody):
        asked = prompt_count(body.prompt) * body.n
        if asked > max_sequences:
            raise InvalidRequest(
                f"a request may generate at most {max_sequences} sequences (prompts x n); this one asks for {asked}",
                param="prompt",
            )
    if body.stream_options is not None and not body.stream:
        raise InvalidRequest("stream_options is only allowed with stream=true", param="stream_options")


def prompt_count(prompt: str | list[str] | list[int] | list[list[int]]) -> int:
    """How many prompts a completions `prompt` holds: a batch is a list of texts or of token-id lists."""
    if isinstance(prompt, str) or not prompt or isinstance(prompt[0], int):
        return 1
    return len(prompt)


def _cap_max_tokens(endpoint: Endpoint, data: dict[str, Any], cap: int) -> None:
    fields = TOKEN_FIELDS.get(endpoint, ())
    for param in fields:
        value = data.get(param)
        if value is not None and value > cap:
            raise InvalidRequest(f"{param} must be at most {cap}", param=param)
    if fields and all(data.get(param) is None for param in fields):
        data[fields[0]] = cap


def require_json(content_type: str | None) -> None:
    """Accepts `application/json` or `application/*+json`, parameters aside (FastAPI's own test)."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
        raise InvalidRequest(f"Content-Type must be application/json, not {content_type or 'missing'}")


_UTF8_BOM = b"\xef\xbb\xbf"
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_PLAIN = frozenset({int, bool, type(None)})


def parse_json(raw: bytes) -> Any:
    """Decodes UTF-8 JSON (a byte-order mark is ignored) into plain JSON values, or raises `InvalidRequest`."""
    try:
        text = raw.removeprefix(_UTF8_BOM).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"request body is not valid UTF-8: {exc.reason} at byte {exc.start}") from None
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:  # ValueError: also integers of 4,300+ digits
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
    _check_values(data, check_text=_SURROGATE_ESCAPE.search(text) is not None)
    return data


def _check_values(data: Any, *, check_text: bool) -> None:
    """Refuses containers nested over `MAX_JSON_DEPTH`, NaN and infinite numbers, and unpaired surrogates.

    Iterative, so depth costs no stack; lists of plain values (token ids) are skipped in C. Strings are
    only inspected when the text holds a `\\uD800`-`\\uDFFF` escape, the one way a surrogate gets in.
    """
    plain = _PLAIN | {str} if not check_text else _PLAIN
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(data, ())]
    while stack:
        value, path = stack.pop()
        kind = type(value)
        if kind is float:
            if not math.isfinite(value):
                raise InvalidRequest("must be a finite number (NaN and Infinity are not JSON)", param=_param(path))
        elif kind is str:
            if not _is_unicode(value):
                raise InvalidRequest("string holds an unpaired UTF-16 surrogate", param=_param(path))
        elif kind is dict or kind is list:
            if len(path) >= MAX_JSON_DEPTH:
                raise InvalidRequest(f"JSON nested deeper than {MAX_JSON_DEPTH} levels", param=_param(path[:1]))
            if kind is list:
                if not set(map(type, value)) <= plain:
                    stack.extend((item, (*path, index)) for index, item in enumerate(value))
                continue
            for key, item in value.items():
                if check_text and not _is_unicode(key):
                    raise InvalidRequest("key holds an unpaired UTF-16 surrogate", param=_param(path))
                if type(item) not in plain:
                    stack.append((item, (*path, key)))


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _param(path: tuple[str | int, ...]) -> str | None:
    return ".".join(str(part) for part in path) or None


class JSONRequest(Request):
    """A request whose `json()` is `parse_json`, so bodies that FastAPI parses follow the same rules."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = parse_json(await self.body())
        return self._json


class JSONRoute(APIRoute):
    """A route whose JSON body, if it takes one, is decoded by `parse_json`: one JSON policy for every route."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict(request: Request) -> Response:
            if self.body_field is not None:
                require_json(request.headers.get("content-type"))
            return await handler(JSONRequest(request.scope, request.receive))

        return strict
