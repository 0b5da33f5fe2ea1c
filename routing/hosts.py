"""The `Host` check of an open server (no keys): a defence against DNS rebinding.

A web page the developer visits can rebind its own domain to 127.0.0.1 and then call the server from the browser as
a page of that domain; without keys the server would let it register, delete and use adapters. The browser still
sends the page's name as `Host`, so an open server answers only `localhost`, `*.localhost`, IP addresses (a page
cannot rebind an address) and the names in `router.allowed_hosts`; any other name gets 403. Jupyter and Ollama
check `Host` so on loopback. A server with keys needs no such check: a rebound page has no key.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

from routing.errors import HostNotAllowed, error_response

ALWAYS = ("localhost", "*.localhost")
"""Names that resolve to loopback on every machine (RFC 6761), whatever a DNS server says."""


def host_name(header: str) -> str:
    """The name in a `Host` header value, without its port: `[::1]:8000` → `::1`, `Example.com.:80` → `example.com`."""
    value = header.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        return value[1:end] if end > 0 else value
    name, colon, port = value.rpartition(":")
    if colon and port.isdigit():
        value = name
    return value.rstrip(".")


class HostNames:
    """The names an open server answers to: any IP address, `ALWAYS`, and exact names or `*.NAME` patterns."""

    def __init__(self, allowed: Iterable[str]) -> None:
        names = [*ALWAYS, *allowed]
        self.any = "*" in names
        self.exact = frozenset(name for name in names if not name.startswith("*."))
        self.suffixes = tuple(name[1:] for name in names if name.startswith("*."))

    def allow(self, name: str) -> bool:
        if self.any or name in self.exact or name.endswith(self.suffixes):
            return True
        try:
            ipaddress.ip_address(name)
        except ValueError:
            return False
        return True


class HostCheck:
    """ASGI middleware, outermost: 403 in OpenAI's error shape for a request whose `Host` names another server.

    A request without `Host` (HTTP/1.0; no browser sends one so) passes.
    """

    def __init__(self, app: ASGIApp, allowed: Iterable[str]) -> None:
        self.app = app
        self.names = HostNames(allowed)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            header = next((value for key, value in scope["headers"] if key == b"host"), None)
            name = host_name(bytes(header).decode("latin-1")) if header is not None else None
            if name is not None and not self.names.allow(name):
                refusal = HostNotAllowed(
                    f"This server has no API keys, so it answers only requests for localhost, an IP address or a "
                    f"name in router.allowed_hosts, not `{name[:255]}`."
                )
                await error_response(refusal)(scope, receive, send)
                return
        await self.app(scope, receive, send)
