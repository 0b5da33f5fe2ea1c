"""What the OpenAPI schema must say that FastAPI cannot infer: bodies that routes parse themselves, and errors."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from routing.errors import ErrorResponse

_ERRORS = {
    400: "Invalid request: malformed JSON, a wrong Content-Type, or an invalid field (named in `param`).",
    401: "Missing or invalid API key.",
    403: "The API key may not use this route or model; or a server without keys was asked for by a `Host` name it "
    "does not answer to (`host_not_allowed`).",
    404: "Unknown model, adapter or route.",
    405: "Method not allowed on this route.",
    413: "Request body over the size limit.",
    429: "Too many requests for this key; retry after `Retry-After` seconds.",
    500: "Internal error, or an engine replica failed.",
    503: "Engine replicas at capacity; retry after `Retry-After` seconds.",
}
_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}}}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    **{status: {"model": ErrorResponse, "description": description} for status, description in _ERRORS.items()},
    429: {"model": ErrorResponse, "description": _ERRORS[429], "headers": _RETRY_AFTER},
    503: {"model": ErrorResponse, "description": _ERRORS[503], "headers": _RETRY_AFTER},
    "default": {"model": ErrorResponse, "description": "Any other error, in the same shape."},
}
"""Every route may answer these, always as `{"error": {"message", "type", "param", "code"}}`."""
TEXT_ROUTE_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {
        **{key: value for key, value in response.items() if key != "model"},
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
    }
    for status, response in ERROR_RESPONSES.items()
}
"""The same, for a route that answers success as text: FastAPI would list its errors as text too."""


def json_body(model: type[BaseModel], *, streams: bool = False) -> dict[str, Any]:
    """`openapi_extra` for a route that reads its body itself: declares `model` as its JSON request body.

    The schema is inlined (`$defs` resolved) since an operation cannot add components of its own.
    """
    extra: dict[str, Any] = {
        "requestBody": {"required": True, "content": {"application/json": {"schema": _inline(model)}}}
    }
    if streams:
        extra["responses"] = {
            "200": {
                "description": "The completion: one JSON object, or server-sent events when `stream` is true.",
                "content": {"application/json": {"schema": {"type": "object"}}, "text/event-stream": {}},
            }
        }
    return extra


def _inline(model: type[BaseModel]) -> dict[str, Any]:
    schema = model.model_json_schema()
    definitions: dict[str, Any] = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return resolve(definitions[ref.removeprefix("#/$defs/")])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(item) for item in node]
        return node

    resolved: dict[str, Any] = resolve(schema)
    return resolved
