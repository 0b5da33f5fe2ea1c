"""Streams after their first item: one direct connection from each engine replica to each router.

Ray Serve carries every request and its first item: placement by the request router, queue lengths,
back-pressure, autoscaling, cancellation and resending a request no replica took all stay Serve's. Only
what follows takes this channel: a router listens on its node's address; a replica opens one TCP
connection to each router that sends it requests, proves it with the router's token, and writes every
stream's items of one event-loop turn as one frame. A streamed token then costs
a share of one write, not a Ray item (serialisation, the owner's report, the caller's fetch) per stream.

The replica ends such a stream with a `Relayed` item over Ray, which says how many items the channel
carried, so the router knows when it has them all. A replica that cannot reach the router sends the
stream over Ray as before. No Ray here: the replica (`serve.replica`) and the router's engine client
(`routing.engine_client`) use this module on their side of the handle.

Frames are length-prefixed msgpack, never pickle, and nothing is decoded before the token matched.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
import secrets
from collections import deque
from typing import Any

import msgspec

from serve.wire import Relayed, ReplicaItem, ReplyTo, Usage, WireError, joined

logger = logging.getLogger("loraplex.channel")
MAGIC = b"loraplex-channel/1 "
HELLO_TIMEOUT_S = 5.0
"""A connection that has not shown the token by then is closed."""
CONNECT_TIMEOUT_S = 5.0
MAX_FRAME_BYTES = 64 * 1024 * 1024
MAX_BUFFERED_BYTES = 64 * 1024 * 1024
"""Bytes a replica holds unsent for one router before it gives the connection up (the router stopped reading)."""
RELAYED_GRACE_S = 30.0
"""How long a router waits for a stream's last channel items after its replica said it sent them."""

_TEXT, _USAGE, _ERROR, _JSON = 0, 1, 2, 3
_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(list[list[Any]])


class ChannelClosed(ConnectionError):
    """The connection to the router is gone: the streams on it cannot go on."""


class ReplicaFailed(Exception):
    """A stream ended by an error in its replica, after the items before it."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def _entry(stream: int, item: ReplicaItem) -> tuple[Any, ...]:
    if isinstance(item, str):
        return (stream, _TEXT, item)
    if isinstance(item, Usage):
        return (stream, _USAGE, item.prompt_tokens, item.completion_tokens)
    if isinstance(item, WireError):
        return (stream, _ERROR, item.status, item.message, item.param, item.type, item.code, item.retry_after)
    return (stream, _JSON, item)


def _item(entry: list[Any]) -> ReplicaItem:
    kind = entry[1]
    if kind == _TEXT:
        return str(entry[2])
    if kind == _USAGE:
        return Usage(prompt_tokens=int(entry[2]), completion_tokens=int(entry[3]))
    if kind == _ERROR:
        return WireError(*entry[2:8])
    if kind == _JSON and isinstance(entry[2], dict):
        return entry[2]
    raise ValueError(f"unknown channel entry kind {kind!r}")


# --------------------------------------------------------------------------------------------- replica side


class Link:
    """A replica's connection to one router. `send` never waits: a turn's items go as one frame."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self._pending: list[tuple[Any, ...]] = []
        self._scheduled = False
        self.closed = False
        self._watch = asyncio.ensure_future(self._until_closed(reader))

    def send(self, stream: int, item: ReplicaItem) -> None:
        if self.closed:
            raise ChannelClosed("the connection to the router closed")
        self._pending.append(_entry(stream, item))
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        if self.closed or not self._pending:
            return
        payload = _ENCODER.encode(self._pending)
        self._pending = []
        self._writer.write(len(payload).to_bytes(4, "big") + payload)
        if self._writer.transport.get_write_buffer_size() > MAX_BUFFERED_BYTES:
            logger.error("a router stopped reading its stream channel; closing it")
            self.close()

    async def _until_closed(self, reader: asyncio.StreamReader) -> None:
        """The router never writes: end of file (or an error) is the connection closing."""
        try:
            await reader.read()
        except (ConnectionError, OSError):
            pass
        finally:
            self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._pending = []
            self._writer.close()
            self._watch.cancel()


class Links:
    """A replica's connections to routers, each opened on first use and kept."""

    def __init__(self) -> None:
        self._links: dict[tuple[str, int, str], Link] = {}
        self._opening: dict[tuple[str, int, str], asyncio.Future[Link]] = {}

    async def get(self, to: ReplyTo) -> Link:
        """The open connection to `to`'s router; raises `OSError` when it cannot be reached."""
        key = (to.host, to.port, to.token)
        link = self._links.get(key)
        if link is not None and not link.closed:
            return link
        opening = self._opening.get(key)
        if opening is None:
            opening = asyncio.ensure_future(self._open(key))
            self._opening[key] = opening
            opening.add_done_callback(lambda _: self._opening.pop(key, None))
        return await asyncio.shield(opening)

    async def _open(self, key: tuple[str, int, str]) -> Link:
        host, port, token = key
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), CONNECT_TIMEOUT_S)
        writer.write(MAGIC + token.encode() + b"\n")
        link = Link(reader, writer)
        self._links = {k: v for k, v in self._links.items() if not v.closed}
        self._links[key] = link
        return link

    def close(self) -> None:
        for link in self._links.values():
            link.close()
        self._links.clear()


# ---------------------------------------------------------------------------------------------- router side


class Inbox:
    """One stream's items after the first, from the channel or (a replica without a channel) over Ray."""

    def __init__(self) -> None:
        self._items: deque[ReplicaItem] = deque()
        self._wake = asyncio.Event()
        self._received = 0
        self._expected: int | None = None
        self._failure: str | None = None
        self._error: BaseException | None = None
        self._ray_ended = False

    def put(self, item: ReplicaItem, *, from_channel: bool = True) -> None:
        self._items.append(item)
        if from_channel:
            self._received += 1
        self._wake.set()

    @property
    def channelled(self) -> bool:
        """Whether the replica sent this stream over the channel."""
        return self._expected is not None

    def relayed(self, relayed: Relayed) -> None:
        self._expected, self._failure = relayed.count, relayed.failure
        self._wake.set()

    def ray_ended(self) -> None:
        self._ray_ended = True
        self._wake.set()

    def fail(self, error: BaseException) -> None:
        self._error = error
        self._wake.set()

    async def take(self) -> list[ReplicaItem]:
        """Everything that came (consecutive events joined); [] at the end. Raises what ended the stream."""
        while True:
            if self._items:
                return joined(self._items)
            if self._error is not None:
                raise self._error
            if self._ray_ended and (self._expected is None or self._received >= self._expected):
                if self._failure is not None:
                    raise ReplicaFailed(self._failure)
                return []
            self._wake.clear()
            if self._ray_ended:  # the replica sent them: they are on their way
                try:
                    await asyncio.wait_for(self._wake.wait(), RELAYED_GRACE_S)
                except TimeoutError:
                    raise ChannelClosed(
                        f"{self._expected - self._received} items of a stream never came over its channel"  # type: ignore[operator]
                    ) from None
            else:
                await self._wake.wait()


class ChannelServer:
    """A router's listener for its replicas' connections; items go to the `Inbox` of their stream."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.port = 0
        self._token = secrets.token_hex(16)
        self._hello = MAGIC + self._token.encode() + b"\n"
        self._inboxes: dict[int, Inbox] = {}
        self._ids = itertools.count(1)
        self._server: asyncio.Server | None = None
        self._starting: asyncio.Lock | None = None
        self._connections: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        if self._server is not None:
            return
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            if self._server is None:
                server = await asyncio.start_server(self._serve, self.host, 0)
                self.port = server.sockets[0].getsockname()[1]
                self._server = server

    def open(self) -> tuple[ReplyTo, Inbox]:
        """A new stream: where its replica sends its items, and where they arrive."""
        stream = next(self._ids)
        inbox = Inbox()
        self._inboxes[stream] = inbox
        return ReplyTo(self.host, self.port, self._token, stream), inbox

    def release(self, to: ReplyTo) -> None:
        """The stream is over: items still coming for it are dropped."""
        self._inboxes.pop(to.stream, None)

    @property
    def streams(self) -> int:
        return len(self._inboxes)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections.add(writer)
        try:
            hello = await asyncio.wait_for(reader.readline(), HELLO_TIMEOUT_S)
            if not hmac.compare_digest(hello, self._hello):
                logger.warning("refused a stream channel connection without this router's token")
                return
            inboxes = self._inboxes
            while True:
                size = int.from_bytes(await reader.readexactly(4), "big")
                if size > MAX_FRAME_BYTES:
                    logger.error("a replica sent a %d-byte frame; closing its stream channel", size)
                    return
                for entry in _DECODER.decode(await reader.readexactly(size)):
                    inbox = inboxes.get(entry[0])
                    if inbox is not None:
                        inbox.put(_item(entry))
        except (asyncio.IncompleteReadError, ConnectionError, OSError, TimeoutError):
            pass  # the replica went away; its streams' Ray calls say how they ended
        except (msgspec.DecodeError, ValueError, IndexError, TypeError):
            logger.exception("a replica sent a malformed frame; closing its stream channel")
        finally:
            self._connections.discard(writer)
            writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._connections):
                writer.close()
            await self._server.wait_closed()
            self._server = None
