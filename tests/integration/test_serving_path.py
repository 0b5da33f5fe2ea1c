"""The serving path on the real stack with the simulated engine: Ray Serve, the router listening itself
(no Serve HTTP proxy), streams over the direct stream channel (and, with `stream_channel: false`, as batched
Ray items), official SDK clients. No model is loaded, so the server starts in seconds and runs streams at a
rate the CPU engine cannot.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from serve.engines.simulated import WORDS
from tests.integration.conftest import SESSIONS, running_server, session_processes

pytestmark = pytest.mark.own_server
STEP_MS = 10
BATCH_MS = 50


ROUTER_MODES = {
    "channel+grpc": {"stream_channel": True, "engine_transport": "grpc"},  # the default
    "ray": {"stream_channel": False, "engine_transport": "ray"},  # every item a Ray call's
}


@pytest.fixture(scope="module", params=list(ROUTER_MODES))
def sim_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    work = tmp_path_factory.mktemp("sim")
    config = work / "loraplex.yaml"
    config.write_text(
        json.dumps(
            {
                "engine": {
                    "kind": "simulated",
                    "model": "sim-base",
                    "max_num_seqs": 256,
                    "simulated": {"step_ms": STEP_MS},
                },
                "engine_deployment": {"stream_batch_ms": BATCH_MS},
                "router": ROUTER_MODES[request.param],
                "registry": {"state_file": str(work / "registry.json"), "cache_dir": str(work / "cache")},
            }
        )
    )
    with running_server(config, {}, work) as (base_url, log):
        yield base_url, log


def expected_text(tokens: int) -> str:
    return "".join(" " + WORDS[i % len(WORDS)] for i in range(tokens))


async def test_every_streamed_token_arrives_in_order_in_fewer_chunks(sim_server: tuple[str, Path]) -> None:
    base_url, _ = sim_server
    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=60)
    texts, usages = [], []

    async def one() -> None:
        stream = await client.completions.create(
            model="sim-base", prompt="a b c", max_tokens=40, stream=True, stream_options={"include_usage": True}
        )
        parts = []
        async for chunk in stream:
            if chunk.choices:
                parts.append(chunk.choices[0].text)
            if chunk.usage is not None:
                usages.append(chunk.usage)
        texts.append("".join(parts))

    await asyncio.gather(*(one() for _ in range(32)))
    await client.close()
    assert texts == [expected_text(40)] * 32
    assert [(u.prompt_tokens, u.completion_tokens) for u in usages] == [(3, 40)] * 32


def channelled(base_url: str) -> bool:
    """Whether this server's router has the stream channel (its config), from its streams metric."""
    streams = _streams_by_transport(base_url)
    assert sum(streams.values()) > 0, "no stream was relayed yet"
    return streams["channel"] > 0


def _streams_by_transport(base_url: str) -> dict[str, float]:
    metrics = httpx.get(f"{base_url}/metrics", timeout=10).text
    found = {"channel": 0.0, "ray": 0.0}
    for line in metrics.splitlines():
        if line.startswith("loraplex_router_streams_total{"):
            found[line.split('transport="')[1].split('"')[0]] = float(line.rsplit(" ", 1)[1])
    return found


async def test_streams_take_the_transport_the_config_asks(
    sim_server: tuple[str, Path], request: pytest.FixtureRequest
) -> None:
    base_url, _ = sim_server
    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=60)
    before = _streams_by_transport(base_url)
    for _ in range(3):
        stream = await client.completions.create(model="sim-base", prompt="x", max_tokens=5, stream=True)
        assert len([chunk async for chunk in stream]) == 5
    await client.close()
    after = _streams_by_transport(base_url)
    channel = ROUTER_MODES[request.node.callspec.params["sim_server"]]["stream_channel"]
    wanted, other = ("channel", "ray") if channel else ("ray", "channel")
    assert after[wanted] - before[wanted] == 3 and after[other] == before[other]


async def test_a_streams_first_token_comes_at_once(sim_server: tuple[str, Path]) -> None:
    base_url, _ = sim_server
    body = {"model": "sim-base", "prompt": "x", "max_tokens": 60, "stream": True}
    reads = []
    async with (
        httpx.AsyncClient(timeout=60) as http,
        http.stream("POST", f"{base_url}/v1/completions", json=body) as response,
    ):
        assert response.status_code == 200
        async for part in response.aiter_raw():
            reads.append(part.count(b'"index":'))
    assert sum(reads) == 60
    assert reads[0] == 1  # the first token is not held back for the batching interval
    if not channelled(base_url):
        # 60 steps of 10 ms batched every 50 ms: about 12 items, not 60 (a slow machine makes fewer, larger ones).
        assert len([r for r in reads if r]) <= 30


async def test_chat_streams_through_the_official_client(sim_server: tuple[str, Path]) -> None:
    base_url, _ = sim_server
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=60)
    stream = client.chat.completions.create(
        model="sim-base", messages=[{"role": "user", "content": "hi"}], max_tokens=7, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected_text(7)
    assert chunks[-1].choices[0].finish_reason == "length"


def test_the_router_listens_itself_and_no_serve_proxy_runs(sim_server: tuple[str, Path]) -> None:
    base_url, _ = sim_server
    assert httpx.get(f"{base_url}/health", timeout=10).status_code == 200
    proxies = [p for p in Path("/proc").iterdir() if p.name.isdigit() and b"ProxyActor" in _cmdline(p)]
    assert proxies == []


def _cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:
        return b""


def test_health_is_readiness_an_engine_replica_lost_is_503_until_serve_replaces_it(
    sim_server: tuple[str, Path],
) -> None:
    base_url, _ = sim_server
    assert httpx.get(f"{base_url}/health", timeout=10).status_code == 200
    session = SESSIONS[base_url]  # this server's engine replica, not another server's on the machine
    (engine,) = [pid for pid in session_processes(session) if b"LoraplexEngine" in _cmdline(Path(f"/proc/{pid}"))]
    os.kill(engine, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while (health := httpx.get(f"{base_url}/health", timeout=10)).status_code == 200:
        assert time.monotonic() < deadline, "/health stayed 200 without an engine replica"
        time.sleep(0.2)
    assert health.status_code == 503 and health.json()["error"]["code"] == "not_ready"
    assert "engine" in health.json()["error"]["message"]
    assert httpx.get(f"{base_url}/livez", timeout=10).status_code == 200
    deadline = time.monotonic() + 120
    while httpx.get(f"{base_url}/health", timeout=10).status_code != 200:
        assert time.monotonic() < deadline, "/health not ready again after Serve replaced the replica"
        time.sleep(1)
