"""The engine deployment's Ray Serve request router: `routing.policy.AffinityPolicy` over live replicas.

Ray Serve instantiates this class inside every caller of the engine deployment (the router ingress
replicas), calls `choose_replicas` for each request and tries the returned ranks in order, skipping a
replica whose queue is full. What the policy needs it gets from Serve: each replica's requests in
flight from Serve's queue-length cache, and the adapters it holds from the replica's
`record_routing_stats` (every `routing_stats_period_s`), completed by the requests this router sent
since, so affinity does not wait for the next report. With tracing on, each choice of a traced request is a
`router.replica_choice` span in the request's trace (its `traceparent` travels in the call's arguments).
"""

from __future__ import annotations

import time
from typing import Any

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

from routing.policy import AffinityPolicy, ReplicaState
from routing.tracing import replica_choice_span
from serve.config import TracingConfig
from serve.wire import ROUTING_STATS_ACTIVE, ROUTING_STATS_ADAPTERS, ROUTING_STATS_SLOTS, AdapterRecord
from serve.wire.tracing import process_tracer

ROUTER_CLASS_PATH = "routing.request_router:AdapterAffinityRouter"
RECENT_TTL_S = 30.0
"""How long this router assumes a replica keeps an adapter it sent there, absent a report."""
AVOID_S = 10.0
"""How long a replica that did not start a request (its engine died) is passed over; it ends meanwhile."""
_avoided: dict[str, float] = {}
"""Replica id -> until when (monotonic): shared by the request routers of this process (the router replica)."""


def avoid_replica(replica_id: str, seconds: float = AVOID_S) -> None:
    """Passes `replica_id` over while others remain: it took a request and could not start it."""
    now = time.monotonic()
    for stale in [key for key, until in _avoided.items() if until <= now]:
        del _avoided[stale]
    _avoided[replica_id] = now + seconds


def _usable(candidates: list[RunningReplica]) -> list[RunningReplica]:
    if not _avoided:
        return candidates
    now = time.monotonic()
    usable = [r for r in candidates if _avoided.get(r.replica_id.unique_id, 0) <= now]
    return usable or candidates


def adapter_of(request: PendingRequest | None) -> str | None:
    """The adapter a `generate(endpoint, body, adapter)` call asks for; None for the base model."""
    if request is None:
        return None
    adapter = request.kwargs.get("adapter")
    return adapter.name if isinstance(adapter, AdapterRecord) else None


class AdapterAffinityRouter(FIFOMixin, RequestRouter):
    """Adapter affinity under a (1 + epsilon) x mean load bound; base requests to the least loaded."""

    def initialize_state(
        self,
        epsilon: float = 0.25,
        min_load: int = 0,
        slot_aware: bool = True,
        tracing: dict[str, Any] | None = None,
        **_: Any,
    ) -> None:
        """`tracing`: the app's `TracingConfig` as a dict, given only when tracing is on."""
        self._policy = AffinityPolicy(epsilon=epsilon, min_load=min_load, slot_aware=slot_aware)
        self._recent: dict[tuple[str, str], float] = {}
        self._tracer = process_tracer(TracingConfig.model_validate(tracing), "router") if tracing else None

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        candidate_replicas = _usable(candidate_replicas)
        if not candidate_replicas:
            return []
        adapter = adapter_of(pending_request)
        if self._tracer is None:
            return self._rank(candidate_replicas, adapter)
        with replica_choice_span(self._tracer, pending_request, adapter, len(candidate_replicas)) as span:
            ranks = self._rank(candidate_replicas, adapter)
            chosen = ranks[0][0]
            span.set_attributes({
                "loraplex.replica": chosen.replica_id.unique_id,
                "loraplex.replica.holds_adapter": adapter is not None and adapter in self._held(chosen, adapter),
            })  # fmt: skip
            return ranks

    def _rank(self, candidate_replicas: list[RunningReplica], adapter: str | None) -> list[list[RunningReplica]]:
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        states = [self._state(r, adapter) for r in candidate_replicas]
        return [[by_id[state.replica_id]] for state in self._policy.rank(adapter, states)]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: Any, result: Any) -> None:
        adapter = adapter_of(pending_request)
        if adapter is not None:
            self._recent[(replica_id.unique_id, adapter)] = time.monotonic() + RECENT_TTL_S
            if len(self._recent) > 100_000:
                now = time.monotonic()
                self._recent = {key: until for key, until in self._recent.items() if until > now}

    def _state(self, replica: RunningReplica, adapter: str | None) -> ReplicaState:
        replica_id = replica.replica_id.unique_id
        ongoing = self.replica_queue_len_cache.get(replica.replica_id) or 0
        stats = replica.routing_stats or {}
        active = frozenset(stats.get(ROUTING_STATS_ACTIVE, ()))
        slots = stats.get(ROUTING_STATS_SLOTS)
        free = max(0, int(slots) - len(active)) if slots is not None else None
        held = self._held(replica, adapter)
        return ReplicaState(replica_id=replica_id, ongoing=ongoing, adapters=held, active=active, free_slots=free)

    def _held(self, replica: RunningReplica, adapter: str | None) -> frozenset[str]:
        """The adapters `replica` reported, and `adapter` if this router sent it there lately."""
        held: frozenset[str] = frozenset((replica.routing_stats or {}).get(ROUTING_STATS_ADAPTERS, ()))
        if (
            adapter is not None
            and adapter not in held
            and self._recent.get((replica.replica_id.unique_id, adapter), 0) > time.monotonic()
        ):
            held = held | {adapter}
        return held
