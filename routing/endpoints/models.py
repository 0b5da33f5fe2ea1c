"""`GET /v1/models` and `GET /v1/models/{model}`: the base model and the adapters the caller's key may use (read
routes: the key's `rpm` counts them)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from routing.context import ContextDep
from routing.read_access import ReadKeyDep

router = APIRouter()


@router.get("/v1/models")
async def list_models(context: ContextDep, key: ReadKeyDep) -> dict[str, Any]:
    return {"object": "list", "data": await context.catalog.models(visible=key.may_use, scope=key)}


@router.get("/v1/models/{model:path}")
async def retrieve_model(model: str, context: ContextDep, key: ReadKeyDep) -> dict[str, Any]:
    key.require_use(context.catalog.name_of(model), model)
    return await context.catalog.model(model)
