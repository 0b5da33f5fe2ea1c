"""Builders for tenancy tests: API keys with scopes, and a router app that knows them."""

from __future__ import annotations

from typing import Any

import httpx
from fastapi import FastAPI

from routing.app import create_app
from routing.catalog import ModelCatalog
from routing.context import RouterContext
from routing.keys import hash_api_key, new_api_key
from routing.ratelimit import RateLimiter
from serve.config import ApiKeyConfig, AuthConfig, RouterConfig
from tests.unit.fake_engine import FakeRegistry, engine_client, record

BASE = "tiny-base"
ADAPTERS = ("a1", "a2", "team-x", "team-y")


KEY_NAMES: dict[str, str] = {}
"""Each fresh key's name: a parametrized test's id names the key, not its random value (tests/unit/conftest.py), so
that pytest-xdist's workers, each importing the tests anew, collect the same ids."""


def api_key(name: str, **scope: Any) -> tuple[str, ApiKeyConfig]:
    """A fresh key and its configuration entry (which holds only the hash)."""
    key = new_api_key()
    KEY_NAMES[key] = name
    return key, ApiKeyConfig(name=name, sha256=hash_api_key(key), **scope)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def make_app(
    keys: list[ApiKeyConfig],
    engine: Any | None = None,
    registry: FakeRegistry | None = None,
    limiter: RateLimiter | None = None,
    audit_file: str | None = None,
    max_model_len: int | None = None,
    **config: Any,
) -> FastAPI:
    registry = registry or FakeRegistry({name: record(name) for name in ADAPTERS})
    router_config = RouterConfig(auth=AuthConfig(keys=keys, audit_file=audit_file), **config)
    catalog = ModelCatalog(BASE, registry)
    return create_app(engine_client(engine), catalog, router_config, limiter=limiter, max_model_len=max_model_len)


def client_for(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router.localhost")


def context_of(app: FastAPI) -> RouterContext:
    context: RouterContext = app.state.context
    return context
