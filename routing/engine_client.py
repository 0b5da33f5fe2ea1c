"""How the router reaches engine replicas. Ray stays here: the endpoints see only this module's terms.

`ServeEngineClient` sends a request through the engine deployment's `DeploymentHandle` and streams back
its wire items (`serve.wire`): the first over Ray, the rest over this router's stream channel
(`serve.wire.channel`) when it has one. It owns what depends on the transport: sending a request again when
its replica died before answering, Serve's back-pressure as 503, cancellation, and giving up on a request
whose router is draining.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, RequestCancelledError

from routing.errors import EngineFailure, OpenAIError, Overloaded
from serve.wire import AdapterRecord, Endpoint, Relayed, ReplicaItem, ReplyTo
from serve.wire.channel import ChannelServer, Inbox

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

    stream_counts: dict[str, int]
    """Streams so far by how their items after the first came: `channel` or `ray`."""

    async def start(
        self, endpoint: Endpoint, body: dict[str, Any], adapter: AdapterRecord | None, draining: asyncio.Event
    ) -> tuple[ReplicaItem, EngineCall]:
        """The replica's first item and the call for the rest.

        Raises `Overloaded` (every replica is full, or `draining` was set first) or `EngineFailure`. A client
        that leaves (this coroutine cancelled) cancels the call.
        """
        ...

    async def ready(self) -> None:
        """Returns once some engine replica answers (its engine started); raises if none can."""
        ...


class ServeEngineClient:
    """An `EngineClient` over the engine deployment's `DeploymentHandle` (`transport`: "grpc" or "ray", the
    router's `engine_transport`); streams over `channel` if given."""

    def __init__(self, handle: Any, channel: ChannelServer | None = None, transport: str = "grpc") -> None:
        # Serve's gRPC transport for the request and first item; `_by_reference` is Serve's name for Ray calls.
        self._handle = handle.options(stream=True, _by_reference=transport == "ray")
        self._unary = handle.options(_by_reference=transport == "ray")
        self.channel = channel
        self.stream_counts = {"channel": 0, "ray": 0}

    async def start(
        self, endpoint: Endpoint, body: dict[str, Any], adapter: AdapterRecord | None, draining: asyncio.Event
    ) -> tuple[ReplicaItem, EngineCall]:
        """A replica that dies (or cannot be reached) before its first item has sent the client nothing,
        so the request goes again, up to `REPLICA_RETRIES` times: Serve's request router stops choosing a
        replica once a call to it failed that way. A request still waiting when the router starts draining
        gets 503: the engines are draining too, so it might wait for one until the router is killed.
        """
        failures = 0
        if self.channel is not None:
            await self.channel.start()
        while True:
            reply_to, inbox = self.channel.open() if self.channel is not None else (None, None)
            call = self._handle.generate.remote(endpoint, body, adapter=adapter, reply_to=reply_to)
            try:
                first = await _first_item_unless(call, draining)
            except RayActorError as exc:
                self._release(reply_to)
                failures += 1
                if failures > REPLICA_RETRIES:
                    logger.error("engine replicas failed %d times before answering", failures, exc_info=exc)
                    raise EngineFailure(f"engine replica failed: {type(exc).__name__}") from exc
                logger.warning(
                    "engine replica lost before answering (%s); sending the request again", type(exc).__name__
                )
                continue
            except asyncio.CancelledError:  # the client left while the engine worked
                self._release(reply_to)
                call.cancel()  # Serve does not carry a caller's cancellation to the calls it made
                raise
            except BaseException:
                self._release(reply_to)
                raise
            if reply_to is None or inbox is None or not isinstance(first, str):
                self._release(reply_to)  # a whole answer or an error: no stream follows
                self.stream_counts["ray"] += isinstance(first, str)
                return first, call
            return first, ChannelledCall(call, inbox, functools.partial(self._ended, reply_to, inbox))

    def _ended(self, reply_to: ReplyTo, inbox: Inbox) -> None:
        self._release(reply_to)
        self.stream_counts["channel" if inbox.channelled else "ray"] += 1

    async def ready(self) -> None:
        await self._unary.ready.remote()

    def _release(self, reply_to: ReplyTo | None) -> None:
        if reply_to is not None and self.channel is not None:
            self.channel.release(reply_to)


class ChannelledCall:
    """A stream's items after the first: from the channel, or over Ray from a replica without one.

    The Ray call stays open until the replica finished the stream, so Serve counts it, cancels it and sees
    its replica die; its last item (`Relayed`) says how many items the channel carried.
    """

    def __init__(self, call: Any, inbox: Inbox, ended: Callable[[], None]) -> None:
        self._call = call
        self._inbox = inbox
        self._ended = ended
        self._over = False
        self._follow = asyncio.ensure_future(self._follow_call())

    async def _follow_call(self) -> None:
        inbox = self._inbox
        try:
            async for item in self._call:
                if isinstance(item, Relayed):
                    inbox.relayed(item)
                else:
                    inbox.put(item, from_channel=False)
            inbox.ray_ended()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # the replica died mid-stream, or failed: after the items before it
            inbox.fail(exc)

    def __aiter__(self) -> AsyncIterator[ReplicaItem]:
        return self._items()

    async def _items(self) -> AsyncIterator[ReplicaItem]:
        try:
            while batch := await self._inbox.take():
                for item in batch:
                    yield item
        finally:
            self._end()

    def cancel(self) -> None:
        self._call.cancel()
        self._follow.cancel()
        self._end()

    def _end(self) -> None:
        if not self._over:
            self._over = True
            self._ended()


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
