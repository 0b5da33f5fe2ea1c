"""How the router reaches engine replicas. Ray stays here: the endpoints see only this module's terms.

`ServeEngineClient` sends a request through the engine deployment's `DeploymentHandle` and streams back
its wire items (`serve.wire`). It owns what depends on the transport: sending a request again when its
replica died before answering, Serve's back-pressure as 503, cancellation, and giving up on a request
whose router is draining.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any, Protocol

from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, RequestCancelledError

from routing.errors import EngineFailure, OpenAIError, Overloaded
from serve.adapters.records import AdapterRecord
from serve.wire import Endpoint, ReplicaItem

logger = logging.getLogger("loraplex.router")
REPLICA_RETRIES = 2
"""Other replicas tried when the one serving a request dies before its first item."""
SHUTTING_DOWN = "this server is shutting down; send the request again"


class EngineCall(Protocol):
    """One request on a replica: its items after the first; `cancel` makes the replica abort it."""

    def __aiter__(self) -> AsyncIterator[ReplicaItem]: ...

    def cancel(self) -> None: ...


class EngineClient(Protocol):
    """Sends one request to some engine replica."""

    async def start(
        self, endpoint: Endpoint, body: dict[str, Any], adapter: AdapterRecord | None, draining: asyncio.Event
    ) -> tuple[ReplicaItem, EngineCall]:
        """The replica's first item and the call for the rest.

        Raises `Overloaded` (every replica is full, or `draining` was set first) or `EngineFailure`. A client
        that leaves (this coroutine cancelled) cancels the call.
        """
        ...


class ServeEngineClient:
    """An `EngineClient` over the engine deployment's `DeploymentHandle`."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle.options(stream=True)

    async def start(
        self, endpoint: Endpoint, body: dict[str, Any], adapter: AdapterRecord | None, draining: asyncio.Event
    ) -> tuple[ReplicaItem, EngineCall]:
        """A replica that dies (or cannot be reached) before its first item has sent the client nothing,
        so the request goes again, up to `REPLICA_RETRIES` times: Serve's request router stops choosing a
        replica once a call to it failed that way. A request still waiting when the router starts draining
        gets 503: the engines are draining too, so it might wait for one until the router is killed.
        """
        failures = 0
        while True:
            call = self._handle.generate.remote(endpoint, body, adapter=adapter)
            try:
                return await _first_item_unless(call, draining), call
            except RayActorError as exc:
                failures += 1
                if failures > REPLICA_RETRIES:
                    logger.error("engine replicas failed %d times before answering", failures, exc_info=exc)
                    raise EngineFailure(f"engine replica failed: {type(exc).__name__}") from exc
                logger.warning(
                    "engine replica lost before answering (%s); sending the request again", type(exc).__name__
                )
            except asyncio.CancelledError:  # the client left while the engine worked
                call.cancel()  # Serve does not carry a caller's cancellation to the calls it made
                raise


async def _first_item_unless(call: Any, draining: asyncio.Event) -> ReplicaItem:
    """The call's first item, or 503 once `draining` is set before it came."""
    first = asyncio.ensure_future(_first_item(call))
    stop = asyncio.ensure_future(draining.wait())
    try:
        await asyncio.wait((first, stop), return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.cancel()
        if not first.done():  # draining, or the client left
            first.cancel()
            first.add_done_callback(_retrieve)  # its outcome is moot now
    if not first.done():
        call.cancel()
        raise Overloaded(SHUTTING_DOWN)
    return first.result()


def _retrieve(task: asyncio.Future[ReplicaItem]) -> None:
    if not task.cancelled():
        task.exception()


async def _first_item(call: Any) -> ReplicaItem:
    """The replica's first item; `RayActorError` (the replica died or is unreachable) passes through."""
    try:
        item: ReplicaItem = await anext(call)
        return item
    except BackPressureError:
        raise Overloaded("all engine replicas are at capacity; retry shortly") from None
    except RequestCancelledError:  # the router cancelled the call itself: no engine failed
        raise asyncio.CancelledError from None
    except StopAsyncIteration:
        raise EngineFailure("engine replica closed the request without an answer") from None
    except (OpenAIError, RayActorError):
        raise
    except Exception as exc:  # a replica that failed: the handle re-raises its error here
        logger.exception("engine replica failed before answering")
        raise EngineFailure(f"engine replica failed: {type(exc).__name__}") from exc
