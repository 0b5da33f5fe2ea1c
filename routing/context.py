"""Everything a route needs, built once per router replica and handed to routes as a typed dependency."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request
from opentelemetry.trace import Tracer

from routing.admission import Admitter
from routing.audit import AuditLog
from routing.catalog import ModelCatalog
from routing.console.summary import ServerFacts
from routing.engine_client import EngineClient
from routing.metrics import RouterMetrics
from routing.principals import KeyRing
from serve.config import RouterConfig


@dataclass
class RouterContext:
    """The router replica's collaborators."""

    engine: EngineClient
    catalog: ModelCatalog
    metrics: RouterMetrics
    config: RouterConfig
    keys: KeyRing
    admitter: Admitter
    audit: AuditLog
    tracer: Tracer | None = None
    """Spans for generation requests (`routing.tracing`); None when tracing is off."""
    facts: ServerFacts = field(default_factory=ServerFacts)
    """The engines' settings and deployment, for the console's Server view."""
    draining: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when this router replica stops: new and waiting generation requests get 503, streams finish."""


async def get_context(request: Request) -> RouterContext:
    context: RouterContext = request.app.state.context
    return context


ContextDep = Annotated[RouterContext, Depends(get_context)]
