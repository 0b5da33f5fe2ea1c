"""The adapter API against a fake registry: writes, reads, vLLM's load/unload, and model visibility."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from routing.app import create_app
from routing.catalog import ModelCatalog
from serve.config import RouterConfig
from tests.unit.fake_engine import FakeEngine, FakeRegistry

BASE = "tiny-base"


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(FakeEngine(), ModelCatalog(BASE, FakeRegistry()), RouterConfig())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router") as client:
        yield client


async def model_ids(client: httpx.AsyncClient) -> list[str]:
    return [m["id"] for m in (await client.get("/v1/models")).json()["data"]]


async def test_register_use_replace_and_delete(client: httpx.AsyncClient) -> None:
    created = await client.post("/v1/adapters", json={"name": "new", "source": "/a/new"})
    assert created.status_code == 201
    assert created.json()["id"] == f"{BASE}:new" and created.json()["version"] == 1
    assert f"{BASE}:new" in await model_ids(client)
    assert (await client.post("/v1/completions", json={"model": "new", "prompt": "x"})).status_code == 200

    replaced = await client.post("/v1/adapters", json={"name": "new", "source": "/a/new-v2"})
    assert replaced.json()["version"] == 2
    assert (await client.get("/v1/adapters/new")).json()["source"] == "/a/new-v2"

    assert (await client.delete(f"/v1/adapters/{BASE}:new")).json()["deleted"] is True
    assert (await client.post("/v1/completions", json={"model": "new", "prompt": "x"})).status_code == 404
    assert (await client.delete("/v1/adapters/new")).status_code == 404


async def test_vllm_compatible_load_and_unload(client: httpx.AsyncClient) -> None:
    loaded = await client.post("/v1/load_lora_adapter", json={"lora_name": "sql", "lora_path": "/a/sql"})
    assert loaded.status_code == 200 and "added successfully" in loaded.text
    assert (await client.get("/v1/adapters")).json()["data"][0]["name"] == "sql"
    unloaded = await client.post("/v1/unload_lora_adapter", json={"lora_name": f"{BASE}:sql"})
    assert unloaded.status_code == 200 and "removed" in unloaded.text
    assert await model_ids(client) == [BASE]


@pytest.mark.parametrize(
    ("payload", "status", "param"),
    [
        ({"name": "x", "source": "/a/bad"}, 400, "source"),
        ({"name": "x"}, 400, "source"),
        ({"source": "/a/x"}, 400, "name"),
        ({"name": "x", "source": "/a/x", "surprise": 1}, 400, "surprise"),
    ],
)
async def test_refused_writes_record_nothing(
    client: httpx.AsyncClient, payload: dict[str, object], status: int, param: str
) -> None:
    response = await client.post("/v1/adapters", json=payload)
    assert response.status_code == status
    assert response.json()["error"]["param"] == param
    assert await model_ids(client) == [BASE]
