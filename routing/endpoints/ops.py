"""Operational endpoints: `GET /health` and `GET /metrics` (Prometheus text format).

`/metrics` names adapters and their traffic, so a server with keys answers it only to a key with the `metrics`
(or `admin`) scope, as a bearer token (Prometheus: `authorization.credentials_file`), unless
`router.public_metrics` is set; errors are OpenAI-shaped like every route's."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from routing.context import ContextDep

router = APIRouter()


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/metrics")
async def metrics(request: Request, context: ContextDep) -> Response:
    if not context.config.public_metrics:
        context.keys.authenticate(request.headers.get("authorization")).require_metrics()
    reports = await context.catalog.registry.replica_reports()
    context.metrics.replicas.update(reports, registry_size=len(await context.catalog.records()))
    return Response(context.metrics.render(), media_type=CONTENT_TYPE_LATEST)
