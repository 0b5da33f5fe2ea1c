"""Which engine replica gets a request: adapter affinity with bounded load.

The same code decides in the Ray Serve request router and in the routing simulator
(`loadtests/simulate.py`). For an adapter, replicas are ranked by rendezvous hashing on the adapter's
name, so each adapter has a stable home; a replica already holding the adapter is preferred; and
no replica is given more than (1 + epsilon) times the mean load, so a hot adapter spills to its next
replicas in hash order and spreads as its traffic grows. Base-model requests go to the least loaded.
Within the bound, a replica where the adapter already has one of the engine's LoRA slots (a request of it
runs there) comes first, then one with a free slot, and a replica whose slots are all taken by other
adapters last: there the request would wait for a slot (serve/slots.py), where elsewhere it runs at once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from serve.wire.placement import rendezvous_order

__all__ = ["AffinityPolicy", "ReplicaState", "rendezvous_order"]


@dataclass(frozen=True)
class ReplicaState:
    """What the policy knows of a replica: its requests in flight, the adapters it holds, the adapters holding
    its engine's LoRA slots (`active`) and how many slots are free (None: not known, or no limit)."""

    replica_id: str
    ongoing: int
    adapters: frozenset[str] = frozenset()
    active: frozenset[str] = frozenset()
    free_slots: int | None = None

    def slot_rank(self, adapter: str) -> int:
        """0: `adapter` has a slot here; 1: a slot is free (or the replica does not say); 2: it would wait."""
        if adapter in self.active:
            return 0
        return 1 if self.free_slots is None or self.free_slots > 0 else 2


@dataclass(frozen=True)
class AffinityPolicy:
    """Adapter affinity under a load bound of (1 + epsilon) times the mean, but never below `min_load`.

    `min_load` is what batching makes free: an engine runs that many requests in one step for about
    the price of one, while loading an adapter elsewhere costs a load and an eviction, so below it
    a replica is never treated as overloaded.
    """

    epsilon: float = 0.25
    min_load: int = 0
    slot_aware: bool = True
    """Rank replicas within the bound by `ReplicaState.slot_rank` (False: affinity alone)."""

    def bound(self, replicas: Sequence[ReplicaState]) -> float:
        """The most requests any replica may hold once this one is placed."""
        total = sum(r.ongoing for r in replicas) + 1
        return float(max(self.min_load, math.ceil((1 + self.epsilon) * total / len(replicas))))

    def rank(self, adapter: str | None, replicas: Sequence[ReplicaState]) -> list[ReplicaState]:
        """Replicas best first; the router tries them in this order."""
        if not replicas:
            return []
        if adapter is None:
            return sorted(replicas, key=lambda r: r.ongoing)
        cap = self.bound(replicas)
        by_id = {r.replica_id: r for r in replicas}
        order = [by_id[i] for i in rendezvous_order(adapter, tuple(sorted(by_id)))]
        under = [r for r in order if r.ongoing + 1 <= cap]
        holders = sorted((r for r in under if adapter in r.adapters), key=lambda r: r.ongoing)
        others = [r for r in under if adapter not in r.adapters]
        over = sorted((r for r in order if r.ongoing + 1 > cap), key=lambda r: r.ongoing)
        within = holders + others
        if self.slot_aware:
            within.sort(key=lambda r: r.slot_rank(adapter))  # stable: affinity within each rank
        return within + over
