"""What an engine replica sends back to the router through a Serve handle.

A replica's `generate` is an async generator. Its first item decides the HTTP answer:
an `WireError` (an OpenAI-shaped error with its status), a `dict` (a whole JSON response),
or a `str` (the first server-sent event of a stream, more `str` events following). A stream
ends with one `Usage` item, which the router records and does not forward. A request sent with
`reply_to` gets its stream's items after the first over the router's channel (`serve.channel`) and
ends with `Relayed` over Ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Endpoint = Literal["completions", "chat"]


@dataclass(frozen=True)
class WireError:
    """An error answered across the wire (by an engine replica or the registry), already in OpenAI's terms:
    the router answers it as is (`routing.errors.UpstreamError`). `type` defaults to the status's
    (`error_type`)."""

    status: int
    message: str
    param: str | None = None
    type: str = ""
    code: str | None = None
    retry_after: int | None = None
    """Seconds a client should wait before sending it again (a 503's `Retry-After`)."""

    def __post_init__(self) -> None:
        if not self.type:
            object.__setattr__(self, "type", error_type(self.status))


@dataclass(frozen=True)
class Usage:
    """Token counts of one finished request."""

    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class ReplyTo:
    """Where a replica sends stream `stream`'s items after the first: a router's channel."""

    host: str
    port: int
    token: str
    stream: int


@dataclass(frozen=True)
class Relayed:
    """A replica's last item over Ray for a stream whose items went over the channel.

    `count` items were written to the channel; `failure` names the error that ended the stream early.
    """

    count: int
    failure: str | None = None


ReplicaItem = WireError | Usage | Relayed | dict | str


ADAPTER_ID_SEPARATOR = ":"


def adapter_model_id(base_id: str, name: str) -> str:
    """The public id of adapter `name` on base model `base_id`: `BASE:NAME`, the one place it is formatted."""
    return f"{base_id}{ADAPTER_ID_SEPARATOR}{name}"


def error_type(status: int) -> str:
    """OpenAI's error `type` for an HTTP status."""
    if status == 404:
        return "not_found_error"
    if status < 500:
        return "invalid_request_error"
    return "server_error"


ROUTING_STATS_ADAPTERS = "adapters"
"""Key of a replica's routing stats (Serve's `record_routing_stats`): the adapters it holds."""
