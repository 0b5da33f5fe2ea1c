"""The router's Prometheus metrics, per model (base or adapter) with a bounded number of label values."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from routing.replica_metrics import ReplicaCollector
from routing.request_window import RequestWindow

OTHER = "other"
UNKNOWN = "unknown"
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class RouterMetrics:
    """Request, token and latency series labelled by model id; at most `max_adapters` adapter labels.

    `window` keeps the last minutes of every model's traffic for the web console (by model id, not label).
    """

    def __init__(self, registry: CollectorRegistry, max_adapters: int, window: RequestWindow | None = None) -> None:
        self.registry = registry
        self.window = window if window is not None else RequestWindow()
        self._max_adapters = max_adapters
        self._adapter_labels: set[str] = set()
        self.requests = Counter(
            "loraplex_requests", "Requests answered, by model, endpoint and HTTP status.",
            ["model", "endpoint", "status"], registry=registry,
        )  # fmt: skip
        self.prompt_tokens = Counter(
            "loraplex_prompt_tokens", "Prompt tokens processed, by model.", ["model"], registry=registry
        )
        self.completion_tokens = Counter(
            "loraplex_completion_tokens", "Completion tokens generated, by model.", ["model"], registry=registry
        )
        self.ttft = Histogram(
            "loraplex_time_to_first_token_seconds", "Time to the first streamed token, by model.",
            ["model"], buckets=_LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        self.composite_builds = Counter(
            "loraplex_composite_builds", "Inline composite adapters built with PEFT for requests through this router "
            "(one per distinct composite, however many requests asked at once).", registry=registry,
        )  # fmt: skip
        self.rollout_requests = Counter(
            "loraplex_rollout_requests", "Requests to adapters while a new version is rolled out, by model, the "
            "version that served them and HTTP status: the two versions side by side.",
            ["model", "version", "status"], registry=registry,
        )  # fmt: skip
        self.rollout_latency = Histogram(
            "loraplex_rollout_request_latency_seconds", "End-to-end latency of requests to adapters while a new "
            "version is rolled out, by model and version.", ["model", "version"], buckets=_LATENCY_BUCKETS,
            registry=registry,
        )  # fmt: skip
        self.rollout_completion_tokens = Counter(
            "loraplex_rollout_completion_tokens", "Completion tokens of adapters while a new version is rolled out, "
            "by model and version.", ["model", "version"], registry=registry,
        )  # fmt: skip
        self.replicas = ReplicaCollector()
        registry.register(self.replicas)
        self.latency = Histogram(
            "loraplex_request_latency_seconds", "End-to-end request latency, by model and endpoint.",
            ["model", "endpoint"], buckets=_LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip

    def watch_admission(self, inflight: Callable[[], float], waiting: Callable[[], float]) -> None:
        """Exports the fair-share gate's occupancy, read at each scrape."""
        Gauge(
            "loraplex_router_inflight", "Generation requests this router replica has at the engines.",
            registry=self.registry,
        ).set_function(inflight)  # fmt: skip
        Gauge(
            "loraplex_router_waiting", "Generation requests waiting in this router replica's fair-share queues.",
            registry=self.registry,
        ).set_function(waiting)  # fmt: skip

    def watch_limiter(self, unreachable: Callable[[], int]) -> None:
        """Exports the rate-limiter calls that failed or timed out (their requests were let through)."""
        self.registry.register(
            _Counted("loraplex_rate_limiter_unreachable", "Rate-limiter calls that failed or timed out; the request "
                     "was admitted unchecked.", [], lambda: {(): unreachable()})
        )  # fmt: skip

    def watch_streams(self, counts: dict[str, int]) -> None:
        """Exports how streams reached this router (`counts` is read at each scrape)."""
        self.registry.register(
            _Counted("loraplex_router_streams", "Streams relayed by this router replica, by how their items after the "
                     "first came from the engine replica: `channel` (the direct stream channel) or `ray` (Ray Serve "
                     "items).", ["transport"], lambda: {(transport,): count for transport, count in counts.items()})
        )  # fmt: skip

    def label(self, model_id: str | None, is_adapter: bool) -> str:
        """The label value for a model: adapters beyond the cap share `other`."""
        if model_id is None:
            return UNKNOWN
        if not is_adapter or model_id in self._adapter_labels:
            return model_id
        if len(self._adapter_labels) < self._max_adapters:
            self._adapter_labels.add(model_id)
            return model_id
        return OTHER

    def track(self, label: str, endpoint: str) -> RequestTimer:
        return RequestTimer(self, label, endpoint)

    def render(self) -> bytes:
        return generate_latest(self.registry)


@dataclass
class RequestTimer:
    """Measures one request from arrival to its last byte and records it once."""

    metrics: RouterMetrics
    label: str
    endpoint: str
    started: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    done: bool = False
    version: str | None = None
    """The adapter version that served the request, set while a new version of it is rolled out."""
    model: str | None = None
    """The model id the console's `RequestWindow` counts the request under (None: `label`); unlike `label`, not
    folded into `other` beyond the label cap, as the window bounds its own size."""
    prompt: int = 0
    completion: int = 0

    def first_token_seen(self) -> None:
        if self.first_token is None:
            self.first_token = time.perf_counter()
            self.metrics.ttft.labels(self.label).observe(self.first_token - self.started)

    def tokens(self, prompt: int, completion: int) -> None:
        self.prompt += prompt
        self.completion += completion
        self.metrics.prompt_tokens.labels(self.label).inc(prompt)
        self.metrics.completion_tokens.labels(self.label).inc(completion)
        if self.version is not None:
            self.metrics.rollout_completion_tokens.labels(self.label, self.version).inc(completion)

    def finish(self, status: int) -> None:
        if self.done:
            return
        self.done = True
        elapsed = time.perf_counter() - self.started
        self.metrics.requests.labels(self.label, self.endpoint, str(status)).inc()
        self.metrics.latency.labels(self.label, self.endpoint).observe(elapsed)
        self.metrics.window.record(self.model or self.label, status, elapsed, self.prompt, self.completion)
        if self.version is not None:
            self.metrics.rollout_requests.labels(self.label, self.version, str(status)).inc()
            self.metrics.rollout_latency.labels(self.label, self.version).observe(elapsed)


class _Counted(Collector):
    """A counter family read from the code that counts, at each scrape."""

    def __init__(
        self, name: str, documentation: str, labels: list[str], read: Callable[[], dict[tuple[str, ...], int]]
    ) -> None:
        self._name, self._documentation, self._labels, self._read = name, documentation, labels, read

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self._name, self._documentation, labels=self._labels)
        for labels, value in sorted(self._read().items()):
            family.add_metric(list(labels), value)
        yield family
