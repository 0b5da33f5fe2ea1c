"""Operational endpoints: `GET /health` (readiness), `GET /livez` (liveness), `GET /metrics` (Prometheus).

`/health` answers 200 only while this router reaches the registry and at least one engine replica (each
within `READY_TIMEOUT_S`), else 503 in OpenAI's shape naming what is unreachable: load balancers and
Kubernetes readiness probes then send traffic elsewhere. `/livez` answers 200 while the process serves HTTP.

`/metrics` names adapters and their traffic, so a server with keys answers it only to a key with the `metrics`
(or `admin`) scope, as a bearer token (Prometheus: `authorization.credentials_file`), unless
`router.public_metrics` is set; errors are OpenAI-shaped like every route's."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from routing.context import ContextDep
from routing.errors import NotReady

router = APIRouter()


READY_TIMEOUT_S = 2.0


@router.get("/health")
async def health(context: ContextDep) -> dict[str, str]:
    checks = {"registry": context.catalog.registry.generation(), "engine": context.engine.ready()}
    results = await asyncio.gather(
        *(asyncio.wait_for(check, READY_TIMEOUT_S) for check in checks.values()), return_exceptions=True
    )
    down = [name for name, result in zip(checks, results, strict=True) if isinstance(result, BaseException)]
    if context.draining.is_set():
        down.append("router (shutting down)")
    if down:
        raise NotReady(f"not ready: cannot reach {', '.join(down)}")
    return {"status": "ok"}


@router.get("/livez")
async def livez() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/metrics")
async def metrics(request: Request, context: ContextDep) -> Response:
    if not context.config.public_metrics:
        context.keys.authenticate(request.headers.get("authorization")).require_metrics()
    reports = await context.catalog.registry.replica_reports()
    context.metrics.replicas.update(reports, registry_size=len(await context.catalog.records()))
    return Response(context.metrics.render(), media_type=CONTENT_TYPE_LATEST)
