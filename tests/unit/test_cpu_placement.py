"""Where `loraplex serve` puts Ray's processes and the engine's on a local machine."""

from __future__ import annotations

import multiprocessing
import os

import pytest

from serve.cli.main import infrastructure_cpus
from serve.config import AppConfig
from serve.engines.vllm_engine import engine_cpus

CPUS = sorted(os.sched_getaffinity(0))
needs_two = pytest.mark.skipif(len(CPUS) < 2, reason="needs at least 2 CPUs")


def config(**engine_deployment: object) -> AppConfig:
    return AppConfig.model_validate({"engine": {"model": "/m"}, "engine_deployment": engine_deployment})


@needs_two
def test_auto_keeps_infrastructure_on_the_core_vllm_reserves() -> None:
    assert infrastructure_cpus("auto", config()) == {CPUS[-1]}
    assert infrastructure_cpus("all", config()) is None
    assert infrastructure_cpus("auto", config(num_replicas=2)) is None  # replicas' workers would overlap anyway
    assert infrastructure_cpus("0,1", config()) == {0, 1}


def child_affinity(queue: multiprocessing.Queue[set[int]]) -> None:
    queue.put(os.sched_getaffinity(0))


@needs_two
def test_engine_processes_are_spawned_with_the_engine_cpus_not_the_replica_s() -> None:
    """The regression: vLLM's worker inherited the replica's one core and left the others idle."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {CPUS[-1]})  # as `loraplex serve` confines Ray's processes
    try:
        context = multiprocessing.get_context("spawn")  # as vLLM starts its engine core
        queue: multiprocessing.Queue[set[int]] = context.Queue()
        with engine_cpus(list(CPUS)):
            child = context.Process(target=child_affinity, args=(queue,))
            child.start()
        assert os.sched_getaffinity(0) == {CPUS[-1]}, "the replica's own thread goes back to its core"
        assert queue.get(timeout=60) == set(CPUS)
        child.join(timeout=60)
    finally:
        os.sched_setaffinity(0, before)


def test_without_the_setting_nothing_changes() -> None:
    before = os.sched_getaffinity(0)
    with engine_cpus(None):
        assert os.sched_getaffinity(0) == before
    assert os.sched_getaffinity(0) == before
