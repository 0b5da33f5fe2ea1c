"""The web console's data: `GET /v1/console/adapters` (adapters with placement and recent traffic) and
`GET /v1/console/server` (base model, settings, replicas, the fair-share gate, the build).

Each answers only what the caller's key may see, by the rules of `/v1/adapters` and `/v1/models`: the adapters
`Principal.may_see` lets it list, their sources only to admins, the base model's traffic only to keys that may use
it, other keys' queues only to admins. Traffic comes from this router replica's `RequestWindow`.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any

from fastapi import APIRouter, Query

from routing.console.summary import settings
from routing.context import ContextDep, RouterContext
from routing.disclosure import seen_by
from routing.endpoints.adapters import split_of, visible_page
from routing.errors import NotReady
from routing.principals import Principal
from routing.read_access import ReadKeyDep
from serve.wire import AdapterRecord, ReplicaReport, unversioned

router = APIRouter()
PAGE, PAGE_MAX = 500, 10_000
REPORTS_TIMEOUT_S = 5.0


async def _reports(context: RouterContext) -> list[ReplicaReport]:
    """The engine replicas' latest reports, as the registry holds them; 503 when it does not answer in time."""
    try:
        return await asyncio.wait_for(context.catalog.replica_reports(), REPORTS_TIMEOUT_S)
    except TimeoutError:
        raise NotReady("the adapter registry did not answer; retry shortly") from None


def _placement(reports: list[ReplicaReport]) -> dict[str, list[dict[str, Any]]]:
    """Where each adapter is installed, by bare name: the replica, the engine's name for it (`NAME@vN` while a new
    version is rolled out beside the current one) and whether its weights are in the engine's memory."""
    placed: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for report in reports:
        resident = set(report.resident)
        for installed in report.adapters:
            placed[unversioned(installed)].append(
                {"replica": report.replica, "name": installed, "resident": installed in resident}
            )
    return placed


def _composite(record: AdapterRecord) -> dict[str, Any] | None:
    """What a composite adapter is made of: PEFT's method and the weighted components."""
    made = record.composition
    if made is None:
        return None
    components = [{"name": n, "weight": w} for n, w in zip(made.adapters, made.weights, strict=True)]
    return {"method": made.method, "components": components}


def _rollout(record: AdapterRecord) -> dict[str, Any] | None:
    """The version being rolled out beside the current one, and the share of requests it gets."""
    if record.canary is None:
        return None
    return {"version": record.canary.version, "percent": record.canary_percent, "split": split_of(record)}


def adapter_row(
    context: RouterContext, record: AdapterRecord, key: Principal, placed: list[dict[str, Any]]
) -> dict[str, Any]:
    """One adapter as the console shows it to `key` (`routing.disclosure.seen_by`); its source (buckets, prefixes,
    host paths) only to admins."""
    source = record.source
    record = seen_by(record, key)
    model_id = context.catalog.adapter_id(record.name)
    row: dict[str, Any] = {
        "id": model_id,
        "name": record.name,
        "version": record.version,
        "rank": record.rank,
        "alpha": record.alpha,
        "size_bytes": record.size_bytes,
        "pinned": record.pinned,
        "created": record.created,
        "unusable": record.unusable,
        "warnings": list(record.warnings),
        "composite": _composite(record),
        "rollout": _rollout(record),
        "replicas": placed,
        "stats": context.metrics.window.stats(model_id).as_json(),
    }
    if key.admin:
        row["source"] = source
    return row


@router.get("/v1/console/adapters")
async def console_adapters(
    context: ContextDep,
    key: ReadKeyDep,
    limit: int = Query(PAGE, ge=1, le=PAGE_MAX, description="Adapters on this page."),
    after: str | None = Query(None, description="An adapter name from an earlier page: start after it."),
) -> dict[str, Any]:
    """The adapters this key may see, in name order, with their placement on the engine replicas and their traffic
    through this router over the last `window_s` seconds; `base` is the base model's traffic (null for a key that
    may not use it)."""
    visible, has_more = await visible_page(context, key, after, limit)
    placement = _placement(await _reports(context))
    rows = [adapter_row(context, r, key, placement.get(r.name, [])) for r in visible]
    base = context.catalog.base_id
    return {
        "object": "list",
        "window_s": context.metrics.window.window_s,
        "base": {"id": base, "stats": context.metrics.window.stats(base).as_json()} if key.may_use(None) else None,
        "data": rows,
        "has_more": has_more,
        "last_id": rows[-1]["name"] if rows else None,
    }


def _queues(context: RouterContext, key: Principal) -> list[dict[str, Any]]:
    """Requests in flight and waiting in the fair-share gate by key: every key's for admins, else the caller's."""
    gate = context.admitter.gate
    names = sorted(set(gate.running) | set(gate.queue.tenants()))
    if not key.admin:
        names = [name for name in names if name == key.name]
    return [{"key": name, "running": gate.running[name], "waiting": gate.queue.waiting_of(name)} for name in names]


def _replica(report: ReplicaReport) -> dict[str, Any]:
    """An engine replica's load and adapter cache, by counts (its adapters' names show in the adapters view)."""
    stats = report.stats
    return {
        "replica": report.replica,
        "running": report.running,
        "installed": len(report.adapters),
        "resident": len(report.resident),
        "engine_loras": report.engine_loras,
        "cache": {"hits": stats.hits, "misses": stats.misses, "loads": stats.loads, "evictions": stats.evictions,
                  "bytes": stats.cache_bytes, "errors": stats.cache_errors},
    }  # fmt: skip


def _whoami(context: RouterContext, key: Principal) -> dict[str, Any]:
    """The caller's key: its name and scope (`open`: the server takes no keys, everyone is `anonymous`)."""
    scope = {"name": key.name, "admin": key.admin, "base": key.base, "adapters": list(key.adapters)}
    return {**scope, "open": context.keys.is_open}


@router.get("/v1/console/server")
async def console_server(context: ContextDep, key: ReadKeyDep) -> dict[str, Any]:
    """Who the key is, the base model, the engine replicas and their load, this router replica's fair-share gate,
    and a summary of the configuration and build (settings only: no secrets, no host paths)."""
    gate = context.admitter.gate
    visible = await context.catalog.visible(("see", key), key.may_see)
    return {
        "object": "console.server",
        "key": _whoami(context, key),
        "base_model": context.catalog.base_id,
        "adapters": len(visible),
        "replicas": [_replica(report) for report in await _reports(context)],
        "gate": {
            "inflight": gate.inflight,
            "max_inflight": gate.max_inflight,
            "reserve": gate.reserve,
            "waiting": gate.waiting,
            "max_waiting": gate.max_waiting,
            "queues": _queues(context, key),
        },
        "window_s": context.metrics.window.window_s,
        "settings": settings(context.facts, context.config),
    }
