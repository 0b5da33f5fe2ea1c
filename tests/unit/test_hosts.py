"""An open server (no keys) answers only requests whose `Host` is loopback, an IP address or a configured name, so a
web page whose domain is rebound to 127.0.0.1 cannot register, delete or use adapters from the developer's browser."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from routing.hosts import host_name
from serve.config import RouterConfig
from tests.unit.fake_engine import FakeRegistry, record
from tests.unit.tenancy import api_key, bearer, make_app

REBOUND = "rebind.attacker.example"
WRITE = {"name": "planted", "source": "/adapters/planted"}


def client(app: Any, host: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=f"http://{host}")


@pytest.mark.parametrize(("method", "path", "body"), [
    ("POST", "/v1/adapters", WRITE),
    ("DELETE", "/v1/adapters/a1", None),
    ("POST", "/v1/completions", {"model": "a1", "prompt": "x"}),
    ("GET", "/v1/models", None),
    ("GET", "/ui/", None),
    ("GET", "/health", None),
])  # fmt: skip
async def test_an_open_server_refuses_a_name_it_does_not_answer_to(method: str, path: str, body: Any) -> None:
    registry = FakeRegistry({"a1": record("a1")})
    async with client(make_app([], registry=registry), f"{REBOUND}:8000") as rebound:
        response = await rebound.request(method, path, json=body)
    assert response.status_code == 403, response.text
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("permission_error", "host_not_allowed")
    assert REBOUND in error["message"] and "router.allowed_hosts" in error["message"]
    assert set(registry.records) == {"a1"}  # nothing registered, nothing deleted


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1:8000", "localhost:8000", "LOCALHOST.", "[::1]:8000", "app.localhost", "10.0.0.5:8000", "127.0.0.2"],
)
async def test_an_open_server_answers_loopback_names_and_addresses(host: str) -> None:
    registry = FakeRegistry({})
    async with client(make_app([], registry=registry), host) as local:
        assert (await local.post("/v1/adapters", json=WRITE)).status_code == 201
    assert set(registry.records) == {"planted"}


@pytest.mark.parametrize(
    ("host", "status"),
    [("api.internal", 200), ("API.internal:443", 200), ("a.corp.example", 200), ("corp.example", 403),
     ("api.internal.attacker.example", 403), ("localhost.attacker.example", 403)],
)  # fmt: skip
async def test_an_open_server_answers_the_configured_names(host: str, status: int) -> None:
    app = make_app([], allowed_hosts=["api.internal", "*.corp.example"])
    async with client(app, host) as named:
        assert (await named.get("/v1/models")).status_code == status


async def test_a_star_turns_the_check_off() -> None:
    async with client(make_app([], allowed_hosts=["*"]), REBOUND) as anywhere:
        assert (await anywhere.get("/v1/models")).status_code == 200


async def test_a_server_with_keys_checks_keys_not_host() -> None:
    key, entry = api_key("team", adapters=["*"])
    async with client(make_app([entry]), REBOUND) as rebound:
        assert (await rebound.get("/v1/models")).status_code == 401  # a rebound page has no key
        assert (await rebound.get("/v1/models", headers=bearer(key))).status_code == 200


@pytest.mark.parametrize(
    ("header", "name"),
    [("Example.COM:80", "example.com"), ("[::1]:8000", "::1"), ("example.com.", "example.com"), ("[::1]", "::1")],
)
def test_host_name_drops_port_case_and_trailing_dot(header: str, name: str) -> None:
    assert host_name(header) == name


@pytest.mark.parametrize("bad", ["", "a.*.b", "http://x", "host:80", "*.", "*x.example", "::1"])
def test_allowed_hosts_take_names_or_patterns(bad: str) -> None:
    given = ["*", " Api.Internal. ", "*.corp"]
    assert RouterConfig(allowed_hosts=given).allowed_hosts == ["*", "api.internal", "*.corp"]
    with pytest.raises(ValidationError, match="allowed_hosts"):
        RouterConfig(allowed_hosts=[bad])
