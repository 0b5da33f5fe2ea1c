"""Where an adapter lives among replicas: its rendezvous order, one stable ranking of the replicas per adapter name.

Routers rank replicas by it (`routing.policy`) and the registry plans what a joining replica warms by it
(`serve.adapters.registry.warm_plan`): both sides of the contract must compute the same order.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache


@lru_cache(maxsize=65536)
def rendezvous_order(key: str, replica_ids: tuple[str, ...]) -> tuple[str, ...]:
    """Replica ids by decreasing hash of (key, id): stable, and only 1/N keys move when a replica comes or goes."""

    def weight(replica_id: str) -> bytes:
        return hashlib.blake2b(f"{key}\0{replica_id}".encode(), digest_size=8).digest()

    return tuple(sorted(replica_ids, key=weight, reverse=True))
