"""`GET /v1/models` and `GET /v1/models/{model}`: the base model and the adapters the caller's key may use."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from routing.auth import KeyDep
from routing.context import ContextDep

router = APIRouter()


@router.get("/v1/models")
async def list_models(context: ContextDep, key: KeyDep) -> dict[str, Any]:
    return {"object": "list", "data": await context.catalog.models(visible=key.may_use)}


@router.get("/v1/models/{model:path}")
async def retrieve_model(model: str, context: ContextDep, key: KeyDep) -> dict[str, Any]:
    key.require_use(context.catalog.name_of(model), model)
    return await context.catalog.model(model)
