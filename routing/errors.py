"""The one error model: exceptions that carry their OpenAI error type and HTTP status.

Every error leaves the router as `{"error": {"message", "type", "param", "code"}}`; streams end with
one such event followed by `data: [DONE]`.
"""

from __future__ import annotations

import json
import logging
import secrets
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve.wire import WireError, error_type

logger = logging.getLogger("loraplex.router")


class ErrorDetail(BaseModel):
    """The fields of an error, as OpenAI's API and SDKs define them."""

    message: str = Field(description="What went wrong, for a person.")
    type: str = Field(description="The error's kind, e.g. `invalid_request_error`, `not_found_error`.")
    param: str | None = Field(description="The request field at fault, dotted for nested ones (`messages.0.role`).")
    code: str | None = Field(description="A stable machine-readable code, when there is one (`model_not_found`).")


class ErrorResponse(BaseModel):
    """The body of every error response (documents `OpenAIError.body()` in the OpenAPI schema)."""

    error: ErrorDetail


class OpenAIError(Exception):
    """Base of every error the router answers with; subclasses fix status and type."""

    status: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        return {}

    def shown_to(self, admin: bool) -> OpenAIError:
        """This error as a caller sees it: with the admin scope (or on an open server) or without."""
        return self


class InvalidRequest(OpenAIError):
    status = 400
    type = "invalid_request_error"


class ModelNotFound(OpenAIError):
    status = 404
    type = "not_found_error"
    code = "model_not_found"


class RouteNotFound(OpenAIError):
    status = 404
    type = "not_found_error"


class MethodNotAllowed(OpenAIError):
    status = 405
    type = "invalid_request_error"


class PayloadTooLarge(OpenAIError):
    status = 413
    type = "invalid_request_error"
    code = "payload_too_large"


class RequestTimeout(OpenAIError):
    """The client did not send its whole body within the router's read deadline."""

    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class Unauthorized(OpenAIError):
    """No API key, or one the server does not know."""

    status = 401
    type = "authentication_error"
    code = "invalid_api_key"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class PermissionDenied(OpenAIError):
    """A valid API key asked for a model or an action outside its scope."""

    status = 403
    type = "permission_error"


class HostNotAllowed(PermissionDenied):
    """An open server asked for by a name it does not answer to (`routing.hosts`)."""

    code = "host_not_allowed"


class RetryLater(OpenAIError):
    """An error the client should retry after `retry_after` seconds (sent as `Retry-After`)."""

    default_retry_after = 1

    def __init__(self, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.retry_after = self.default_retry_after if retry_after is None else retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class RateLimited(RetryLater):
    """The key is over its requests or tokens per minute."""

    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class Overloaded(RetryLater):
    """The service is at capacity."""

    status = 503
    type = "overloaded_error"
    code = "overloaded"


class NotReady(RetryLater):
    """This router cannot reach what it needs to serve (the registry, every engine replica)."""

    status = 503
    type = "server_error"
    code = "not_ready"
    default_retry_after = 5


class EngineFailure(OpenAIError):
    """An engine replica failed while serving the request."""

    status = 500
    type = "server_error"


class UpstreamError(OpenAIError):
    """An error answered across the wire (an engine replica, the registry), passed on as it was answered."""

    def __init__(self, error: WireError) -> None:
        super().__init__(error.message, param=error.param, code=error.code)
        self.status = error.status
        self.type = error.type
        self.retry_after = error.retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}


def new_request_id() -> str:
    """An id for one failed request: the client quotes it, the log holds what went wrong under it."""
    return f"req_{secrets.token_hex(12)}"


class AdapterUnavailable(OpenAIError):
    """An adapter that cannot be served, for a reason that may name a host path, a bucket or the S3 endpoint.

    The client gets `message` and a request id; the log gets the reason under that id, and so do admin keys
    (`shown_to`), which manage the adapter and may see where it comes from.
    """

    code = "adapter_unavailable"

    def __init__(
        self, message: str, reason: str, *, status: int, param: str | None = "model", retry_after: int | None = None
    ) -> None:
        self.request_id = new_request_id()
        super().__init__(f"{message} (request id {self.request_id}).", param=param)
        self.status = status
        self.type = error_type(status)
        self.retry_after = retry_after
        self.summary = message
        self.reason = reason
        logger.warning("request %s: %s: %s", self.request_id, message, reason)

    @classmethod
    def from_wire(cls, error: WireError) -> AdapterUnavailable:
        return cls(error.message, error.detail or "", status=error.status, param=error.param,
                   retry_after=error.retry_after)  # fmt: skip

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}

    def shown_to(self, admin: bool) -> OpenAIError:
        if admin:
            self.message = f"{self.summary}: {self.reason} (request id {self.request_id})."
        return self


def upstream(error: WireError) -> OpenAIError:
    """The router's error for one answered across the wire: as it was answered, or, when it carries a `detail`
    only admins may read, an `AdapterUnavailable`."""
    return UpstreamError(error) if error.detail is None else AdapterUnavailable.from_wire(error)


class _ErrorJSONResponse(JSONResponse):
    """Renders as ASCII JSON, so a message quoting any client text (lone surrogates too) always encodes."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode("ascii")


ANTHROPIC_ROUTES = ("/v1/messages",)
"""Routes of Anthropic's API: their errors take Anthropic's shape, so its SDK reads them."""
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                    503: "overloaded_error"}  # fmt: skip


def anthropic_body(exc: OpenAIError) -> dict[str, Any]:
    """`exc` as Anthropic's API answers errors: `{"type": "error", "error": {"type", "message"}}`."""
    kind = _ANTHROPIC_TYPES.get(exc.status, "api_error" if exc.status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": exc.message}}


def is_anthropic(request: Request) -> bool:
    return request.url.path in ANTHROPIC_ROUTES


def error_response(exc: OpenAIError, *, anthropic: bool = False) -> JSONResponse:
    body = anthropic_body(exc) if anthropic else exc.body()
    return _ErrorJSONResponse(body, status_code=exc.status, headers=exc.headers())


def sse_error(exc: OpenAIError, *, anthropic: bool = False) -> str:
    """The closing events of a stream that failed after it started."""
    if anthropic:
        return f"event: error\ndata: {json.dumps(anthropic_body(exc))}\n\n"
    return f"data: {json.dumps(exc.body())}\n\ndata: [DONE]\n\n"


def validation_param(loc: tuple[int | str, ...]) -> str | None:
    """`("body", "messages", 0, "role")` → `"messages.0.role"`, `("query", "limit")` → `"limit"`: the field the
    client got wrong."""
    parts = loc[1:] if loc and loc[0] in ("body", "query") else loc
    return ".".join(str(part) for part in parts) or None


def install_error_handlers(app: FastAPI) -> None:
    """Makes every error path of `app`, FastAPI's own included, answer in OpenAI's shape."""

    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
        return error_response(exc, anthropic=is_anthropic(request))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        if first["type"] == "json_invalid":  # FastAPI's loc is ("body", offset): no field to name
            error = InvalidRequest(f"request body is not valid JSON: {first['msg']}")
        else:
            error = InvalidRequest(first["msg"], param=validation_param(tuple(first["loc"])))
        return error_response(error, anthropic=is_anthropic(request))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error: OpenAIError
        if isinstance(exc.__cause__, OpenAIError):  # FastAPI's 400 for a body our `JSONRequest` refused
            error = exc.__cause__
        elif exc.status_code == 404:
            error = RouteNotFound(f"no route {request.method} {request.url.path}")
        elif exc.status_code == 405:
            error = MethodNotAllowed(f"method {request.method} not allowed on {request.url.path}")
        else:
            error = OpenAIError(str(exc.detail))
            error.status = exc.status_code
            error.type = error_type(exc.status_code)
        response = error_response(error, anthropic=is_anthropic(request))
        response.headers.update(exc.headers or {})  # e.g. 405's `Allow`
        return response

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(OpenAIError(f"internal error: {type(exc).__name__}"), anthropic=is_anthropic(request))
