"""Adapter-cache and registry series, rebuilt at each scrape from what engine replicas report."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from serve.wire import LOAD_BUCKETS, ReplicaReport

REPLICA = ["replica"]


class ReplicaCollector(Collector):
    """Exposes the latest replica reports and registry size; `update` before each scrape."""

    def __init__(self) -> None:
        self.reports: list[ReplicaReport] = []
        self.registry_size = 0

    def update(self, reports: list[ReplicaReport], registry_size: int) -> None:
        self.reports = reports
        self.registry_size = registry_size

    def collect(self) -> Iterator[Metric]:
        size = GaugeMetricFamily("loraplex_registry_adapters", "Adapters in the registry.")
        size.add_metric([], self.registry_size)
        yield size
        installed = GaugeMetricFamily(
            "loraplex_replica_adapters_loaded", "Adapters installed in an engine replica.", labels=REPLICA
        )
        resident = GaugeMetricFamily(
            "loraplex_replica_engine_loras", "Adapters whose weights the engine holds in memory.", labels=REPLICA
        )
        running = GaugeMetricFamily(
            "loraplex_replica_running_requests",
            "Sequences in an engine replica's vLLM engine, running or waiting (one per prompt and choice).",
            labels=REPLICA,
        )
        hits = CounterMetricFamily("loraplex_adapter_cache_hits", "Requests whose adapter was ready.", labels=REPLICA)
        misses = CounterMetricFamily(
            "loraplex_adapter_cache_misses", "Requests that had to load their adapter.", labels=REPLICA
        )
        unloads = CounterMetricFamily(
            "loraplex_adapter_unloads",
            "Adapters removed from an engine (unregistered or replaced).",
            labels=REPLICA,
        )
        evictions = CounterMetricFamily(
            "loraplex_adapter_evictions",
            "Installed adapters the engine's LRU dropped from memory (reloaded on their next request).",
            labels=REPLICA,
        )
        warmed = CounterMetricFamily(
            "loraplex_adapter_warmed",
            "Adapters a replica loaded ahead of any request for them when it joined (hot ones whose home it became).",
            labels=REPLICA,
        )
        staged = CounterMetricFamily(
            "loraplex_adapter_staged",
            "Adapters a replica fetched into its node's cache ahead of any request for them (newest registered first).",
            labels=REPLICA,
        )
        cache_bytes = GaugeMetricFamily(
            "loraplex_adapter_cache_bytes", "Bytes in the node's adapter cache, as a replica last measured it.",
            labels=REPLICA,
        )  # fmt: skip
        cache_errors = CounterMetricFamily(
            "loraplex_adapter_cache_errors",
            "Adapters a replica could not store in its node's cache (disk full, read-only, ...): answered 503.",
            labels=REPLICA,
        )
        loads = HistogramMetricFamily(
            "loraplex_adapter_load_seconds",
            "Time to make an adapter version usable on a replica: fetch and verify its files (pinned: and load them).",
            labels=REPLICA,
        )
        for report in self.reports:
            labels = [report.replica]
            installed.add_metric(labels, len(report.adapters))
            resident.add_metric(labels, report.engine_loras)
            running.add_metric(labels, report.running)
            hits.add_metric(labels, report.stats.hits)
            misses.add_metric(labels, report.stats.misses)
            unloads.add_metric(labels, report.stats.unloads)
            evictions.add_metric(labels, report.stats.evictions)
            warmed.add_metric(labels, report.stats.warmed)
            staged.add_metric(labels, report.stats.staged)
            cache_bytes.add_metric(labels, report.stats.cache_bytes)
            cache_errors.add_metric(labels, report.stats.cache_errors)
            buckets = [
                (str(bound), count) for bound, count in zip(LOAD_BUCKETS, report.stats.load_buckets, strict=True)
            ]
            buckets.append(("+Inf", report.stats.loads))
            loads.add_metric(labels, buckets, report.stats.load_seconds)
        yield from (
            installed,
            resident,
            running,
            hits,
            misses,
            unloads,
            evictions,
            warmed,
            staged,
            cache_bytes,
            cache_errors,
            loads,
        )
