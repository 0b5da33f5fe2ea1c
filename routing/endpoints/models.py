"""`GET /v1/models` and `GET /v1/models/{model}`: the base model and its adapters."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from routing.context import ContextDep

router = APIRouter()


@router.get("/v1/models")
async def list_models(context: ContextDep) -> dict[str, Any]:
    return {"object": "list", "data": await context.catalog.models()}


@router.get("/v1/models/{model:path}")
async def retrieve_model(model: str, context: ContextDep) -> dict[str, Any]:
    return await context.catalog.model(model)
