"""Operational endpoints: `GET /health` (readiness), `GET /livez` (liveness), `GET /metrics` (Prometheus).

`/health` answers 200 only while this router reaches the registry and at least one engine replica (each
within `READY_TIMEOUT_S`), else 503 in OpenAI's shape naming what is unreachable: load balancers and
Kubernetes readiness probes then send traffic elsewhere. `/livez` answers 200 while the process serves HTTP.

`/metrics` names adapters and their traffic, so a server with keys answers it only to a key with the `metrics`
(or `admin`) scope, as a bearer token (Prometheus: `authorization.credentials_file`), unless
`router.public_metrics` is set; errors are OpenAI-shaped like every route's."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from routing.context import ContextDep
from routing.errors import NotReady
from serve.wire import ReplicaReport

router = APIRouter()


READY_TIMEOUT_S = 2.0


CACHE_TROUBLE_S = 300.0
"""A replica's adapter-cache error shows in `/health` for this long."""


@router.get("/health")
async def health(context: ContextDep) -> dict[str, Any]:
    """200 `ok` when ready; 200 `degraded`, with `warnings`, when it serves but something needs an operator (an
    engine replica's node could not store adapters lately: new adapters get 503 there); 503 when not ready."""
    checks = {"registry": context.catalog.registry.generation(), "engine": context.engine.ready()}
    reports = asyncio.ensure_future(asyncio.wait_for(context.catalog.registry.replica_reports(), READY_TIMEOUT_S))
    results = await asyncio.gather(
        *(asyncio.wait_for(check, READY_TIMEOUT_S) for check in checks.values()), return_exceptions=True
    )
    down = [name for name, result in zip(checks, results, strict=True) if isinstance(result, BaseException)]
    if context.draining.is_set():
        down.append("router (shutting down)")
    if down:
        reports.cancel()
        raise NotReady(f"not ready: cannot reach {', '.join(down)}")
    try:
        warnings = cache_warnings(await reports, time.time())
    except Exception:
        warnings = []
    return {"status": "degraded", "warnings": warnings} if warnings else {"status": "ok"}


def cache_warnings(reports: list[ReplicaReport], now: float) -> list[str]:
    return [
        f"engine replica {report.replica}: adapter cache error {now - at:.0f} s ago: {report.stats.cache_error}"
        for report in reports
        if (at := report.stats.cache_error_at) is not None and now - at < CACHE_TROUBLE_S
    ]


@router.get("/livez")
async def livez() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/metrics")
async def metrics(request: Request, context: ContextDep) -> Response:
    if not context.config.public_metrics:
        headers = request.headers
        key = context.keys.authenticate(headers.get("authorization"), headers.get("x-api-key"))
        key.require_metrics()
        await context.admitter.admit_read(key)
    reports = await context.catalog.replica_reports()
    context.metrics.replicas.update(reports, registry_size=await context.catalog.count())
    return Response(context.metrics.render(), media_type=CONTENT_TYPE_LATEST)
