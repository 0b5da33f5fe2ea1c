"""The web console's API and page, against a fake engine: what each key sees, traffic, placement, the static files."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from routing.app import create_app
from routing.catalog import ModelCatalog
from routing.console.page import ASSETS, CSP
from routing.console.summary import ServerFacts
from routing.context import RouterContext
from serve.config import AppConfig, RouterConfig
from serve.wire import LoaderStats, ReplicaReport
from tests.unit.fake_engine import FakeEngine, FakeRegistry, engine_client, record
from tests.unit.tenancy import ADAPTERS, BASE, api_key, bearer, client_for, context_of, make_app

USER, USER_CONF = api_key("user", adapters=["a1"], base=True)
TEAM, TEAM_CONF = api_key("team", adapters=["team-*"])
ADMIN, ADMIN_CONF = api_key("ops", admin=True)
KEYS = [USER_CONF, TEAM_CONF, ADMIN_CONF]
REPORTS = [
    ReplicaReport("engine-1", adapters=("a1", "a2@v2"), engine_loras=1, stats=LoaderStats(hits=4), resident=("a1",),
                  running=3),
    ReplicaReport("engine-2", adapters=("a1",), engine_loras=0, stats=LoaderStats()),
]  # fmt: skip


def registry() -> FakeRegistry:
    return FakeRegistry({name: record(name) for name in ADAPTERS}, reports=REPORTS)


@pytest.fixture
async def open_client() -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(engine_client(FakeEngine()), ModelCatalog(BASE, registry()), RouterConfig())
    async with client_for(app) as client:
        yield client


@pytest.fixture
async def keyed() -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(make_app(KEYS, FakeEngine(), registry())) as client:
        yield client


def names(listing: dict[str, Any]) -> list[str]:
    return [row["name"] for row in listing["data"]]


async def test_an_open_server_shows_every_adapter_with_its_source_and_placement(open_client: httpx.AsyncClient) -> None:
    listing = (await open_client.get("/v1/console/adapters")).json()
    assert names(listing) == list(ADAPTERS) and listing["has_more"] is False
    a1 = listing["data"][0]
    assert a1["id"] == f"{BASE}:a1" and a1["source"] == "/adapters/x"
    assert (a1["version"], a1["rank"], a1["size_bytes"], a1["pinned"]) == (1, 8, 1, False)
    assert a1["replicas"] == [
        {"replica": "engine-1", "name": "a1", "resident": True},
        {"replica": "engine-2", "name": "a1", "resident": False},
    ]
    a2 = listing["data"][1]  # installed as the version being rolled out
    assert a2["replicas"] == [{"replica": "engine-1", "name": "a2@v2", "resident": False}]
    assert listing["data"][2]["replicas"] == []
    assert listing["base"]["id"] == BASE and listing["window_s"] == 300


async def test_traffic_is_counted_per_request_by_model(open_client: httpx.AsyncClient) -> None:
    await open_client.post("/v1/completions", json={"model": "a1", "prompt": "x"})
    await open_client.post("/v1/completions", json={"model": f"{BASE}:a1", "prompt": "x", "stream": True})
    await open_client.post("/v1/completions", json={"model": BASE, "prompt": "x", "temperature": -1})  # 400
    listing = (await open_client.get("/v1/console/adapters")).json()
    stats = listing["data"][0]["stats"]
    assert (stats["requests"], stats["errors"], stats["prompt_tokens"], stats["completion_tokens"]) == (2, 0, 6, 4)
    assert stats["p50_s"] is not None and stats["p50_s"] <= stats["p99_s"]
    assert listing["data"][1]["stats"]["requests"] == 0
    assert listing["base"]["stats"]["requests"] == 0  # refused before its model was known: not the base's


async def test_pages_follow_the_adapter_order(open_client: httpx.AsyncClient) -> None:
    first = (await open_client.get("/v1/console/adapters", params={"limit": 3})).json()
    assert names(first) == ["a1", "a2", "team-x"] and first["has_more"] and first["last_id"] == "team-x"
    rest = (await open_client.get("/v1/console/adapters", params={"after": f"{BASE}:team-x"})).json()
    assert names(rest) == ["team-y"] and not rest["has_more"]


@pytest.mark.parametrize(
    ("key", "visible", "base", "admin"),
    [(USER, ["a1"], True, False), (TEAM, ["team-x", "team-y"], False, False), (ADMIN, list(ADAPTERS), False, True)],
)
async def test_a_key_sees_only_what_its_scope_lets_it(
    keyed: httpx.AsyncClient, key: str, visible: list[str], base: bool, admin: bool
) -> None:
    listing = (await keyed.get("/v1/console/adapters", headers=bearer(key))).json()
    assert names(listing) == visible
    assert all(("source" in row) == admin for row in listing["data"])
    assert (listing["base"] is not None) == base
    server = (await keyed.get("/v1/console/server", headers=bearer(key))).json()
    assert server["adapters"] == len(visible)
    assert server["key"]["admin"] == admin and server["key"]["open"] is False


@pytest.mark.parametrize("path", ["/v1/console/adapters", "/v1/console/server"])
@pytest.mark.parametrize("headers", [{}, bearer("lpx-not-a-key")])
async def test_console_data_need_a_key(keyed: httpx.AsyncClient, path: str, headers: dict[str, str]) -> None:
    response = await keyed.get(path, headers=headers)
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


async def test_the_server_view_shows_replicas_gate_and_settings(open_client: httpx.AsyncClient) -> None:
    server = (await open_client.get("/v1/console/server")).json()
    assert server["base_model"] == BASE and server["key"] == {
        "name": "anonymous", "admin": True, "base": True, "adapters": ["*"], "open": True,
    }  # fmt: skip
    assert [(r["replica"], r["running"], r["installed"], r["resident"]) for r in server["replicas"]] == [
        ("engine-1", 3, 2, 1), ("engine-2", 0, 1, 0),
    ]  # fmt: skip
    assert server["replicas"][0]["cache"]["hits"] == 4
    assert server["gate"] == {"inflight": 0, "max_inflight": 64, "reserve": 8, "waiting": 0, "max_waiting": 192,
                              "queues": []}  # fmt: skip
    settings = server["settings"]
    assert settings["engine"] is None and settings["router"]["auth"] == "open (no keys)"
    assert settings["build"]["loraplex"]


async def test_only_admins_see_other_keys_queues(keyed: httpx.AsyncClient) -> None:
    gate = context_of(keyed._transport.app).admitter.gate  # type: ignore[attr-defined]
    gate.running.update({"user": 2, "team": 1})
    queues = {key: (await keyed.get("/v1/console/server", headers=bearer(key))).json()["gate"]["queues"]
              for key in (USER, ADMIN)}  # fmt: skip
    assert [q["key"] for q in queues[USER]] == ["user"]
    assert [(q["key"], q["running"]) for q in queues[ADMIN]] == [("team", 1), ("user", 2)]


async def test_settings_name_the_model_but_no_path_and_no_secret() -> None:
    config = AppConfig.model_validate({
        "engine": {"model": "/srv/models/secret-folder/tiny", "served_model_name": "tiny", "max_loras": 3},
        "engine_deployment": {"autoscaling": {"min_replicas": 1, "max_replicas": 3}},
        "registry": {"s3_secret_access_key": "hunter2", "hf_token": "hf_abc"},
        "tracing": {"otlp_endpoint": "http://collector.internal:4318"},
    })  # fmt: skip
    facts = ServerFacts(engine=config.engine, deployment=config.engine_deployment, tracing=config.tracing)
    app = create_app(engine_client(), ModelCatalog("tiny", registry()), config.router, facts=facts)
    async with client_for(app) as client:
        text = (await client.get("/v1/console/server")).text
    settings = json.loads(text)["settings"]
    assert settings["engine"]["model"] == "tiny" and settings["engine"]["max_loras"] == 3
    assert settings["deployment"]["autoscaling"] == "1-3 replicas" and settings["tracing"]["enabled"] is True
    for secret in ("secret-folder", "/srv", "hunter2", "hf_abc", "collector.internal"):
        assert secret not in text


async def test_the_page_and_its_files_are_served_with_their_types(open_client: httpx.AsyncClient) -> None:
    redirect = await open_client.get("/ui")
    assert redirect.status_code == 307 and redirect.headers["location"] == "ui/"
    for path, name in [("/ui/", "index.html"), *((f"/ui/{n}", n) for n in ASSETS)]:
        response = await open_client.get(path)
        assert response.status_code == 200, path
        assert response.headers["content-type"] == ASSETS[name]
        assert response.headers["content-security-policy"] == CSP
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.content


@pytest.mark.parametrize("name", list(ASSETS))
async def test_the_page_loads_nothing_from_elsewhere(open_client: httpx.AsyncClient, name: str) -> None:
    text = (await open_client.get(f"/ui/{name}")).text
    assert re.findall(r"(?:https?:)?//[\w.-]+\.\w+", text) == []
    assert "@import" not in text


@pytest.mark.parametrize("path", ["/ui/nope.js", "/ui/..%2Fpage.py", "/ui/static/app.js"])
async def test_nothing_else_is_served_under_ui(open_client: httpx.AsyncClient, path: str) -> None:
    response = await open_client.get(path)
    assert response.status_code == 404 and response.json()["error"]["type"] == "not_found_error"


async def test_the_page_needs_no_key_and_knows_whether_the_server_takes_keys(
    keyed: httpx.AsyncClient, open_client: httpx.AsyncClient
) -> None:
    closed = await keyed.get("/ui/")
    assert closed.status_code == 200 and 'name="loraplex-auth" content="keys"' in closed.text
    assert 'name="loraplex-auth" content="open"' in (await open_client.get("/ui/")).text


async def test_the_console_page_can_be_turned_off() -> None:
    app = create_app(engine_client(), ModelCatalog(BASE, registry()), RouterConfig(console=False))
    async with client_for(app) as client:
        assert (await client.get("/ui/")).status_code == 404
        assert (await client.get("/v1/console/server")).status_code == 200


def test_the_window_follows_the_configured_length() -> None:
    context: RouterContext = context_of(make_app([], console_window_s=120))
    assert context.metrics.window.window_s == 120
