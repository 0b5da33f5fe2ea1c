"""Assembles a loraplex application: the adapter registry, the rate limiter, the engines, the router ingress.

`build_app` is also the Ray Serve import path (`import_path: serve.app:build_app`), taking the
`AppConfig` fields as its `args`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray import serve
from ray.serve import Application

from routing.ingress import RouterIngress
from routing.ratelimit import SharedRateLimiter
from routing.request_router import ROUTER_CLASS_PATH
from serve.adapters.registry import RegistryDeployment
from serve.adapters.store import sqlite_path
from serve.config import AppConfig, EngineDeploymentConfig, TracingConfig
from serve.engines.vllm_engine import engine_env
from serve.processes import DIE_WITH_PARENT_ENV, die_with_parent_if_asked
from serve.replica import EngineReplica

ENGINE_DEPLOYMENT = "LoraplexEngine"
ROUTER_DEPLOYMENT = "LoraplexRouter"
REGISTRY_DEPLOYMENT = "LoraplexRegistry"
LIMITER_DEPLOYMENT = "LoraplexLimiter"
REGISTRY_MAX_ONGOING = 256
# Every router replica asks the limiter about every limited request; its calls never block.
LIMITER_MAX_ONGOING = 1024
SERVING_PATH_ENV = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "1000",
    DIE_WITH_PARENT_ENV: "1",
}
"""Ray Serve settings of the router and engine replicas (Ray's "throughput-optimized" choices): our code, the
handle's router and Ray's own replica code share one event loop. Ray's defaults put each on a loop of its own,
so every streamed item crossed threads twice in each replica (docs/benchmarks/serving-path.md). Serve's own
metrics are handed to Ray's exporter every second instead of every 100 ms (Prometheus scrapes far less often):
an idle replica's event loop woke ten times a second for it. Every replica, and the vLLM processes an engine
replica starts, dies with its parent (`serve.processes`): nothing outlives a raylet or a replica that was
killed outright."""
QUIET = {"enable_access_log": False}
"""Registry and limiter calls are bookkeeping (a report every 2 s per engine replica, a check per limited
request): a Serve access-log line for each cost CPU in the replica and in Ray's log monitor."""


class LimiterDeployment(SharedRateLimiter):
    """The shared rate limiter as deployed: its process dies with its raylet."""

    def __init__(self) -> None:
        die_with_parent_if_asked()
        super().__init__()


class RouterDeployment(RouterIngress):
    """The router as deployed: its process dies with its raylet."""

    async def __init__(self, *args: Any) -> None:  # type: ignore[misc]
        die_with_parent_if_asked()
        await super().__init__(*args)


def absolute_store(url: str) -> str:
    """A `sqlite:///relative` store made absolute (`sqlite:////abs`); other stores as they are."""
    if url.startswith("sqlite:///"):
        return f"sqlite:///{Path(sqlite_path(url)).resolve()}"
    return url


def absolute_paths(config: AppConfig) -> AppConfig:
    """Resolves relative paths against the caller's folder: replicas run in folders of Ray's choosing."""
    registry = config.registry.model_copy(
        update={
            "state_file": str(Path(config.registry.state_file).resolve()),
            "store": absolute_store(store) if (store := config.registry.store) else None,
            "cache_dir": str(Path(config.registry.cache_dir).resolve()),
            "local_roots": [str(Path(root).resolve()) for root in config.registry.local_roots],
        }
    )
    adapters = [a.model_copy(update={"path": str(Path(a.path).resolve())}) for a in config.adapters]
    engine = config.engine.model_copy(update={"model": str(Path(config.engine.model).resolve())})
    auth = config.router.auth
    auth = auth.model_copy(
        update={
            "keys_file": str(Path(auth.keys_file).resolve()) if auth.keys_file else None,
            "audit_file": str(Path(auth.audit_file).resolve()) if auth.audit_file else None,
        }
    )
    router = config.router.model_copy(update={"auth": auth})
    return config.model_copy(update={"registry": registry, "adapters": adapters, "engine": engine, "router": router})


def request_router_config(scaling: EngineDeploymentConfig, tracing: TracingConfig | None = None) -> dict[str, Any]:
    """The engine deployment's `request_router_config`: our affinity router (tracing its choices when `tracing` is
    on), or Serve's default."""
    config: dict[str, Any] = {"request_routing_stats_period_s": scaling.routing_stats_period_s}
    if scaling.request_router == "affinity":
        config["request_router_class"] = ROUTER_CLASS_PATH
        config["request_router_kwargs"] = {
            "epsilon": scaling.affinity_epsilon,
            "min_load": scaling.affinity_min_load,
            "slot_aware": scaling.affinity_slot_aware,
        }
        if tracing is not None and tracing.enabled:
            config["request_router_kwargs"]["tracing"] = tracing.model_dump()
    return config


def build_app(args: AppConfig | dict[str, Any]) -> Application:
    """The Serve application for `args` (an `AppConfig` or its dict form): Ray Serve's import path.

    Serve calls an application builder with exactly one argument (it refuses a builder with more), so what
    only `loraplex serve` knows goes through `build_application`.
    """
    return build_application(args)


def build_application(args: AppConfig | dict[str, Any], proxy_host: str | None = None) -> Application:
    """`build_app`, given `proxy_host`: the address Serve's HTTP proxy listens on, when the caller knows it
    (`loraplex serve` started the proxy). A Serve config's app cannot see its `http_options`, so without keys
    it is refused behind the proxy unless it opts out (`router.auth.allow_open`).
    """
    config = absolute_paths(args if isinstance(args, AppConfig) else AppConfig.model_validate(args))
    listens_on = config.router.host if config.router.ingress == "direct" else proxy_host
    if (refusal := config.router.open_refusal(listens_on)) is not None:
        raise ValueError(refusal)
    scaling = config.engine_deployment
    registry = serve.deployment(
        name=REGISTRY_DEPLOYMENT,
        num_replicas=1,
        # Reads and reports never wait on a write's download (serve.adapters.registry), so take many at once.
        max_ongoing_requests=REGISTRY_MAX_ONGOING,
        logging_config=QUIET,
        ray_actor_options={"num_cpus": 0.1, "runtime_env": {"env_vars": SERVING_PATH_ENV}},
    )(RegistryDeployment).bind(config)
    replicas: dict[str, Any] = (
        {"num_replicas": scaling.num_replicas}
        if scaling.autoscaling is None
        else {"autoscaling_config": scaling.autoscaling.model_dump()}
    )
    engine = serve.deployment(
        name=ENGINE_DEPLOYMENT,
        **replicas,
        request_router_config=request_router_config(scaling, config.tracing),
        max_ongoing_requests=scaling.max_ongoing_requests,
        max_queued_requests=scaling.max_queued_requests,
        health_check_period_s=scaling.health_check_period_s,
        graceful_shutdown_timeout_s=scaling.graceful_shutdown_timeout_s,
        ray_actor_options={
            "num_cpus": scaling.num_cpus,
            "runtime_env": {"env_vars": {**engine_env(config.engine), **SERVING_PATH_ENV}},
        },
    )(EngineReplica).bind(config, registry)
    # An open server has no keys, so no limits to share: no limiter process (each Ray process idles at ~1 % of a
    # core). With keys, one, even if no key has limits yet: the keys file can gain them while serving.
    limiter = (
        None
        if config.router.auth.is_open
        else serve.deployment(
            name=LIMITER_DEPLOYMENT,
            num_replicas=1,  # one set of buckets for every router replica: limits hold across them
            max_ongoing_requests=LIMITER_MAX_ONGOING,
            logging_config=QUIET,
            ray_actor_options={"num_cpus": 0.1, "runtime_env": {"env_vars": SERVING_PATH_ENV}},
        )(LimiterDeployment).bind()
    )
    router = serve.deployment(
        name=ROUTER_DEPLOYMENT,
        num_replicas=config.router.num_replicas,
        max_ongoing_requests=config.router.max_ongoing_requests,
        graceful_shutdown_timeout_s=config.router.graceful_shutdown_timeout_s,
        ray_actor_options={"num_cpus": 0.5, "runtime_env": {"env_vars": SERVING_PATH_ENV}},
    )(RouterDeployment)
    return router.bind(
        engine, registry, limiter, config.engine.model_id, config.router, config.engine.max_model_len, config.tracing,
        config.engine, config.engine_deployment,
    )  # fmt: skip
