"""The stream channel (serve/wire/channel.py) between a real replica (simulated engine) and the router's engine client,
over real sockets on loopback; Ray's call is stood in for by a task running the replica's `generate`."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from routing.engine_client import ServeEngineClient
from serve.config import EngineConfig
from serve.engines.simulated import SimulatedEngine
from serve.replica import Replica
from serve.wire import Relayed, ReplicaItem, ReplyTo, Usage, WireError
from serve.wire import channel as channel_module
from serve.wire.channel import MAGIC, ChannelServer, ReplicaFailed
from tests.unit.fake_engine import FakeHandle

_END = object()


class LiveCall:
    """A Serve streaming call to `generate` run in its own task: `cancel` cancels it there, as Ray does."""

    def __init__(self, items: AsyncIterator[ReplicaItem]) -> None:
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.over_ray: list[ReplicaItem] = []
        self.error: Exception | None = None
        self.task = asyncio.ensure_future(self._pump(items))

    async def _pump(self, items: AsyncIterator[ReplicaItem]) -> None:
        try:
            async for item in items:
                self.over_ray.append(item)
                await self.queue.put(item)
            await self.queue.put(_END)
        except Exception as exc:
            self.error = exc
            await self.queue.put(exc)

    def __aiter__(self) -> LiveCall:
        return self

    async def __anext__(self) -> ReplicaItem:
        item = await self.queue.get()
        if item is _END:
            raise StopAsyncIteration
        if isinstance(item, Exception):
            raise item
        return item  # type: ignore[no-any-return]

    def cancel(self) -> None:
        self.task.cancel()


class ReplicaHandle(FakeHandle):
    """The engine deployment's handle with one in-process replica behind it."""

    def __init__(self, replica: Replica) -> None:
        self.replica = replica
        self.calls: list[LiveCall] = []
        self.reply_to: list[ReplyTo | None] = []

    def _call(self, endpoint: Any, body: dict[str, Any], *, adapter: Any = None, reply_to: Any = None) -> LiveCall:
        self.reply_to.append(reply_to)
        self.calls.append(LiveCall(self.replica.generate(endpoint, body, adapter=adapter, reply_to=reply_to)))
        return self.calls[-1]


@pytest.fixture
async def sim() -> AsyncIterator[SimulatedEngine]:
    config = EngineConfig.model_validate(
        {"kind": "simulated", "model": "sim", "max_num_seqs": 64, "simulated": {"step_ms": 2}}
    )
    engine = SimulatedEngine(config)
    await engine.start()
    yield engine
    engine.shutdown()


@pytest.fixture
async def channel() -> AsyncIterator[ChannelServer]:
    server = ChannelServer("127.0.0.1")
    yield server
    await server.close()


def stream_body(max_tokens: int) -> dict[str, Any]:
    return {"model": "sim", "prompt": "a b c", "max_tokens": max_tokens, "stream": True}


async def endless_stream(sim: SimulatedEngine, channel: ChannelServer) -> tuple[ReplicaHandle, Any]:
    """A replica over `sim` and a stream that does not end by itself: its handle and its call after the first item."""
    handle = ReplicaHandle(Replica(sim, registry=None, stream_batch_s=0.05))
    client = ServeEngineClient(handle, channel)
    _first, call = await client.start("completions", stream_body(100_000), None, asyncio.Event())
    return handle, call


async def relay(client: ServeEngineClient, body: dict[str, Any]) -> list[ReplicaItem]:
    first, call = await client.start("completions", body, None, asyncio.Event())
    return [first, *[item async for item in call]]


def texts(items: list[ReplicaItem]) -> list[str]:
    events = "".join(item for item in items if isinstance(item, str)).split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    return [json.loads(event.removeprefix("data: "))["choices"][0]["text"] for event in events[:-2]]


async def test_streams_after_their_first_item_come_over_the_channel_whole_and_in_order(
    sim: SimulatedEngine, channel: ChannelServer
) -> None:
    handle = ReplicaHandle(Replica(sim, registry=None, stream_batch_s=0.05))
    client = ServeEngineClient(handle, channel)
    answers = await asyncio.gather(*(relay(client, stream_body(20 + i)) for i in range(16)))
    for i, items in enumerate(answers):
        assert len(texts(items)) == 20 + i
        assert items[-1] == Usage(prompt_tokens=3, completion_tokens=20 + i)
        assert not any(isinstance(item, Relayed) for item in items)
    # Over Ray: the first event and the closing count only; everything else took the channel.
    for call in handle.calls:
        assert len(call.over_ray) == 2 and isinstance(call.over_ray[1], Relayed)
        assert call.over_ray[1].count >= 20 and call.over_ray[1].failure is None
    assert client.stream_counts == {"channel": 16, "ray": 0}
    assert channel.streams == 0  # every inbox released


async def test_the_tokens_are_the_engines_own_in_order(sim: SimulatedEngine, channel: ChannelServer) -> None:
    direct = [item async for item in sim.generate("completions", stream_body(40), None)]
    client = ServeEngineClient(ReplicaHandle(Replica(sim, registry=None, stream_batch_s=0.05)), channel)
    assert texts(await relay(client, stream_body(40))) == texts(direct)


async def test_a_replica_that_cannot_reach_the_router_sends_the_stream_over_ray(sim: SimulatedEngine) -> None:
    class Unreachable(ChannelServer):
        def open(self) -> tuple[ReplyTo, Any]:
            to, inbox = super().open()
            return ReplyTo("127.0.0.1", 1, to.token, to.stream), inbox  # nothing listens on port 1

    server = Unreachable("127.0.0.1")
    handle = ReplicaHandle(Replica(sim, registry=None, stream_batch_s=0.01))
    client = ServeEngineClient(handle, server)
    items = await relay(client, stream_body(30))
    assert len(texts(items)) == 30 and items[-1] == Usage(prompt_tokens=3, completion_tokens=30)
    assert not any(isinstance(item, Relayed) for item in handle.calls[0].over_ray)
    assert len(handle.calls[0].over_ray) > 2
    assert client.stream_counts == {"channel": 0, "ray": 1}
    await server.close()


async def test_a_whole_answer_needs_no_channel(sim: SimulatedEngine, channel: ChannelServer) -> None:
    client = ServeEngineClient(ReplicaHandle(Replica(sim, registry=None, stream_batch_s=0.05)), channel)
    first, call = await client.start("completions", {**stream_body(5), "stream": False}, None, asyncio.Event())
    assert isinstance(first, dict) and first["usage"]["completion_tokens"] == 5
    assert [item async for item in call] == []
    assert channel.streams == 0


async def test_a_client_that_leaves_aborts_the_request_in_the_engine(
    sim: SimulatedEngine, channel: ChannelServer
) -> None:
    handle, call = await endless_stream(sim, channel)
    got = 0
    async for _ in call:
        got += 1
        if got == 3:
            break
    call.cancel()
    await asyncio.sleep(0.05)
    assert handle.calls[0].task.cancelled()
    assert not (sim.scheduler.running or sim.scheduler.paused or sim.scheduler.waiting)
    assert channel.streams == 0


class FailingEngine:
    """Streams `good` events, then fails as an engine can mid-stream."""

    errored = False

    def __init__(self, good: int) -> None:
        self.good = good

    async def generate(self, endpoint: Any, body: Any, adapter: Any) -> AsyncIterator[ReplicaItem]:
        for i in range(self.good):
            yield f'data: {{"choices": [{{"text": "t{i}"}}]}}\n\n'
            await asyncio.sleep(0.001)
        raise RuntimeError("the engine broke")

    def shutdown(self) -> None:
        pass


async def test_an_engine_failure_mid_stream_comes_after_the_items_before_it(channel: ChannelServer) -> None:
    client = ServeEngineClient(ReplicaHandle(Replica(FailingEngine(5), None, 0.05)), channel)  # type: ignore[arg-type]
    first, call = await client.start("completions", stream_body(5), None, asyncio.Event())
    got: list[ReplicaItem] = [first]
    with pytest.raises(ReplicaFailed) as failed:
        async for item in call:
            got.append(item)
    assert failed.value.name == "RuntimeError"
    assert "".join(got).count("data:") == 5  # type: ignore[arg-type]


async def test_a_replica_lost_mid_stream_fails_the_stream(sim: SimulatedEngine, channel: ChannelServer) -> None:
    class Died(Exception):
        pass

    handle, call = await endless_stream(sim, channel)
    await handle.calls[0].queue.put(Died())  # what Ray raises for a call whose replica died
    with pytest.raises(Died):
        async for _ in call:
            pass
    handle.calls[0].cancel()


async def test_the_router_closing_the_channel_ends_the_replicas_streams(
    sim: SimulatedEngine, channel: ChannelServer
) -> None:
    handle, call = await endless_stream(sim, channel)
    async for _ in call:  # the replica connected: items come over the channel
        break
    await channel.close()
    await asyncio.wait_for(handle.calls[0].task, 5)
    assert isinstance(handle.calls[0].error, ConnectionError)
    assert not (sim.scheduler.running or sim.scheduler.paused or sim.scheduler.waiting)  # the engine aborted it
    call.cancel()


async def test_items_promised_but_never_sent_fail_the_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(channel_module, "RELAYED_GRACE_S", 0.1)
    inbox = channel_module.Inbox()
    inbox.put("data: 1\n\n")
    inbox.relayed(Relayed(3))
    inbox.ray_ended()
    assert await inbox.take() == ["data: 1\n\n"]
    with pytest.raises(ConnectionError):
        await inbox.take()


async def test_a_connection_without_the_token_delivers_nothing(channel: ChannelServer) -> None:
    await channel.start()
    to, inbox = channel.open()
    reader, writer = await asyncio.open_connection(to.host, to.port)
    payload = channel_module._ENCODER.encode([(to.stream, 0, "data: forged\n\n")])
    writer.write(MAGIC + b"0" * len(to.token) + b"\n" + len(payload).to_bytes(4, "big") + payload)
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), 5) == b""  # the router hung up
    writer.close()
    inbox.ray_ended()
    assert await inbox.take() == []  # nothing was delivered


async def test_a_connection_with_the_token_delivers_only_to_open_streams(channel: ChannelServer) -> None:
    await channel.start()
    to, inbox = channel.open()
    _reader, writer = await asyncio.open_connection(to.host, to.port)
    payload = channel_module._ENCODER.encode(
        [
            (to.stream, 0, "data: x\n\n"),
            (to.stream + 99, 0, "data: stray\n\n"),
            (to.stream, 1, 3, 4),
            (to.stream, 2, 400, "bad", None, "invalid_request_error", None, None),
        ]
    )
    writer.write(MAGIC + to.token.encode() + b"\n" + len(payload).to_bytes(4, "big") + payload)
    await writer.drain()
    inbox.relayed(Relayed(3))
    inbox.ray_ended()
    assert await asyncio.wait_for(inbox.take(), 5) == [
        "data: x\n\n",
        Usage(3, 4),
        WireError(400, "bad"),
    ]
    writer.close()


async def test_an_oversized_frame_closes_the_connection(channel: ChannelServer) -> None:
    await channel.start()
    to, _ = channel.open()
    reader, writer = await asyncio.open_connection(to.host, to.port)
    writer.write(MAGIC + to.token.encode() + b"\n" + (channel_module.MAX_FRAME_BYTES + 1).to_bytes(4, "big"))
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
