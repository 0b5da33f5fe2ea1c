"""Assembles a loraplex application: the engine deployment behind the router ingress.

`build_app` is also the Ray Serve import path (`import_path: serve.app:build_app`), taking the
`AppConfig` fields as its `args`.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application

from routing.ingress import RouterIngress
from serve.config import AppConfig
from serve.engine import EngineReplica, engine_env

ENGINE_DEPLOYMENT = "LoraplexEngine"
ROUTER_DEPLOYMENT = "LoraplexRouter"


def build_app(args: AppConfig | dict[str, Any]) -> Application:
    """The Serve application for `args` (an `AppConfig` or its dict form)."""
    config = args if isinstance(args, AppConfig) else AppConfig.model_validate(args)
    scaling = config.engine_deployment
    engine = serve.deployment(
        name=ENGINE_DEPLOYMENT,
        num_replicas=scaling.num_replicas,
        max_ongoing_requests=scaling.max_ongoing_requests,
        max_queued_requests=scaling.max_queued_requests,
        health_check_period_s=scaling.health_check_period_s,
        ray_actor_options={
            "num_cpus": scaling.num_cpus,
            "runtime_env": {"env_vars": engine_env(config.engine)},
        },
    )(EngineReplica)
    router = serve.deployment(
        name=ROUTER_DEPLOYMENT,
        num_replicas=config.router.num_replicas,
        max_ongoing_requests=config.router.max_ongoing_requests,
        ray_actor_options={"num_cpus": 0.5},
    )(RouterIngress)
    return router.bind(
        engine.bind(config.engine, config.adapters),
        config.engine.model_id,
        [adapter.name for adapter in config.adapters],
        config.router,
    )
