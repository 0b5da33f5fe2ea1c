"""Autoscaling on the real stack: load scales the engine deployment from 1 to 2 replicas and back, with no failed
request, and the replica that joins warms the hot adapters whose home it becomes (issue 16, items 3 and 4).

The cycle is loadtests/autoscaling.py's (`make bench-autoscaling` plots it); this server is its own, started
before the shared stack (tests/conftest.py), so the machine holds at most two engines.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import pytest

from loadtests.autoscaling import ENGINE_SETTINGS, SERVER_SETTINGS, Sample, engine_processes, scale_cycle
from routing.policy import rendezvous_order
from serve.demo.assets import prepare
from tests.integration.conftest import ASSETS, running_server, session_of

pytestmark = pytest.mark.own_server
ADAPTERS = [f"hot{i}" for i in range(12)]
WARM_ADAPTERS = 8


@pytest.fixture(scope="module")
def autoscaled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int, str]]:
    """(url, pid, base model id) of a server whose engine deployment autoscales between 1 and 2 replicas."""
    model_dir, demo = prepare(ASSETS)
    work = tmp_path_factory.mktemp("autoscaling")
    config = work / "loraplex.yaml"
    config.write_text(
        json.dumps(
            {
                "engine": {"model": str(model_dir), "dtype": "checkpoint", **ENGINE_SETTINGS},
                "engine_deployment": {**SERVER_SETTINGS, "warm_adapters": WARM_ADAPTERS},
                "registry": {"state_file": str(work / "registry.json"), "cache_dir": str(work / "cache")},
            }
        )
    )
    adapters = {name: demo["alpha" if i % 2 else "beta"] for i, name in enumerate(ADAPTERS)}
    with running_server(config, adapters, work) as (base_url, _):
        yield base_url, session_of(base_url), model_dir.name


def test_load_scales_the_engines_out_and_back_in_without_a_failed_request(autoscaled: tuple[str, int, str]) -> None:
    url, server_pid, base = autoscaled
    timeline = asyncio.run(scale_cycle(url, server_pid, [base, *ADAPTERS], settle_s=10))

    assert timeline.failed == [], timeline.failed[:3]
    assert timeline.most_processes() == 2 and engine_processes(server_pid) == 1
    light = [r for r in timeline.requests if r.phase == "light"]
    assert light and all(r.tokens == 96 for r in light)  # every stream finished, across the scale-in too

    # The replica that joined warmed what it became home to; the first had nothing to learn from.
    first, joined = first_and_joined(timeline.samples)
    warmed = timeline.warmed()
    homed = [name for name in ADAPTERS if rendezvous_order(name, tuple(sorted((first, joined))))[0] == joined]
    assert warmed.get(first, 0) == 0
    if homed:
        assert 1 <= warmed[joined] <= min(len(homed), WARM_ADAPTERS), (homed, warmed)


def first_and_joined(samples: list[Sample]) -> tuple[str, str]:
    """The replica that served from the start, and the one that joined."""
    first = next(s.reporting for s in samples if s.reporting)
    assert len(first) == 1
    both = next(s.reporting for s in samples if len(s.reporting) == 2)
    return first[0], next(r for r in both if r != first[0])
