"""Adapter writes and reads: `/v1/adapters` and vLLM's `/v1/load_lora_adapter`, `/v1/unload_lora_adapter`.

Every write needs an admin key, goes to the registry, which validates before it records anything,
and is audited; the router's catalog is refreshed at once so the next request sees the change.
Reads list only the adapters the key may use (admins: all).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from routing.audit import AuditAction
from routing.auth import RegisterAdmin, UnregisterAdmin
from routing.context import ContextDep, RouterContext
from routing.disclosure import seen_by
from routing.errors import InvalidRequest, OpenAIError, PermissionDenied, UpstreamError
from routing.openapi import TEXT_ROUTE_ERRORS
from routing.principals import Principal
from routing.protocol import ComposeSpec, JSONRoute
from routing.read_access import ReadKeyDep
from serve.wire import ADAPTER_NAME_PATTERN, AdapterRecord, WireError

router = APIRouter(route_class=JSONRoute)
LIST_LIMIT, LIST_MAX = 1000, 10_000
"""Adapters per page of `GET /v1/adapters` by default, and at most (OpenAI's file list uses 10,000 too)."""


class RegisterAdapter(BaseModel):
    """A registration: an adapter's name and its source, or the composite it is."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64, description=f"Adapter name, matching `{ADAPTER_NAME_PATTERN}`.")
    compose: ComposeSpec | None = Field(
        default=None,
        description=(
            "Instead of a source: a weighted combination of registered adapters, built with PEFT and rebuilt when a "
            "component gets a new version."
        ),
    )
    source: str | None = Field(
        default=None,
        min_length=1,
        validate_default=True,
        description=(
            "A local path, `file://...`, `s3://bucket/prefix` or `hf://org/repo[@revision][/subfolder]` (or `compose`)."
        ),
    )
    pinned: bool = Field(default=False, description="Never evicted from engine memory once loaded.")
    tool_call_parser: str | None = Field(
        default=None,
        min_length=1,
        max_length=64,
        description=(
            "vLLM's tool-call parser for this adapter's chat format, when it differs from the server's "
            "(`engine.tool_call_parser`): one of the parsers the server loads (`engine.tool_call_parsers`)."
        ),
    )

    @field_validator("source")
    @classmethod
    def _source_or_compose(cls, source: str | None, info: ValidationInfo) -> str | None:
        if (source is None) == (info.data.get("compose") is None):
            raise ValueError("give a source or compose (one of them)")
        return source


Percent = Annotated[float, Field(ge=0, le=100, description="Share of the adapter's requests the new version gets.")]


class StartRollout(BaseModel):
    """The next version of an adapter, and the share of its requests it gets at first."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(
        min_length=1, description="The new version's files: a local path, `file://...`, `s3://...` or `hf://...`."
    )
    percent: Percent = 10.0


class ChangeSplit(BaseModel):
    """A new share of an adapter's requests for the version being rolled out."""

    model_config = ConfigDict(extra="forbid")

    percent: Percent


class LoadLoraAdapter(BaseModel):
    """vLLM's request body; `lora_name` may be `NAME` or `BASE:NAME`."""

    model_config = ConfigDict(extra="allow")

    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadLoraAdapter(BaseModel):
    """vLLM's unload request (`/v1/unload_lora_adapter`): unregisters the adapter."""

    model_config = ConfigDict(extra="allow")

    lora_name: str = Field(min_length=1)


def card(context: RouterContext, record: AdapterRecord, key: Principal) -> dict[str, Any]:
    """An adapter as the API shows it to `key` (`routing.disclosure.seen_by`); `source` (buckets, prefixes, host
    paths) only to admins, its rolled-out version's too."""
    fields = asdict(seen_by(record, key))
    if not key.admin:
        del fields["source"]
        if fields["canary"] is not None:
            del fields["canary"]["source"]
    return {"id": context.catalog.adapter_id(record.name), "object": "adapter", **fields}


async def _register(
    context: RouterContext,
    request: Request,
    key: Principal,
    name: str,
    source: str | ComposeSpec,
    pinned: bool,
    status: int,
    tool_call_parser: str | None = None,
) -> AdapterRecord:
    """Registers `name` from a source, or as a composite (`ComposeSpec`), and audits the outcome."""
    action: AuditAction = "register" if isinstance(source, str) else "compose"
    described = source if isinstance(source, str) else _described(context, source)
    try:
        if isinstance(source, str):
            outcome = await context.catalog.registry.register(name, source, pinned, tool_call_parser)
        else:
            names = [_bare(context, component.name) for component in source.adapters]
            outcome = await context.catalog.registry.compose(name, source.composition(names), pinned, tool_call_parser)
        if isinstance(outcome, WireError):
            raise UpstreamError(outcome)
    except OpenAIError as exc:
        context.audit.record(key.name, action, request, adapter=name, source=described, error=exc)
        raise
    context.audit.record(
        key.name, action, request, adapter=name, source=described, version=outcome.version, status=status
    )
    context.catalog.wrote(outcome.name, outcome)
    return outcome


async def _unregister(context: RouterContext, request: Request, key: Principal, name: str) -> AdapterRecord:
    try:
        outcome = await context.catalog.registry.unregister(name)
        if isinstance(outcome, WireError):
            raise UpstreamError(outcome)
    except OpenAIError as exc:
        context.audit.record(key.name, "unregister", request, adapter=name, error=exc)
        raise
    context.audit.record(key.name, "unregister", request, adapter=name, source=outcome.source, version=outcome.version)
    context.catalog.wrote(name, None)
    return outcome


def _described(context: RouterContext, spec: ComposeSpec) -> str:
    """A composite as the audit log shows it: `cat(alpha*0.7, beta*0.3)`."""
    parts = ", ".join(f"{_bare(context, c.name)}*{c.weight:g}" for c in spec.adapters)
    return f"{spec.method}({parts})"


def _bare(context: RouterContext, name: str) -> str:
    return context.catalog.name_of(name) or name


@router.get("/v1/adapters")
async def list_adapters(
    context: ContextDep,
    key: ReadKeyDep,
    limit: int = Query(LIST_LIMIT, ge=1, le=LIST_MAX, description="Adapters on this page."),
    after: str | None = Query(None, description="An adapter id (or name) from an earlier page: start after it."),
) -> dict[str, Any]:
    """The adapters this key may see, ordered by name, a page at a time as OpenAI's list endpoints page:
    `has_more` says whether to ask again with `after` = this page's `last_id`."""
    page, has_more = await visible_page(context, key, after, limit)
    data = [card(context, r, key) for r in page]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }


async def visible_page(
    context: RouterContext, key: Principal, after: str | None, limit: int
) -> tuple[list[AdapterRecord], bool]:
    """Up to `limit` adapters `key` may see, in name order, after the adapter `after` (an id or a name; None: from
    the first), and whether more follow."""
    start = None if after is None else _bare(context, after)
    return await context.catalog.visible_after(("see", key), key.may_see, start, limit)


@router.get("/v1/adapters/{name}")
async def get_adapter(name: str, context: ContextDep, key: ReadKeyDep) -> dict[str, Any]:
    adapter = context.catalog.name_of(name)
    if adapter is not None and not key.may_see(adapter):
        raise PermissionDenied(f"This API key may not use the adapter `{name}`.", param="name")
    target = await context.catalog.resolve(name)
    if target.adapter is None:
        raise UpstreamError(WireError(404, f"{name!r} is the base model, not an adapter", "name"))
    reports = await context.catalog.replica_reports()
    placement = [
        {"replica": r.replica, "resident": target.adapter.name in r.resident}
        for r in reports
        if target.adapter.name in r.adapters
    ]
    return {**card(context, target.adapter, key), "replicas": placement}


@router.post("/v1/adapters", status_code=201)
async def register_adapter(
    body: RegisterAdapter, request: Request, context: ContextDep, key: RegisterAdmin
) -> JSONResponse:
    source = body.source or body.compose
    if source is None:  # the model's validator refuses this already
        raise InvalidRequest("give a source or compose (one of them)", param="source")
    record = await _register(context, request, key, body.name, source, body.pinned, 201, body.tool_call_parser)
    return JSONResponse(card(context, record, key), status_code=201)


@router.delete("/v1/adapters/{name}")
async def delete_adapter(name: str, request: Request, context: ContextDep, key: UnregisterAdmin) -> dict[str, Any]:
    record = await _unregister(context, request, key, _bare(context, name))
    return {"id": context.catalog.adapter_id(record.name), "object": "adapter", "deleted": True}


def split_of(record: AdapterRecord) -> str:
    """How `record`'s requests are shared between its versions: `v3 90% / v4 10%`."""
    if record.canary is None:
        return f"v{record.version} 100%"
    share = record.canary_percent
    return f"v{record.version} {100 - share:g}% / v{record.canary.version} {share:g}%"


async def _rollout_step(
    context: RouterContext, request: Request, key: Principal, action: AuditAction, name: str, step: Any
) -> dict[str, Any]:
    """Runs one change of a rollout against the registry, audits it with the split it leaves, returns the card."""
    name = _bare(context, name)
    try:
        outcome = await step(name)
        if isinstance(outcome, WireError):
            raise UpstreamError(outcome)
    except OpenAIError as exc:
        context.audit.record(key.name, action, request, adapter=name, error=exc)
        raise
    context.audit.record(key.name, action, request, adapter=name, version=outcome.version, split=split_of(outcome),
                         source=outcome.canary.source if outcome.canary else None)  # fmt: skip
    await context.catalog.refresh(force=True)
    return card(context, outcome, key)


@router.post("/v1/adapters/{name}/rollout", status_code=201)
async def start_rollout(
    name: str, body: StartRollout, request: Request, context: ContextDep, key: RegisterAdmin
) -> dict[str, Any]:
    """Registers `source` as the next version of `name` and sends it `percent` of the requests (sticky per `user`);
    the current version keeps the rest until promote or rollback."""
    registry = context.catalog.registry
    return await _rollout_step(context, request, key, "rollout", name,
                               lambda n: registry.rollout(n, body.source, body.percent))  # fmt: skip


@router.patch("/v1/adapters/{name}/rollout")
async def change_split(
    name: str, body: ChangeSplit, request: Request, context: ContextDep, key: RegisterAdmin
) -> dict[str, Any]:
    """Changes the share of `name`'s requests its new version gets."""
    registry = context.catalog.registry
    return await _rollout_step(context, request, key, "split", name, lambda n: registry.split(n, body.percent))


@router.post("/v1/adapters/{name}/promote")
async def promote(name: str, request: Request, context: ContextDep, key: RegisterAdmin) -> dict[str, Any]:
    """Makes the version being rolled out `name`'s only one."""
    return await _rollout_step(context, request, key, "promote", name, context.catalog.registry.promote)


@router.post("/v1/adapters/{name}/rollback")
async def rollback(name: str, request: Request, context: ContextDep, key: RegisterAdmin) -> dict[str, Any]:
    """Drops the version being rolled out; the current one takes every request again."""
    return await _rollout_step(context, request, key, "rollback", name, context.catalog.registry.rollback)


@router.post("/v1/load_lora_adapter", response_class=PlainTextResponse, responses=TEXT_ROUTE_ERRORS)
async def load_lora_adapter(body: LoadLoraAdapter, request: Request, context: ContextDep, key: RegisterAdmin) -> str:
    record = await _register(context, request, key, _bare(context, body.lora_name), body.lora_path, False, 200)
    return f"Success: LoRA adapter '{record.name}' added successfully."


@router.post("/v1/unload_lora_adapter", response_class=PlainTextResponse, responses=TEXT_ROUTE_ERRORS)
async def unload_lora_adapter(
    body: UnloadLoraAdapter, request: Request, context: ContextDep, key: UnregisterAdmin
) -> str:
    record = await _unregister(context, request, key, _bare(context, body.lora_name))
    return f"Success: LoRA adapter '{record.name}' removed successfully."
