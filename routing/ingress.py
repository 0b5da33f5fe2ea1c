"""The router as a Ray Serve deployment: the application's ingress and only public surface."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from ray import serve

from routing.app import create_app
from routing.catalog import ModelCatalog
from routing.engine_client import ServeEngineClient
from routing.ratelimit import ServeRateLimiter
from routing.registry_client import ServeRegistryClient
from serve.config import RouterConfig


@serve.ingress()
class RouterIngress:
    """Builds the FastAPI router in the replica, wired to the engine, registry and rate-limiter deployments."""

    def __init__(self, engine: Any, registry: Any, limiter: Any, base_id: str, config: RouterConfig) -> None:
        registry_client = ServeRegistryClient(registry)
        catalog = ModelCatalog(base_id, registry_client)
        self._app = create_app(ServeEngineClient(engine), catalog, config, limiter=ServeRateLimiter(limiter))

    def __serve_build_asgi_app__(self) -> FastAPI:
        return self._app
