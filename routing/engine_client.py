"""How the router reaches engine replicas. Ray stays here: the endpoints see only this module's terms.

`ServeEngineClient` sends a request through the engine deployment's `DeploymentHandle` and streams back
its wire items (`serve.wire`): the first over Ray, the rest over this router's stream channel
(`serve.wire.channel`) when it has one. It owns what depends on the transport: sending a request again when
no replica started it, Serve's back-pressure as 503, cancellation, and giving up on a request whose router is
draining.

Which requests go again: Serve's handle already sends a request elsewhere when a replica dies or is unreachable
before taking it (its "accepted" reply). A replica that took one but found its engine dead answers
`NOT_STARTED`, and it goes to another replica, up to `REPLICA_RETRIES` times. A replica lost while the request
ran (`RayActorError` after it was taken) is not replayed on the others: the request may be what killed it.
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
from routing.request_router import avoid_replica
from serve.wire import NOT_STARTED, AdapterRecord, Endpoint, Relayed, ReplicaItem, ReplyTo, WireError
from serve.wire.channel import ChannelServer, Inbox
from serve.wire.tracing import TRACE_KWARG

logger = logging.getLogger("loraplex.router")
REPLICA_RETRIES = 2
"""Other replicas tried when the one that took a request did not start it (`NOT_STARTED`)."""
NOT_STARTED_RETRY_S = 0.5
"""Wait before sending a request a replica did not start to another: that replica ends meanwhile
(`serve.replica.NOT_STARTED_EXIT_S`), and Serve's handle then routes around a dead replica by itself."""
NOT_REPLAYED = (
    "the engine replica running this request was lost (%s); the request was not sent again, in case it is what "
    "ended the replica: retry it if it is safe to"
)
SHUTTING_DOWN = "this server is shutting down; send the request again"
_UNTRACED: dict[str, str] = {}


class EngineCall(Protocol):
    """One request on a replica: its items after the first; `cancel` makes the replica abort it."""

    def __aiter__(self) -> AsyncIterator[ReplicaItem]: ...

    def cancel(self) -> None: ...


class EngineClient(Protocol):
    """Sends one request to some engine replica."""

    stream_counts: dict[str, int]
    """Streams so far by how their items after the first came: `channel` or `ray`."""

    async def start(
        self,
        endpoint: Endpoint,
        body: dict[str, Any],
        adapter: AdapterRecord | None,
        draining: asyncio.Event,
        trace: str | None = None,
    ) -> tuple[ReplicaItem, EngineCall]:
        """The replica's first item and the call for the rest; `trace`, a `traceparent` the replica continues.

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
        self,
        endpoint: Endpoint,
        body: dict[str, Any],
        adapter: AdapterRecord | None,
        draining: asyncio.Event,
        trace: str | None = None,
    ) -> tuple[ReplicaItem, EngineCall]:
        """A request a replica did not start (`NOT_STARTED`) goes to another, up to `REPLICA_RETRIES` times, once
        that replica has ended, and passed over by our request router (`routing.request_router.avoid_replica`)
        until then; one whose replica was lost while it ran fails (`EngineFailure`) and is not sent again. A
        request still waiting when the router starts draining gets 503: the engines are draining too, so it might
        wait for one until the router is killed.
        """
        failures = 0
        traced = _UNTRACED if trace is None else {TRACE_KWARG: trace}  # a replica without tracing gets no argument
        if self.channel is not None:
            await self.channel.start()
        while True:
            reply_to, inbox = self.channel.open() if self.channel is not None else (None, None)
            call = self._handle.generate.remote(endpoint, body, adapter=adapter, reply_to=reply_to, **traced)
            try:
                first = await _first_item_unless(call, draining)
            except RayActorError as exc:
                self._release(reply_to)
                logger.error("an engine replica was lost while it ran a request; not sending it again", exc_info=exc)
                raise EngineFailure(NOT_REPLAYED % type(exc).__name__) from exc
            except asyncio.CancelledError:  # the client left while the engine worked
                self._release(reply_to)
                call.cancel()  # Serve does not carry a caller's cancellation to the calls it made
                raise
            except BaseException:
                self._release(reply_to)
                raise
            if isinstance(first, WireError) and first.code == NOT_STARTED:
                self._release(reply_to)
                if first.replica is not None:
                    avoid_replica(first.replica)
                failures += 1
                if failures > REPLICA_RETRIES:
                    logger.error("%d engine replicas in a row did not start a request", failures)
                    return first, call
                logger.warning("engine replica %s did not start a request; sending it to another", first.replica)
                await asyncio.sleep(NOT_STARTED_RETRY_S)
                continue
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
