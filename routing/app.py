"""The router's FastAPI application, built by a factory so tests and replicas construct their own."""

from __future__ import annotations

from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from routing.body_limit import BodyLimit
from routing.catalog import ModelCatalog
from routing.context import RouterContext
from routing.endpoints import adapters, generate, models, ops
from routing.engine_client import EngineClient
from routing.errors import install_error_handlers
from routing.metrics import RouterMetrics
from routing.openapi import ERROR_RESPONSES
from serve.config import RouterConfig


def create_app(engine: EngineClient, catalog: ModelCatalog, config: RouterConfig) -> FastAPI:
    """An OpenAI-compatible app that sends generation requests to `engine`."""
    app = FastAPI(
        title="loraplex", description="OpenAI-compatible multi-LoRA inference router.", responses=ERROR_RESPONSES
    )
    app.state.context = RouterContext(
        engine=engine,
        catalog=catalog,
        metrics=RouterMetrics(CollectorRegistry(), max_adapters=config.max_adapter_labels),
        config=config,
    )
    install_error_handlers(app)
    app.add_middleware(BodyLimit)
    for endpoints in (generate, models, adapters, ops):
        app.include_router(endpoints.router)
    return app
