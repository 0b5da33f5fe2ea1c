"""`/health` is readiness (the registry and an engine replica answer), `/livez` liveness."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from routing.endpoints import ops
from tests.unit.fake_engine import FakeEngine, FakeRegistry
from tests.unit.tenancy import client_for, context_of, make_app


class Unreachable(Exception):
    pass


async def hangs(*_: Any) -> Any:
    await asyncio.sleep(3600)


async def fails(*_: Any) -> Any:
    raise Unreachable("gone")


@pytest.fixture(autouse=True)
def short_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ops, "READY_TIMEOUT_S", 0.2)


async def test_ready_when_the_registry_and_an_engine_answer() -> None:
    async with client_for(make_app([], FakeEngine())) as client:
        response = await client.get("/health")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


@pytest.mark.parametrize("broken", [hangs, fails], ids=["hangs", "fails"])
async def test_not_ready_without_the_registry(broken: Any) -> None:
    registry = FakeRegistry({})
    registry.generation = broken  # type: ignore[method-assign]
    async with client_for(make_app([], FakeEngine(), registry)) as client:
        response = await client.get("/health")
        assert (await client.get("/livez")).status_code == 200
    assert response.status_code == 503 and response.headers["retry-after"] == "5"
    error = response.json()["error"]
    assert error["code"] == "not_ready" and "registry" in error["message"] and "engine" not in error["message"]


@pytest.mark.parametrize("broken", [hangs, fails], ids=["hangs", "fails"])
async def test_not_ready_without_an_engine_replica(broken: Any) -> None:
    engine = FakeEngine()
    engine._ready = broken  # type: ignore[method-assign]
    async with client_for(make_app([], engine)) as client:
        response = await client.get("/health")
    assert response.status_code == 503 and "engine" in response.json()["error"]["message"]


async def test_not_ready_while_draining() -> None:
    app = make_app([], FakeEngine())
    context_of(app).draining.set()
    async with client_for(app) as client:
        assert (await client.get("/health")).status_code == 503
        assert (await client.get("/livez")).status_code == 200


async def test_an_unreachable_registry_keeps_known_adapters_served_and_unknown_ones_are_503(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from routing import catalog as catalog_module
    from tests.unit.fake_engine import record
    from tests.unit.tenancy import BASE

    monkeypatch.setattr(catalog_module, "REGISTRY_TIMEOUT_S", 0.2)
    monkeypatch.setattr(catalog_module, "REFRESH_S", 0.0)
    registry = FakeRegistry({"known": record("known")})
    engine = FakeEngine()
    async with client_for(make_app([], engine, registry)) as client:
        assert (await client.post("/v1/completions", json={"model": "known", "prompt": "x"})).status_code == 200
        registry.generation = hangs  # type: ignore[method-assign]
        registry.snapshot = hangs  # type: ignore[method-assign]
        registry.changes = hangs  # type: ignore[method-assign]
        known = await asyncio.wait_for(client.post("/v1/completions", json={"model": "known", "prompt": "x"}), 5)
        unknown = await asyncio.wait_for(client.post("/v1/completions", json={"model": "new", "prompt": "x"}), 5)
        base = await asyncio.wait_for(client.post("/v1/completions", json={"model": BASE, "prompt": "x"}), 5)
    assert known.status_code == 200 and base.status_code == 200
    assert unknown.status_code == 503 and unknown.json()["error"]["code"] == "not_ready"
