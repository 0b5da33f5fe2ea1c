"""Stream items batched per hop (`serve.streaming.batched`): every event, in order, the first at once."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator

import pytest

from serve.streaming import batched
from serve.wire import ReplicaItem, Usage, WireError


async def paced(items: list[ReplicaItem], gap_s: float) -> AsyncIterator[ReplicaItem]:
    for item in items:
        yield item
        await asyncio.sleep(gap_s)


def events(n: int) -> list[ReplicaItem]:
    return [f"data: {i}\n\n" for i in range(n)]


async def collect(items: AsyncIterator[ReplicaItem]) -> list[tuple[float, ReplicaItem]]:
    started = time.monotonic()
    return [(time.monotonic() - started, item) async for item in items]


async def test_every_event_arrives_in_order_and_the_usage_stays_last() -> None:
    source = [*events(40), "data: [DONE]\n\n", Usage(3, 40)]
    received = [item for _, item in await collect(batched(paced(source, 0.002), 0.02))]
    assert "".join(item for item in received if isinstance(item, str)) == "".join(source[:-1])  # type: ignore[arg-type]
    assert received[-1] == Usage(3, 40)
    assert 2 <= len(received) < 20  # batched: far fewer items than the 42 events


async def test_the_first_event_goes_at_once_and_later_ones_wait_at_most_the_interval() -> None:
    timed = await collect(batched(paced(events(30), 0.005), 0.05))
    assert timed[0][1] == "data: 0\n\n" and timed[0][0] < 0.03
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(timed)]
    assert max(gaps) < 0.05 + 0.04


async def test_zero_interval_sends_what_is_ready_without_waiting() -> None:
    timed = await collect(batched(paced(events(10), 0.01), 0.0))
    assert [item for _, item in timed] == events(10)  # each arrived alone, so each went alone


@pytest.mark.parametrize("first", [WireError(400, "bad", "prompt"), {"id": "x"}])
async def test_a_whole_answer_or_an_error_is_passed_on_as_it_is(first: ReplicaItem) -> None:
    assert [item for _, item in await collect(batched(paced([first], 0), 0.05))] == [first]


async def test_an_engine_error_mid_stream_is_raised_after_the_events_before_it() -> None:
    async def fails() -> AsyncIterator[ReplicaItem]:
        yield "data: a\n\n"
        await asyncio.sleep(0.01)
        yield "data: b\n\n"
        raise RuntimeError("engine died")

    received: list[ReplicaItem] = []
    with pytest.raises(RuntimeError, match="engine died"):
        async for item in batched(fails(), 0.05):
            received.append(item)
    assert "".join(received) == "data: a\n\ndata: b\n\n"  # type: ignore[arg-type]


async def test_closing_the_batched_stream_closes_the_engine_stream() -> None:
    closed = asyncio.Event()

    async def endless() -> AsyncIterator[ReplicaItem]:
        try:
            while True:
                yield "data: a\n\n"
                await asyncio.sleep(0.001)
        finally:
            closed.set()

    items = batched(endless(), 0.01)
    await anext(items)
    await items.aclose()
    assert closed.is_set()


async def test_an_engine_faster_than_its_reader_is_held_back() -> None:
    produced = 0

    async def flood() -> AsyncIterator[ReplicaItem]:
        nonlocal produced
        while True:
            produced += 1
            yield "x"

    items = batched(flood(), 0.0)
    await anext(items)
    await asyncio.sleep(0.05)
    assert produced <= 2 * 1024 + 1  # bounded by MAX_PENDING, not by memory
    await items.aclose()
