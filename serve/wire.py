"""What an engine replica sends back to the router through a Serve handle.

A replica's `generate` is an async generator. Its first item decides the HTTP answer:
an `EngineError` (an OpenAI-shaped error with its status), a `dict` (a whole JSON response),
or a `str` (the first server-sent event of a stream, more `str` events following). A stream
ends with one `Usage` item, which the router records and does not forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Endpoint = Literal["completions", "chat"]


@dataclass(frozen=True)
class EngineError:
    """An error answered by the engine replica, already in OpenAI's terms."""

    status: int
    message: str
    type: str
    param: str | None = None
    code: str | None = None


@dataclass(frozen=True)
class Usage:
    """Token counts of one finished request."""

    prompt_tokens: int
    completion_tokens: int


ReplicaItem = EngineError | Usage | dict | str
