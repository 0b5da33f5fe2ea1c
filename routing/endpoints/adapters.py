"""Adapter writes and reads: `/v1/adapters` and vLLM's `/v1/load_lora_adapter`, `/v1/unload_lora_adapter`.

Every write goes to the registry, which validates before it records anything; the router's
catalog is refreshed at once so the next request sees the change.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field

from routing.catalog import SEPARATOR
from routing.context import ContextDep, RouterContext
from routing.errors import OpenAIError
from routing.openapi import TEXT_ROUTE_ERRORS
from routing.protocol import JSONRoute
from serve.adapters.records import AdapterRecord, RegistryError

router = APIRouter(route_class=JSONRoute)


class RegisterAdapter(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64, description="Adapter name, `[A-Za-z0-9._-]`.")
    source: str = Field(min_length=1, description="A local path, `file://...` or `s3://bucket/prefix`.")
    pinned: bool = Field(default=False, description="Never evicted from engine memory once loaded.")


class LoadLoraAdapter(BaseModel):
    """vLLM's request body; `lora_name` may be `NAME` or `BASE:NAME`."""

    model_config = ConfigDict(extra="allow")

    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadLoraAdapter(BaseModel):
    model_config = ConfigDict(extra="allow")

    lora_name: str = Field(min_length=1)


class RegistryRefused(OpenAIError):
    """The registry refused a write; status and field come from the registry."""

    def __init__(self, error: RegistryError) -> None:
        super().__init__(error.message, param=error.param)
        self.status = error.status
        self.type = "not_found_error" if error.status == 404 else "invalid_request_error"


def card(context: RouterContext, record: AdapterRecord) -> dict[str, Any]:
    return {"id": context.catalog.adapter_id(record.name), "object": "adapter", **asdict(record)}


async def _register(context: RouterContext, name: str, source: str, pinned: bool) -> AdapterRecord:
    outcome = await context.catalog.registry.register(name, source, pinned)
    if isinstance(outcome, RegistryError):
        raise RegistryRefused(outcome)
    await context.catalog.refresh(force=True)
    return outcome


async def _unregister(context: RouterContext, name: str) -> AdapterRecord:
    outcome = await context.catalog.registry.unregister(name)
    if isinstance(outcome, RegistryError):
        raise RegistryRefused(outcome)
    await context.catalog.refresh(force=True)
    return outcome


def _bare(context: RouterContext, name: str) -> str:
    prefix = context.catalog.base_id + SEPARATOR
    return name.removeprefix(prefix)


@router.get("/v1/adapters")
async def list_adapters(context: ContextDep) -> dict[str, Any]:
    return {"object": "list", "data": [card(context, r) for r in await context.catalog.records()]}


@router.get("/v1/adapters/{name}")
async def get_adapter(name: str, context: ContextDep) -> dict[str, Any]:
    target = await context.catalog.resolve(name)
    if target.adapter is None:
        raise RegistryRefused(RegistryError(404, f"{name!r} is the base model, not an adapter", "name"))
    return card(context, target.adapter)


@router.post("/v1/adapters", status_code=201)
async def register_adapter(body: RegisterAdapter, context: ContextDep) -> JSONResponse:
    record = await _register(context, body.name, body.source, body.pinned)
    return JSONResponse(card(context, record), status_code=201)


@router.delete("/v1/adapters/{name}")
async def delete_adapter(name: str, context: ContextDep) -> dict[str, Any]:
    record = await _unregister(context, _bare(context, name))
    return {"id": context.catalog.adapter_id(record.name), "object": "adapter", "deleted": True}


@router.post("/v1/load_lora_adapter", response_class=PlainTextResponse, responses=TEXT_ROUTE_ERRORS)
async def load_lora_adapter(body: LoadLoraAdapter, context: ContextDep) -> str:
    record = await _register(context, _bare(context, body.lora_name), body.lora_path, False)
    return f"Success: LoRA adapter '{record.name}' added successfully."


@router.post("/v1/unload_lora_adapter", response_class=PlainTextResponse, responses=TEXT_ROUTE_ERRORS)
async def unload_lora_adapter(body: UnloadLoraAdapter, context: ContextDep) -> str:
    record = await _unregister(context, _bare(context, body.lora_name))
    return f"Success: LoRA adapter '{record.name}' removed successfully."
