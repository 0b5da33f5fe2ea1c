"""The request body size limit, enforced for every route before any route reads a byte of the body.

A declared `Content-Length` over the limit is answered at once, without reading the body; otherwise
the body is read here, chunk by chunk, and refused as soon as it passes the limit (a chunked body,
or one longer than it declared), so no route ever holds more than `max_bytes` of one request.

Before a byte of an API route's body is read, its key is checked (401 at once: an unknown client cannot
make the router hold megabytes), and the whole body must arrive within `read_timeout_s` (408): clients
trickling bytes cannot hold the router's slots for ever.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from routing.errors import (
    ANTHROPIC_ROUTES,
    InvalidRequest,
    OpenAIError,
    PayloadTooLarge,
    RequestTimeout,
    error_response,
)

MAX_BODY_BYTES = 4 * 1024 * 1024
API_PREFIXES = ("/v1/", "/tokenize", "/detokenize")
"""Routes whose key is checked before their body is read (`/health` and `/metrics` have no body)."""


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value).decode("latin-1")
    return None


class BodyLimit:
    """ASGI middleware: 413 in OpenAI's error shape for a request body over `max_bytes`."""

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int = MAX_BODY_BYTES,
        authenticate: Callable[[str | None, str | None], Any] | None = None,
        read_timeout_s: float | None = None,
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.authenticate = authenticate
        self.read_timeout_s = read_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            if self.authenticate is not None and scope["path"].startswith(API_PREFIXES):
                self.authenticate(_header(scope, b"authorization"), _header(scope, b"x-api-key"))  # or Unauthorized
            self._check_declared_length(scope)
            try:
                async with asyncio.timeout(self.read_timeout_s):
                    body = await self._read(receive)
            except TimeoutError:
                raise RequestTimeout(f"the request body did not arrive within {self.read_timeout_s:g} s") from None
        except OpenAIError as exc:
            await error_response(exc, anthropic=scope["path"] in ANTHROPIC_ROUTES)(scope, receive, send)
            return
        if body is None:
            return  # the client went away before sending its whole body
        await self.app(scope, _replay(body, receive), send)

    def _check_declared_length(self, scope: Scope) -> None:
        values = [value for name, value in scope["headers"] if name == b"content-length"]
        if not values:
            return
        if len(set(values)) > 1 or not values[0].isdigit():
            raise InvalidRequest("Content-Length must be one non-negative integer")
        digits = values[0].lstrip(b"0") or b"0"  # compared as text first: int() refuses 4,300+ digits
        if len(digits) > len(str(self.max_bytes)) or int(digits) > self.max_bytes:
            raise self._too_large(f" of {digits[:32].decode()} bytes")

    async def _read(self, receive: Receive) -> bytes | None:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                raise self._too_large()
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _too_large(self, size: str = "") -> PayloadTooLarge:
        return PayloadTooLarge(f"request body{size} is over the limit of {self.max_bytes} bytes")


def _replay(body: bytes, receive: Receive) -> Receive:
    """The body in one message, then the server's own messages (a disconnect, for a streaming response)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replayed
