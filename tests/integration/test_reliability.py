"""A real two-replica server: first, placement (each adapter lives on one replica behind the affinity router, and
metrics show it); then what the server does when things go wrong: bad input, clients that leave, a burst past
capacity, an engine replica killed under load, an engine core that dies, SIGTERM.

The server here is its own (two engine replicas, so there is one to fail over to, and small limits,
so overload is quick to reach); tests/conftest.py runs this module before the shared stack starts.
Its tests run in file order and the last one stops the server. Processes are found through the server's session: Ray
names an engine replica's process `ray::ServeReplica:loraplex:LoraplexEngine`, and vLLM its engine
core, a child of the replica, `VLLM::EngineCore`.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import statistics
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import openai
import pytest

from serve.demo.assets import prepare
from tests.integration.conftest import (
    ASSETS,
    restart_the_registry_and_check_its_records,
    running_server,
    session_processes,
)

pytestmark = pytest.mark.own_server
T = TypeVar("T")

MAX_INFLIGHT, MAX_WAITING = 8, 24
CAPACITY = MAX_INFLIGHT + MAX_WAITING
"""Generation requests the (one) router replica holds at once; beyond them it answers 503."""
MAX_BODY_BYTES = 16 * 1024
GRACE_S = 120.0
"""graceful_shutdown_timeout_s of both deployments: how long SIGTERM lets requests in flight finish. The
drain test's 400-token stream alone takes 72 s with this module's two unbound engines on a 2-core AMD EPYC
(measured), more than the 60 s this used to be: the drain waits only as long as the stream needs."""
REQUEST_TIMEOUT_S = 180.0
"""A request still unanswered after this long counts as hung."""
REPLACED_WITHIN_S = 300.0
"""A lost replica's successor must be up and reporting within this (an engine loads in ~40-90 s here)."""
ABORTED_WITHIN_S = 6.5
"""A client that leaves: ~2 s for the engine to abort, plus the replicas' 2 s report period, plus slack."""
RUNNING = "loraplex_replica_running_requests"
ENGINE_REPLICA = "ServeReplica:loraplex:LoraplexEngine"
ENGINE_CORE = "EngineCore"
PLACED = [f"tenant{i}" for i in range(8)]
"""Adapters the placement test spreads over the two replicas (served by no other test)."""
ROUNDS = 4


@dataclass(frozen=True)
class Server:
    url: str
    pid: int
    """The `loraplex serve` process, which leads the session of every Ray and vLLM process it starts."""
    base: str
    log: Path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    model_dir, demo = prepare(ASSETS)
    work = tmp_path_factory.mktemp("reliability")
    config = work / "loraplex.yaml"
    config.write_text(
        json.dumps(
            {
                "engine": {"model": str(model_dir), "cpu_threads_bind": "nobind", "dtype": "checkpoint"},
                "engine_deployment": {
                    "num_replicas": 2,
                    # The router's gate (max_inflight) never sends more than one replica takes, so a lone
                    # survivor absorbs everything without backpressure; the excess waits in the router.
                    "max_ongoing_requests": MAX_INFLIGHT,
                    "max_queued_requests": MAX_INFLIGHT,
                    "health_check_period_s": 2,
                    "graceful_shutdown_timeout_s": GRACE_S,
                    # Placement by routing alone: a replica that comes up after the first requests would otherwise
                    # warm the hot adapters whose home it is (tests/integration/test_autoscaling.py), holding them
                    # twice; the tests here do not depend on warming.
                    "warm_adapters": 0,
                },
                "router": {
                    "max_inflight": MAX_INFLIGHT,
                    "max_waiting": MAX_WAITING,
                    "max_ongoing_requests": CAPACITY + 8,  # room for /metrics and /health under load
                    "max_body_bytes": MAX_BODY_BYTES,
                    "graceful_shutdown_timeout_s": GRACE_S,
                },
                "registry": {"state_file": str(work / "registry.json"), "cache_dir": str(work / "cache")},
            }
        )
    )
    adapters = {"alpha": demo["alpha"], "beta": demo["beta"]}
    adapters |= {name: demo["alpha" if i % 2 else "beta"] for i, name in enumerate(PLACED)}
    with running_server(config, adapters, work) as (url, log):
        yield Server(url=url, pid=serve_process(url), base=model_dir.name, log=log)


def serve_process(url: str) -> int:
    """The pid of our `loraplex serve ... --port PORT` child."""
    port = url.rsplit(":", 1)[1]
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
            parent = parent_pid(int(proc.name))
        except (OSError, ValueError):
            continue
        if parent == os.getpid() and "serve" in args and "--port" in args and args[args.index("--port") + 1] == port:
            return int(proc.name)
    raise AssertionError(f"no `loraplex serve --port {port}` process")


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    title: str


def _stat(pid: int) -> tuple[str, int]:
    """(state, parent pid) of `pid`, from /proc (the command name may hold spaces and parentheses)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return fields[0], int(fields[1])


def parent_pid(pid: int) -> int:
    return _stat(pid)[1]


def alive(pid: int) -> bool:
    try:
        return _stat(pid)[0] != "Z"
    except OSError:
        return False


def processes(server: Server) -> list[Proc]:
    """Live processes of the server's session, with their titles (Ray and vLLM set them)."""
    found = []
    for pid in session_processes(server.pid):
        try:
            state, ppid = _stat(pid)
            title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if state != "Z":
            found.append(Proc(pid, ppid, title))
    return found


def engine_replicas(server: Server) -> list[Proc]:
    return [p for p in processes(server) if ENGINE_REPLICA in p.title]


def engine_core_of(server: Server, replica: Proc) -> Proc:
    cores = [p for p in processes(server) if p.ppid == replica.pid and ENGINE_CORE in p.title]
    assert len(cores) == 1, f"engine replica {replica.pid} should have one engine core child: {processes(server)}"
    return cores[0]


def series(text: str, name: str) -> dict[str, float]:
    """Value per replica of a replica-labelled series in /metrics text."""
    values = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels, value = line.rsplit(" ", 1)
            values[labels.split('replica="', 1)[1].split('"', 1)[0]] = float(value)
    return values


async def running(server: Server) -> dict[str, float]:
    """Requests in each engine replica's vLLM engine, as last reported (reports of lost replicas linger 30 s)."""
    async with httpx.AsyncClient(timeout=30) as client:
        return series((await client.get(f"{server.url}/metrics")).text, RUNNING)


async def eventually(check: Callable[[], Awaitable[T | None]], within: float, what: str, every: float = 0.5) -> T:
    """The first truthy result of `check`, polled until `within` seconds have passed."""
    deadline = time.monotonic() + within
    while True:
        if result := await check():
            return result
        assert time.monotonic() < deadline, f"not within {within:.0f}s: {what}"
        await asyncio.sleep(every)


def openai_client(server: Server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=REQUEST_TIMEOUT_S)


async def answers_everything(server: Server) -> None:
    """The base model and each adapter answer."""
    client = openai_client(server)
    try:
        for model in (server.base, "alpha", "beta"):
            response = await client.completions.create(model=model, prompt="Hello", max_tokens=4, temperature=0)
            assert response.choices[0].finish_reason in {"stop", "length"}
    finally:
        await client.close()


async def stream_events(
    client: httpx.AsyncClient, server: Server, body: dict[str, Any], started: asyncio.Event | None = None
) -> list[str]:
    """The `data:` payloads of one streamed completion, in order; `started` is set at the first one."""
    async with client.stream("POST", f"{server.url}/v1/completions", json={**body, "stream": True}) as response:
        assert response.status_code == 200, (await response.aread()).decode(errors="replace")
        events = []
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                events.append(line.removeprefix("data: "))
                if started is not None:
                    started.set()
        return events


def stream_outcome(events: list[str]) -> str:
    """`finished` or `error`; fails unless the stream ended with `[DONE]`, after at most one error event."""
    assert events and events[-1] == "[DONE]", f"stream did not end with [DONE]: {events[-3:]}"
    payloads = [json.loads(event) for event in events[:-1]]
    errors = [i for i, payload in enumerate(payloads) if "error" in payload]
    if errors:
        assert errors == [len(payloads) - 1], f"an error event must be the last before [DONE]: {events[-3:]}"
        assert set(payloads[-1]["error"]) == {"message", "type", "param", "code"}
        return "error"
    assert payloads[-1]["choices"][0]["finish_reason"] == "length", events[-2]
    return "finished"


def assert_openai_error(response: httpx.Response, status: int | set[int]) -> dict[str, Any]:
    statuses = {status} if isinstance(status, int) else status
    assert response.status_code in statuses, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    return dict(error)


async def test_each_adapter_is_loaded_on_one_replica_and_metrics_show_it(server: Server) -> None:
    """First in the file: no adapter has been loaded yet, and no replica replaced."""
    client = openai_client(server)
    try:
        for _ in range(ROUNDS):  # 4 at a time: below affinity's min_load (8), so nothing spills
            for group in (PLACED[:4], PLACED[4:]):
                await asyncio.gather(*(client.completions.create(model=n, prompt="Hi", max_tokens=2) for n in group))
        await asyncio.gather(*(client.completions.create(model=server.base, prompt="Hi", max_tokens=2)
                               for _ in range(8)))  # fmt: skip
    finally:
        await client.close()

    deadline = time.monotonic() + 30
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        while True:  # replicas report every 2 s
            text = (await http.get("/metrics")).text
            misses = series(text, "loraplex_adapter_cache_misses_total")
            hits = series(text, "loraplex_adapter_cache_hits_total")
            if len(misses) == 2 and sum(misses.values()) + sum(hits.values()) >= len(PLACED) * ROUNDS:
                break
            assert time.monotonic() < deadline, text
            await asyncio.sleep(1)
        placements = {name: (await http.get(f"/v1/adapters/{name}")).json()["replicas"] for name in PLACED}
    assert all(len(where) == 1 for where in placements.values()), placements
    assert sum(misses.values()) == len(PLACED)  # one load per adapter, on its home replica only
    assert sum(hits.values()) == len(PLACED) * (ROUNDS - 1)
    loaded = series(text, "loraplex_replica_adapters_loaded")
    assert sorted(loaded) == sorted(misses) and sum(loaded.values()) == len(PLACED)


BAD_BODIES = [
    pytest.param(json.dumps({"model": "alpha", "prompt": "x" * 2 * MAX_BODY_BYTES}).encode(), 413, id="too-large"),
    pytest.param(b'{"model": "alpha", "prompt": "caf\xe9"}', 400, id="not-utf8"),
    pytest.param(b'{"model": "alpha", "prompt": "x", "max_tokens": 2', 400, id="truncated"),
    pytest.param(b'{"model": "alpha", "prompt": "x", "stop": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400, id="nested"),
]


@pytest.mark.parametrize(("raw", "status"), BAD_BODIES)
async def test_bad_input_is_refused_in_openai_shape_and_the_server_keeps_serving(
    server: Server, raw: bytes, status: int
) -> None:
    async with httpx.AsyncClient(timeout=60) as client:
        response = await client.post(
            f"{server.url}/v1/completions", content=raw, headers={"content-type": "application/json"}
        )
    assert_openai_error(response, status)
    await answers_everything(server)


async def test_a_client_that_leaves_mid_stream_stops_the_engine_work(server: Server) -> None:
    async def idle() -> bool:
        values = await running(server)
        return len(values) == 2 and sum(values.values()) == 0

    await eventually(idle, 60, "both engine replicas reporting no requests")
    body = {"model": server.base, "prompt": "Tell me a story.", "max_tokens": 1500, "ignore_eos": True, "stream": True}

    async def busy() -> bool:
        return sum((await running(server)).values()) > 0

    async with (
        httpx.AsyncClient(timeout=60) as client,
        client.stream("POST", f"{server.url}/v1/completions", json=body) as response,
    ):
        assert response.status_code == 200
        # Keep reading while waiting for the engine's report: leaving the iterator closes the connection.
        seen_busy, deadline = False, time.monotonic() + 10
        async for line in response.aiter_lines():
            if line.startswith("data: ") and await busy():
                seen_busy = True
                break
            assert time.monotonic() < deadline, "the engine never reported the stream while it ran"
        assert seen_busy
    # Leaving the iterator closed the connection: hundreds of tokens were still to come.
    await eventually(idle, ABORTED_WITHIN_S, "the engines dropping the abandoned request", every=0.25)


async def test_a_burst_past_capacity_is_shed_with_retry_after_and_nothing_hangs(server: Server) -> None:
    burst = 4 * CAPACITY
    body = {"model": server.base, "prompt": "Say hello.", "max_tokens": 16, "temperature": 0}
    limits = httpx.Limits(max_connections=burst, max_keepalive_connections=burst)
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S, limits=limits) as client:

        async def timed() -> tuple[httpx.Response, float]:
            started = time.monotonic()
            response = await asyncio.wait_for(client.post(f"{server.url}/v1/completions", json=body), REQUEST_TIMEOUT_S)
            return response, time.monotonic() - started

        results = await asyncio.gather(*(timed() for _ in range(burst)))  # a TimeoutError here is a hung request

    served = [response for response, _ in results if response.status_code == 200]
    shed = [response for response, _ in results if response.status_code != 200]
    assert len(served) >= CAPACITY, [r.status_code for r in shed]
    assert shed, "4x capacity at once should overflow the router's queue"
    for response in shed:
        error = assert_openai_error(response, {429, 503})
        assert error["type"] in {"overloaded_error", "rate_limit_error"}
        assert int(response.headers["retry-after"]) >= 1
    latencies = sorted(seconds for _, seconds in results)
    assert statistics.quantiles(latencies, n=100)[98] < 60, latencies[-5:]
    assert max(seconds for response, seconds in results if response.status_code != 200) < 30  # shed fast
    await answers_everything(server)


async def test_losing_an_engine_replica_under_load_loses_no_request_that_had_not_started(server: Server) -> None:
    before = await running(server)
    replicas = engine_replicas(server)
    assert len(before) == 2 and len(replicas) == 2, (before, replicas)
    client = openai_client(server)
    streams = httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S)
    try:
        # Streams first: one tenant's requests pass the router's gate in arrival order.
        started = [asyncio.Event() for _ in range(4)]
        body = {"model": server.base, "prompt": "Write a long poem.", "max_tokens": 128, "ignore_eos": True}
        streamed = [
            asyncio.create_task(asyncio.wait_for(stream_events(streams, server, body, event), REQUEST_TIMEOUT_S))
            for event in started
        ]
        plain = [
            asyncio.create_task(
                asyncio.wait_for(
                    client.completions.create(model=server.base, prompt=f"Count to {20 + i}.", max_tokens=32,
                                              temperature=0, extra_body={"ignore_eos": True}),
                    REQUEST_TIMEOUT_S,
                )
            )
            for i in range(24)
        ]  # fmt: skip

        seen: list[tuple[int, dict[str, float]]] = []

        async def both_busy() -> bool:
            values = await running(server)
            seen.append((sum(event.is_set() for event in started), values))
            return all(event.is_set() for event in started) and all(values.get(r, 0) > 0 for r in before)

        try:
            await eventually(both_busy, 60, "every stream started and both replicas busy")
        except AssertionError as exc:  # failed once in a full run, never alone: say what was seen
            raise AssertionError(f"{exc}; replicas {sorted(before)}; (streams started, reports): {seen[-4:]}") from None
        victim = replicas[0]
        core = engine_core_of(server, victim)
        os.kill(victim.pid, signal.SIGKILL)

        outcomes = await asyncio.gather(*streamed, *plain, return_exceptions=True)
    finally:
        await client.close()
        await streams.aclose()

    hung = [o for o in outcomes if isinstance(o, TimeoutError)]
    assert not hung, f"{len(hung)} requests hung"
    stream_results, plain_results = outcomes[: len(streamed)], outcomes[len(streamed) :]
    failed = [o for o in plain_results if isinstance(o, BaseException)]
    # Only what the lost replica was running fails, and says it was not replayed (it may be what killed the
    # replica); every request still waiting in the router (at most MAX_INFLIGHT run at once) is served.
    assert all(isinstance(o, openai.InternalServerError) and "not sent again" in str(o) for o in failed), failed
    assert len(failed) <= MAX_INFLIGHT, failed
    print(f"plain requests after losing a replica: {len(plain) - len(failed)} served, {len(failed)} not replayed")
    kinds = []
    for events in stream_results:
        assert isinstance(events, list), repr(events)  # a stream answers 200, then ends with [DONE]
        kinds.append(stream_outcome(events))
    print("streams after losing a replica:", kinds)

    async def core_gone() -> bool:
        return not alive(core.pid)

    try:
        await eventually(core_gone, 30, "the killed replica's engine core exiting with it")
    finally:
        if alive(core.pid):  # leaked: do not let it outlive the module
            os.kill(core.pid, signal.SIGKILL)
    await replaced(server, before, victim)
    await answers_everything(server)


async def test_an_engine_core_that_dies_ends_its_replica_which_serve_replaces(server: Server) -> None:
    before = await running(server)  # may still list the replica the previous test killed
    replicas = engine_replicas(server)
    assert len(replicas) == 2, replicas
    victim = replicas[0]
    os.kill(engine_core_of(server, victim).pid, signal.SIGKILL)
    # vLLM's engine client notices its engine core's exit at once (a process sentinel); a request the replica
    # took in that instant ran on the dead engine and, like any request a lost replica ran, is not replayed.
    await asyncio.sleep(0.5)

    # Meanwhile the service answers: requests that met the dead engine (not started) go to the other replica.
    client = openai_client(server)
    try:
        for _ in range(3):
            answers = await asyncio.gather(
                *(client.completions.create(model=model, prompt="Hi", max_tokens=4, temperature=0)
                  for model in (server.base, server.base, "alpha", "beta"))
            )  # fmt: skip
            assert all(answer.choices for answer in answers)
    finally:
        await client.close()

    async def victim_gone() -> bool:
        return not alive(victim.pid)

    await eventually(victim_gone, 30, "the replica whose engine died ending itself")
    await replaced(server, before, victim)
    await answers_everything(server)


async def replaced(server: Server, before: dict[str, float], victim: Proc) -> None:
    """Waits until a new engine replica reports, two replica processes run, each with its engine core."""

    async def new_replica_reports() -> bool:
        return bool(set(await running(server)) - set(before))

    await eventually(new_replica_reports, REPLACED_WITHIN_S, "a new engine replica reporting", every=2)
    replicas = engine_replicas(server)
    assert len(replicas) == 2 and victim.pid not in {r.pid for r in replicas}, replicas
    for replica in replicas:
        engine_core_of(server, replica)


def test_a_registry_replica_that_dies_comes_back_with_every_adapter_from_sqlite(server: Server) -> None:
    """The default store (SQLite beside the state file): Serve's replacement registry reads the same records."""
    _, demo = prepare(ASSETS)
    restart_the_registry_and_check_its_records(server.url, str(demo["beta"]))


async def test_sigterm_lets_the_stream_in_flight_finish_refuses_new_requests_and_exits(server: Server) -> None:
    body = {"model": server.base, "prompt": "Write a long poem.", "max_tokens": 400, "ignore_eos": True}
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S) as client:
        started = asyncio.Event()
        stream = asyncio.create_task(stream_events(client, server, body, started))
        await asyncio.wait_for(started.wait(), 60)
        os.kill(server.pid, signal.SIGTERM)
        signalled = time.monotonic()
        refused_status = await asyncio.wait_for(refused(server), 20)
        refused_at = time.monotonic()
        assert not stream.done(), "the stream should still be running when new requests are refused"
        events = await asyncio.wait_for(stream, GRACE_S)
    assert stream_outcome(events) == "finished"  # every token (finish_reason `length`), no error event
    print(f"new requests refused ({refused_status}) {refused_at - signalled:.1f}s after SIGTERM")

    async def exited() -> bool:
        return not alive(server.pid)

    await eventually(exited, GRACE_S + 60, "loraplex serve exiting after the drain")
    assert "draining" in server.log.read_text(errors="replace")


async def refused(server: Server) -> str:
    """Sends new requests until one is refused: no connection, Serve's 404 once the app's route is
    withdrawn, or a 503; returns how. A request admitted before the drain began may still be served."""
    body = {"model": server.base, "prompt": "Hi", "max_tokens": 1}
    async with httpx.AsyncClient(timeout=30) as client:
        while True:
            try:
                response = await client.post(f"{server.url}/v1/completions", json=body)
            except httpx.TransportError as exc:
                return type(exc).__name__
            if response.status_code in {404, 503}:
                assert "model_not_found" not in response.text, response.text  # 404 is Serve's, not the router's
                return str(response.status_code)
            assert response.status_code == 200, response.text
            await asyncio.sleep(0.2)
