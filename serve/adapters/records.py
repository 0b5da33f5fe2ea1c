"""The plain data that crosses between the registry, routers and engine replicas."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class AdapterRecord:
    """One registered adapter at its current version."""

    name: str
    source: str
    version: int
    content_hash: str
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    size_bytes: int
    pinned: bool
    created: int
    unusable: str | None = None
    """Why the adapter cannot be served on this base model (it no longer fits it), or None: such a record is
    listed with the reason and never handed to an engine."""


@dataclass(frozen=True)
class Snapshot:
    """All records at one generation; the generation grows with every change."""

    generation: int
    records: dict[str, AdapterRecord]


LOAD_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass
class LoaderStats:
    """Cumulative counters a replica reports: cache hits and misses, loads (a latency histogram), unloads,
    and evictions (adapters the engine's LRU dropped from memory while still installed)."""

    hits: int = 0
    misses: int = 0
    loads: int = 0
    load_seconds: float = 0.0
    load_buckets: list[int] = field(default_factory=lambda: [0] * len(LOAD_BUCKETS))
    unloads: int = 0
    evictions: int = 0
    cache_bytes: int = 0
    """Bytes in the node's adapter cache, as this replica last measured it."""
    cache_errors: int = 0
    """Adapters this replica could not store in the node's cache (disk full, read-only, ...)."""
    cache_error: str | None = None
    cache_error_at: float | None = None
    """Wall-clock time of `cache_error`, the latest."""

    def observe_load(self, seconds: float) -> None:
        self.loads += 1
        self.load_seconds += seconds
        for i, bound in enumerate(LOAD_BUCKETS):
            if seconds <= bound:
                self.load_buckets[i] += 1


@dataclass(frozen=True)
class ReplicaReport:
    """What one engine replica tells the registry about itself."""

    replica: str
    adapters: tuple[str, ...]
    """Adapters installed in this replica's engine."""
    engine_loras: int
    """Adapters whose weights the engine currently holds in memory (its LRU caches)."""
    stats: LoaderStats
    resident: tuple[str, ...] = ()
    """Names of the installed adapters among those `engine_loras`."""
    running: int = 0
    """Sequences in the replica's vLLM engine, running or waiting (one per prompt and choice); aborts free them."""
