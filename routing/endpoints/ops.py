"""Operational endpoints: `GET /health` and `GET /metrics` (Prometheus text format)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from routing.context import ContextDep

router = APIRouter()


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/metrics")
async def metrics(context: ContextDep) -> Response:
    reports = await context.catalog.registry.replica_reports()
    context.metrics.replicas.update(reports, registry_size=len(await context.catalog.records()))
    return Response(context.metrics.render(), media_type=CONTENT_TYPE_LATEST)
