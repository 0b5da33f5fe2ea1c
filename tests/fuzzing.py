"""What the schemathesis runs check, and how they steer generated cases: shared by the in-process and live runs.

Plain functions over schemathesis' objects, so this module imports without schemathesis installed.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

from routing.errors import ANTHROPIC_ROUTES

if TYPE_CHECKING:
    from schemathesis import Case, CheckContext, Response

GENERATE_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
ERROR_FIELDS = {"message", "type", "param", "code"}
RETRYABLE = {429, 503}


def openai_error_shape(ctx: CheckContext, response: Response, case: Case) -> bool | None:
    """A schemathesis check: every error is `{"error": {"message", "type", "param", "code"}}` (Anthropic's shape on
    its routes); 429 and 503 say when."""
    if response.status_code < 400:
        return None
    where = f"{case.method} {case.formatted_path} answered {response.status_code}"
    if response.status_code in RETRYABLE:
        assert "retry-after" in response.headers, f"{where} without Retry-After"
    if case.method.upper() == "HEAD":
        return None  # no body, by definition
    try:
        body = response.json()
    except ValueError:
        raise AssertionError(f"{where} without a JSON body: {response.content[:200]!r}") from None
    if case.formatted_path in ANTHROPIC_ROUTES:  # Anthropic's API, Anthropic's shape
        assert isinstance(body, dict) and body.get("type") == "error", f"{where} outside Anthropic's shape: {body!r}"
        assert set(body["error"]) == {"type", "message"} and body["error"]["message"], f"{where}: {body!r}"
        return None
    assert isinstance(body, dict) and set(body) == {"error"}, f"{where} outside OpenAI's error shape: {body!r}"
    error = body["error"]
    assert isinstance(error, dict) and set(error) == ERROR_FIELDS, f"{where} with error fields {error!r}"
    assert isinstance(error["message"], str) and error["message"], f"{where} without a message"
    assert isinstance(error["type"], str) and error["type"], f"{where} without a type"
    assert error["param"] is None or isinstance(error["param"], str), f"{where} with param {error['param']!r}"
    assert error["code"] is None or isinstance(error["code"], str), f"{where} with code {error['code']!r}"
    return None


def steer(case: Case, served: Sequence[str], max_tokens: int | None = None) -> None:
    """Points about one generation request in three at a served model, and optionally caps its tokens.

    Generated model ids are random strings, which only ever find the 404 path; the choice hashes the
    generated id, so it is as deterministic as the case. A cap (for a real engine) lowers or adds
    `max_tokens` only when it is a valid count, so invalid values still reach the router as generated.
    """
    body = case.body
    if case.operation.path not in GENERATE_PATHS or not isinstance(body, dict):
        return
    model = body.get("model")
    if isinstance(model, str) and zlib.crc32(model.encode("utf-8", "surrogatepass")) % 3 == 0:
        body["model"] = served[zlib.crc32(model.encode("utf-8", "surrogatepass")) % len(served)]
    if max_tokens is not None:
        value = body.get("max_tokens")
        if value is None or (type(value) is int and value > max_tokens):
            body["max_tokens"] = max_tokens
