"""Fewer, larger items per hop: a stream's events gathered into one wire item per batching interval.

Every item a replica yields costs CPU at each hop (Ray's streaming generator, the router, Serve's proxy),
whatever its size. An engine on a GPU produces a stream's tokens faster than that path relays them one by
one, so the replica sends everything that is ready as one item: server-sent events are text, and several
events concatenated are still a valid event stream. The first event goes at once (time to first token is
unchanged); later ones wait at most the interval. Ray Serve LLM batches its streams the same way
(`stream_batching_interval_ms`, 50 ms by default there).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing, suppress

from serve.wire import ReplicaItem, joined

MAX_PENDING = 1024
"""Items gathered before the engine's stream waits for the router to take them."""


async def batched(items: AsyncIterator[ReplicaItem], interval_s: float) -> AsyncGenerator[ReplicaItem, None]:
    """`items` with consecutive `str` events joined, at most one item per `interval_s` after the first.

    Other items (a whole response, an error, the closing usage) keep their place in the order. Closing
    this generator closes `items` at once (the engine then aborts the request); an exception raised by
    `items` is raised here after the events that came before it.
    """
    pending: deque[ReplicaItem] = deque()
    arrived, taken = asyncio.Event(), asyncio.Event()
    producer = asyncio.create_task(_drain_into(items, pending, arrived, taken))
    try:
        first, sent_at = True, 0.0
        while True:
            if not pending and not producer.done():
                arrived.clear()
                await arrived.wait()
            if not first and interval_s > 0 and not producer.done():
                # Gather what the engine produces during the interval, unless the stream ends first.
                await asyncio.wait((producer,), timeout=max(0.0, sent_at + interval_s - time.monotonic()))
            ready = joined(pending)
            taken.set()
            for item in ready:
                yield item
            first = False
            sent_at = time.monotonic()
            if producer.done() and not pending:
                producer.result()  # raises what `items` raised
                return
    finally:
        if not producer.done():
            producer.cancel()
            with suppress(asyncio.CancelledError):
                await producer


async def _drain_into(
    items: AsyncIterator[ReplicaItem], pending: deque[ReplicaItem], arrived: asyncio.Event, taken: asyncio.Event
) -> None:
    """Moves `items` into `pending`; waits for the consumer when it holds `MAX_PENDING` (back-pressure)."""
    try:
        async with aclosing(items) as stream:  # type: ignore[type-var]
            async for item in stream:
                pending.append(item)
                arrived.set()
                if len(pending) >= MAX_PENDING:
                    taken.clear()
                    await taken.wait()
    finally:
        arrived.set()  # the end, or what `items` raised, wakes the consumer
