"""The Ray Serve request router over fake replicas: the policy's ranking with Serve's inputs."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
from ray.serve._private.common import DeploymentID
from ray.serve.request_router import PendingRequest, ReplicaID

from routing import request_router
from routing.request_router import AdapterAffinityRouter, adapter_of, avoid_replica
from tests.unit.fake_engine import record


@dataclass(eq=False)
class FakeReplica:
    """What the router reads of a `RunningReplica`."""

    name: str
    routing_stats: dict[str, Any] = field(default_factory=dict)

    @property
    def replica_id(self) -> ReplicaID:
        return replica_id(self.name)


def replica_id(name: str) -> ReplicaID:
    return ReplicaID(unique_id=name, deployment_id=DeploymentID(name="LoraplexEngine", app_name="default"))


def make_router(queue_lens: dict[str, int]) -> AdapterAffinityRouter:
    router = object.__new__(AdapterAffinityRouter)  # Serve's constructor wants a live controller
    router.initialize_state(epsilon=0.25)
    cache = {replica_id(name): n for name, n in queue_lens.items()}
    router._replica_queue_len_cache = cache  # type: ignore[assignment]
    return router


def pending(adapter: str | None) -> PendingRequest:
    args = ["completions", {"model": "m"}]
    kwargs = {"adapter": record(adapter) if adapter else None}
    return PendingRequest(args=args, kwargs=kwargs, metadata=SimpleNamespace())  # type: ignore[arg-type]


async def ranked(router: AdapterAffinityRouter, replicas: list[FakeReplica], adapter: str | None) -> list[str]:
    ranks = await router.choose_replicas(replicas, pending(adapter))  # type: ignore[arg-type]
    assert all(len(rank) == 1 for rank in ranks)
    return [rank[0].name for rank in ranks]  # type: ignore[attr-defined]


async def test_adapter_of_reads_the_generate_arguments() -> None:
    assert adapter_of(pending("sql")) == "sql"
    assert adapter_of(pending(None)) is None
    assert adapter_of(None) is None


async def test_replica_holding_the_adapter_comes_first() -> None:
    replicas = [FakeReplica("r1"), FakeReplica("r2", {"adapters": ["sql"]}), FakeReplica("r3")]
    router = make_router({"r1": 2, "r2": 2, "r3": 2})  # 2 + 1 <= ceil(1.25 * 7 / 3) = 3: within the bound
    assert (await ranked(router, replicas, "sql"))[0] == "r2"


async def test_same_adapter_goes_home_without_reports() -> None:
    replicas = [FakeReplica(f"r{i}") for i in range(4)]
    router = make_router({f"r{i}": 0 for i in range(4)})
    for name in ("a0", "a1", "a2"):
        homes = {(await ranked(router, replicas, name))[0] for _ in range(5)}
        assert len(homes) == 1, (name, homes)


async def test_overloaded_holder_is_skipped_and_base_goes_to_least_loaded() -> None:
    replicas = [FakeReplica("r1", {"adapters": ["sql"]}), FakeReplica("r2"), FakeReplica("r3")]
    router = make_router({"r1": 9, "r2": 1, "r3": 0})
    assert (await ranked(router, replicas, "sql"))[-1] == "r1"  # 9 + 1 > ceil(1.25 * 11 / 3) = 5
    assert await ranked(router, replicas, None) == ["r3", "r2", "r1"]


async def test_routed_requests_count_as_held_until_reports_arrive() -> None:
    replicas = [FakeReplica("r1"), FakeReplica("r2")]
    router = make_router({"r1": 0, "r2": 0})
    home = (await ranked(router, replicas, "x"))[0]
    other = "r2" if home == "r1" else "r1"
    router.on_request_routed(pending("y"), replica_id(other), None)
    assert (await ranked(router, replicas, "y"))[0] == other


async def test_a_replica_that_did_not_start_a_request_is_passed_over_while_others_remain(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(request_router, "_avoided", {})
    replicas = [FakeReplica("r1"), FakeReplica("r2")]
    router = make_router({"r1": 0, "r2": 5})  # r1 looks least loaded: a dead engine's replica does
    assert (await ranked(router, replicas, None))[0] == "r1"
    avoid_replica("r1")
    assert await ranked(router, replicas, None) == ["r2"]
    assert await ranked(router, [FakeReplica("r1")], None) == ["r1"]  # the only one left is still tried
    avoid_replica("r1", seconds=0)
    assert (await ranked(router, replicas, None))[0] == "r1"


async def test_a_replica_with_a_free_slot_beats_a_holder_whose_slots_are_taken() -> None:
    """Replicas report the adapters running there and their slots (`Replica.record_routing_stats`)."""
    full = FakeReplica("full", {"adapters": ["sql"], "active": ["a", "b"], "lora_slots": 2})
    free = FakeReplica("free", {"adapters": [], "active": ["a"], "lora_slots": 2})
    router = make_router({"full": 2, "free": 2})
    assert await ranked(router, [full, free], "sql") == ["free", "full"]
    running = FakeReplica("running", {"adapters": ["sql"], "active": ["sql", "b"], "lora_slots": 2})
    assert (await ranked(router, [free, running], "sql"))[0] == "running"
