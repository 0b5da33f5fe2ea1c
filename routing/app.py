"""The router's FastAPI application, built by a factory so tests and replicas construct their own."""

from __future__ import annotations

from fastapi import FastAPI
from opentelemetry.trace import Tracer
from prometheus_client import CollectorRegistry

from routing.admission import Admitter
from routing.audit import AuditLog
from routing.body_limit import BodyLimit
from routing.catalog import ModelCatalog
from routing.console.page import page_router
from routing.console.summary import ServerFacts
from routing.context import RouterContext
from routing.endpoints import adapters, console, generate, models, ops
from routing.engine_client import EngineClient
from routing.errors import install_error_handlers
from routing.fairness import FairGate
from routing.hosts import HostCheck
from routing.metrics import RouterMetrics
from routing.openapi import ERROR_RESPONSES
from routing.principals import KeyRing
from routing.ratelimit import LocalRateLimiter, RateLimiter
from routing.request_window import RequestWindow
from routing.tracing import TraceRequests, traced_authentication
from serve.config import RouterConfig


def create_app(
    engine: EngineClient,
    catalog: ModelCatalog,
    config: RouterConfig,
    *,
    limiter: RateLimiter | None = None,
    max_model_len: int | None = None,
    tracer: Tracer | None = None,
    facts: ServerFacts | None = None,
) -> FastAPI:
    """An OpenAI-compatible app that sends generation requests to `engine`.

    `limiter` holds the per-key rate limits; it must be shared by every router replica (the
    `SharedRateLimiter` deployment in an application); by default they are kept in this process.
    `max_model_len` is the engine's: a chat request without `max_tokens` is estimated at the rest of it.
    `tracer` (`serve.wire.tracing`): spans for generation requests (`routing.tracing`); None, the default: none.
    `facts`: the engines' settings and deployment, which the console's Server view shows (None: unknown).
    """
    app = FastAPI(
        title="loraplex",
        description="OpenAI-compatible multi-LoRA inference router.",
        responses=ERROR_RESPONSES,
        # No Swagger UI or ReDoc: they load scripts from a CDN into the console's origin, where its key is kept.
        docs_url=None,
        redoc_url=None,
    )
    gate = FairGate(config.max_inflight, config.max_waiting, config.fair_share_reserve)
    window = RequestWindow(config.console_window_s)
    metrics = RouterMetrics(CollectorRegistry(), max_adapters=config.max_adapter_labels, window=window)
    metrics.watch_admission(inflight=lambda: gate.inflight, waiting=lambda: gate.waiting)
    metrics.watch_streams(engine.stream_counts)
    limiter = limiter or LocalRateLimiter()
    metrics.watch_limiter(lambda: limiter.unreachable)
    app.state.context = RouterContext(
        engine=engine,
        catalog=catalog,
        metrics=metrics,
        config=config,
        keys=KeyRing(config.auth),
        admitter=Admitter(limiter, gate, max_model_len),
        audit=AuditLog(config.auth.audit_file),
        tracer=tracer,
        facts=facts or ServerFacts(),
    )
    install_error_handlers(app)
    context = app.state.context
    authenticate = None if config.auth.is_open else context.keys.authenticate
    app.add_middleware(
        BodyLimit,
        max_bytes=config.max_body_bytes,
        authenticate=traced_authentication(tracer, authenticate) if authenticate and tracer else authenticate,
        read_timeout_s=config.body_read_timeout_s,
    )
    if tracer is not None:  # outside the body limit: its span holds the others
        app.add_middleware(TraceRequests, tracer=tracer, authenticate=authenticate)
    if config.auth.is_open:
        app.add_middleware(HostCheck, allowed=config.allowed_hosts)  # added last: outermost
    for endpoints in (generate, models, adapters, console, ops):
        app.include_router(endpoints.router)
    if config.console:
        app.include_router(page_router(config.auth.is_open))
    return app
