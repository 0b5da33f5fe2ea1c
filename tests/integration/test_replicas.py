"""Two engine replicas behind the affinity router: each adapter lives on one replica, and metrics show it.

The server here is its own (two engines, one CPU thread each); tests/conftest.py runs this module
before the shared single-replica stack starts, so the machine never holds both.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from serve.demo.assets import prepare
from tests.integration.conftest import ASSETS, running_server

pytestmark = pytest.mark.own_server
ADAPTERS = [f"tenant{i}" for i in range(8)]
ROUNDS = 4


@pytest.fixture(scope="module")
def two_replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    model_dir, demo = prepare(ASSETS)
    work = tmp_path_factory.mktemp("replicas")
    config = work / "loraplex.yaml"
    config.write_text(
        json.dumps(
            {
                "engine": {"model": str(model_dir), "cpu_threads_bind": "nobind", "dtype": "checkpoint"},
                # Placement by routing alone: a replica that comes up after the first requests would otherwise warm
                # the hot adapters whose home it is (tests/integration/test_autoscaling.py), holding them twice.
                "engine_deployment": {"num_replicas": 2, "warm_adapters": 0},
                "registry": {"state_file": str(work / "registry.json"), "cache_dir": str(work / "cache")},
            }
        )
    )
    adapters = {name: demo["alpha" if i % 2 else "beta"] for i, name in enumerate(ADAPTERS)}
    with running_server(config, adapters, work) as (base_url, _):
        yield base_url


def series(text: str, name: str) -> dict[str, float]:
    """Value per replica of a replica-labelled series in /metrics text."""
    values = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels, value = line.rsplit(" ", 1)
            values[labels.split('replica="', 1)[1].split('"', 1)[0]] = float(value)
    return values


async def test_each_adapter_is_loaded_on_one_replica_and_metrics_show_it(two_replicas: str) -> None:
    client = openai.AsyncOpenAI(base_url=f"{two_replicas}/v1", api_key="unused", max_retries=0, timeout=300)
    try:
        for _ in range(ROUNDS):  # 4 at a time: below affinity's min_load (8), so nothing spills
            for group in (ADAPTERS[:4], ADAPTERS[4:]):
                await asyncio.gather(*(client.completions.create(model=n, prompt="Hi", max_tokens=2) for n in group))
        await asyncio.gather(*(client.completions.create(model="SmolLM2-135M-Instruct", prompt="Hi", max_tokens=2)
                               for _ in range(8)))  # fmt: skip
    finally:
        await client.close()

    deadline = time.monotonic() + 30
    while True:  # replicas report every 2 s
        text = httpx.get(f"{two_replicas}/metrics").text
        misses = series(text, "loraplex_adapter_cache_misses_total")
        hits = series(text, "loraplex_adapter_cache_hits_total")
        if len(misses) == 2 and sum(misses.values()) + sum(hits.values()) >= len(ADAPTERS) * ROUNDS:
            break
        assert time.monotonic() < deadline, text
        time.sleep(1)

    placements = {name: httpx.get(f"{two_replicas}/v1/adapters/{name}").json()["replicas"] for name in ADAPTERS}
    assert all(len(where) == 1 for where in placements.values()), placements
    assert sum(misses.values()) == len(ADAPTERS)  # one load per adapter, on its home replica only
    assert sum(hits.values()) == len(ADAPTERS) * (ROUNDS - 1)
    loaded = series(text, "loraplex_replica_adapters_loaded")
    assert sorted(loaded) == sorted(misses) and sum(loaded.values()) == len(ADAPTERS)
