"""API keys and scopes: 401 without a valid key, 403 outside the key's scope, filtered listings, audit log, CLI."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from routing.keys import hash_api_key, read_keys_file
from routing.principals import ANONYMOUS, KeyRing
from serve.cli.main import app as cli
from serve.config import AuthConfig, RouterConfig
from tests.unit.fake_engine import FakeEngine, FakeRegistry, record
from tests.unit.tenancy import ADAPTERS, BASE, api_key, bearer, client_for, make_app

USER, USER_CONF = api_key("user", adapters=["a1"])
TEAM, TEAM_CONF = api_key("team", adapters=["team-*"])
BASE_ONLY, BASE_CONF = api_key("base-only", base=True)
ADMIN, ADMIN_CONF = api_key("ops", admin=True)
SCRAPER, SCRAPER_CONF = api_key("prometheus", metrics=True)
KEYS = [USER_CONF, TEAM_CONF, BASE_CONF, ADMIN_CONF, SCRAPER_CONF]
CHAT = {"messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def registry() -> FakeRegistry:
    return FakeRegistry({name: record(name) for name in ADAPTERS})


@pytest.fixture
async def client(engine: FakeEngine, registry: FakeRegistry, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    app = make_app(KEYS, engine, registry, audit_file=str(tmp_path / "audit.jsonl"))
    async with client_for(app) as client:
        yield client


def error_of(response: httpx.Response, status: int, type_: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == type_
    return error


API_CALLS: list[tuple[str, str, Any]] = [
    ("POST", "/v1/completions", {"model": "a1", "prompt": "x"}),
    ("POST", "/v1/chat/completions", {"model": "a1", **CHAT}),
    ("GET", "/v1/models", None),
    ("GET", "/v1/models/a1", None),
    ("GET", "/v1/adapters", None),
    ("POST", "/v1/adapters", {"name": "new", "source": "/a/new"}),
    ("DELETE", "/v1/adapters/a1", None),
    ("POST", "/v1/load_lora_adapter", {"lora_name": "new", "lora_path": "/a/new"}),
]
NOT_A_KEY = [{}, {"Authorization": "Bearer lpx-unknown"}, {"Authorization": f"Basic {USER}"}, bearer("")]


@pytest.mark.parametrize("headers", NOT_A_KEY)
@pytest.mark.parametrize(("method", "path", "payload"), API_CALLS)
async def test_every_api_route_needs_a_valid_key(
    client: httpx.AsyncClient, engine: FakeEngine, registry: FakeRegistry, headers: dict[str, str],
    method: str, path: str, payload: Any,
) -> None:  # fmt: skip
    response = await client.request(method, path, json=payload, headers=headers)
    assert error_of(response, 401, "authentication_error")["code"] == "invalid_api_key"
    assert response.headers["www-authenticate"] == "Bearer"
    assert engine.requests == [] and sorted(registry.records) == sorted(ADAPTERS)


async def test_health_stays_open(client: httpx.AsyncClient) -> None:
    assert (await client.get("/health")).status_code == 200


@pytest.mark.parametrize("headers", NOT_A_KEY)
async def test_metrics_need_a_key(client: httpx.AsyncClient, headers: dict[str, str]) -> None:
    response = await client.get("/metrics", headers=headers)
    assert error_of(response, 401, "authentication_error")["code"] == "invalid_api_key"
    assert "loraplex_" not in response.text


@pytest.mark.parametrize("key", [USER, TEAM, BASE_ONLY])
async def test_metrics_need_the_metrics_or_admin_scope(client: httpx.AsyncClient, key: str) -> None:
    response = await client.get("/metrics", headers=bearer(key))
    error_of(response, 403, "permission_error")
    assert "a1" not in response.text  # no adapter ids for a tenant's key


@pytest.mark.parametrize("key", [SCRAPER, ADMIN])
async def test_the_metrics_and_admin_scopes_read_metrics(client: httpx.AsyncClient, key: str) -> None:
    response = await client.get("/metrics", headers=bearer(key))
    assert response.status_code == 200 and "loraplex_requests" in response.text
    assert (
        await client.post("/v1/completions", json={"model": "a1", "prompt": "x"}, headers=bearer(SCRAPER))
    ).status_code == 403


async def test_public_metrics_serve_them_without_a_key(engine: FakeEngine, registry: FakeRegistry) -> None:
    async with client_for(make_app(KEYS, engine, registry, public_metrics=True)) as client:
        assert (await client.get("/metrics")).status_code == 200


async def test_an_open_server_serves_metrics_to_anyone(engine: FakeEngine, registry: FakeRegistry) -> None:
    async with client_for(make_app([], engine, registry)) as client:
        assert (await client.get("/metrics")).status_code == 200


FORBIDDEN: list[tuple[str, str, str, Any]] = [
    (USER, "POST", "/v1/completions", {"model": BASE, "prompt": "x"}),
    (USER, "POST", "/v1/completions", {"model": f"{BASE}:a2", "prompt": "x"}),
    (USER, "POST", "/v1/chat/completions", {"model": "a2", **CHAT}),
    (USER, "POST", "/v1/completions", {"model": "no-such-adapter", "prompt": "x"}),  # no probing for names
    (TEAM, "POST", "/v1/completions", {"model": "a1", "prompt": "x"}),
    (BASE_ONLY, "POST", "/v1/completions", {"model": "a1", "prompt": "x"}),
    (USER, "GET", "/v1/models/a2", None),
    (USER, "GET", f"/v1/models/{BASE}", None),
    (USER, "GET", "/v1/adapters/team-x", None),
    (USER, "POST", "/v1/adapters", {"name": "new", "source": "/a/new"}),
    (USER, "POST", "/v1/adapters", {"not": "even valid"}),  # scope is checked before the body
    (TEAM, "DELETE", "/v1/adapters/team-x", None),
    (BASE_ONLY, "POST", "/v1/load_lora_adapter", {"lora_name": "new", "lora_path": "/a/new"}),
    (USER, "POST", "/v1/unload_lora_adapter", {"lora_name": "a1"}),
]


@pytest.mark.parametrize(("key", "method", "path", "payload"), FORBIDDEN)
async def test_out_of_scope_is_403(
    client: httpx.AsyncClient, engine: FakeEngine, registry: FakeRegistry,
    key: str, method: str, path: str, payload: Any,
) -> None:  # fmt: skip
    error_of(await client.request(method, path, json=payload, headers=bearer(key)), 403, "permission_error")
    assert engine.requests == [] and sorted(registry.records) == sorted(ADAPTERS)


ALLOWED = [(USER, "a1"), (USER, f"{BASE}:a1"), (TEAM, "team-x"), (TEAM, f"{BASE}:team-y"), (BASE_ONLY, BASE)]


@pytest.mark.parametrize(("key", "model"), ALLOWED)
async def test_names_and_globs_in_scope_are_served(
    client: httpx.AsyncClient, engine: FakeEngine, key: str, model: str
) -> None:
    response = await client.post("/v1/completions", json={"model": model, "prompt": "x"}, headers=bearer(key))
    assert response.status_code == 200, response.text
    assert len(engine.requests) == 1


async def test_in_scope_but_missing_is_404(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/completions", json={"model": "team-z", "prompt": "x"}, headers=bearer(TEAM))
    assert error_of(response, 404, "not_found_error")["param"] == "model"


@pytest.mark.parametrize(
    ("key", "visible"),
    [
        (USER, [f"{BASE}:a1"]),
        (TEAM, [f"{BASE}:team-x", f"{BASE}:team-y"]),
        (BASE_ONLY, [BASE]),
        (ADMIN, []),  # admin writes adapters; using them is a separate scope
    ],
)
async def test_models_list_only_what_the_key_may_use(client: httpx.AsyncClient, key: str, visible: list[str]) -> None:
    data = (await client.get("/v1/models", headers=bearer(key))).json()["data"]
    assert [m["id"] for m in data] == visible


async def test_adapter_listing_is_scoped_and_admins_see_all(client: httpx.AsyncClient) -> None:
    team = (await client.get("/v1/adapters", headers=bearer(TEAM))).json()["data"]
    assert [a["name"] for a in team] == ["team-x", "team-y"]
    everything = (await client.get("/v1/adapters", headers=bearer(ADMIN))).json()["data"]
    assert [a["name"] for a in everything] == sorted(ADAPTERS)
    assert (await client.get("/v1/adapters/team-x", headers=bearer(TEAM))).status_code == 200


async def test_admin_writes_and_the_audit_log_records_each_attempt(
    client: httpx.AsyncClient, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="loraplex.audit")
    admin = bearer(ADMIN)
    assert (
        await client.post("/v1/adapters", json={"name": "new", "source": "/a/new"}, headers=admin)
    ).status_code == 201
    refused = await client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/bad"}, headers=admin)
    assert refused.status_code == 400
    assert (await client.delete("/v1/adapters/a2", headers=bearer(USER))).status_code == 403
    unloaded = await client.post("/v1/unload_lora_adapter", json={"lora_name": "new"}, headers=admin)
    assert unloaded.status_code == 200

    lines = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [json.loads(r.getMessage()) for r in caplog.records if r.name == "loraplex.audit"] == lines
    summary = [(e["key"], e["action"], e["adapter"], e["outcome"], e["status"]) for e in lines]
    assert summary == [
        ("ops", "register", "new", "ok", 201),
        ("ops", "register", "x", "refused", 400),
        ("user", "unregister", "a2", "denied", 403),
        ("ops", "unregister", "new", "ok", 200),
    ]
    assert lines[0]["source"] == "/a/new" and lines[0]["version"] == 1 and lines[0]["route"] == "POST /v1/adapters"
    assert lines[1]["message"] and lines[0]["ts"].endswith("+00:00")


async def test_without_keys_the_server_is_open_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    app = make_app([])
    assert any(r.levelno == logging.WARNING and "OPEN" in r.getMessage() for r in caplog.records)
    async with client_for(app) as client:
        assert (await client.post("/v1/completions", json={"model": BASE, "prompt": "x"})).status_code == 200
        assert (await client.post("/v1/adapters", json={"name": "n", "source": "/a/n"})).status_code == 201
        assert len((await client.get("/v1/models")).json()["data"]) == 1 + len(ADAPTERS) + 1
    assert KeyRing(AuthConfig()).authenticate(None) is ANONYMOUS


def test_a_configured_but_missing_keys_file_refuses_to_start(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        KeyRing(AuthConfig(keys_file=str(tmp_path / "missing.yaml")))


def test_keys_file_changes_are_followed(tmp_path: Path) -> None:
    file = tmp_path / "keys.yaml"
    file.write_text("keys: []\n")
    now = [0.0]
    ring = KeyRing(AuthConfig(keys_file=str(file)), clock=lambda: now[0])
    assert not ring.is_open
    key, entry = api_key("late", base=True)
    file.write_text(f"keys:\n  - {{name: late, sha256: {entry.sha256}, base: true}}\n")
    os.utime(file, ns=(1, 1))  # a distinct mtime whatever the file system's resolution
    now[0] = 5.0
    assert ring.authenticate(f"Bearer {key}").name == "late"
    file.write_text("keys: [{name: broken}]\n")  # a bad edit keeps the keys we had
    os.utime(file, ns=(2, 2))
    now[0] = 10.0
    assert ring.authenticate(f"bearer {key}").name == "late"


@pytest.mark.parametrize("file_name", ["keys.yaml", "keys.json"])
def test_keys_create_prints_the_key_once_and_stores_only_its_hash(tmp_path: Path, file_name: str) -> None:
    file = tmp_path / file_name
    args = ["keys", "create", "--name", "ci", "--adapter", "team-*", "--base", "--compose", "--rpm", "5"]
    result = CliRunner().invoke(cli, [*args, "--tpm", "900", "--weight", "2", "--file", str(file)])
    assert result.exit_code == 0, result.output
    key = result.stdout.strip()
    assert key.startswith("lpx-") and len(key) > 40
    text = file.read_text()
    assert key not in text and key[4:] not in text and hash_api_key(key) in text
    assert oct(file.stat().st_mode & 0o777) == "0o600"
    (entry,) = read_keys_file(file).keys
    assert (entry.adapters, entry.base, entry.admin, entry.compose, entry.rpm, entry.tpm, entry.weight) == (
        ["team-*"], True, False, True, 5, 900, 2.0,
    )  # fmt: skip
    principal = KeyRing(RouterConfig(auth=AuthConfig(keys_file=str(file))).auth).authenticate(f"Bearer {key}")
    assert principal.name == "ci" and principal.may_use("team-x") and not principal.may_use("a1")
    principal.require_compose()  # granted: no PermissionDenied

    again = CliRunner().invoke(cli, ["keys", "create", "--name", "ci", "--file", str(file)])
    assert again.exit_code != 0 and "unique" in again.output
    listing = CliRunner().invoke(cli, ["keys", "list", "--file", str(file)])
    assert listing.stdout.startswith("ci\tteam-*,<base>,<compose>\trpm=5") and key not in listing.stdout


def test_adapters_cli_sends_the_api_key_as_bearer(monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[dict[str, str]] = []

    def fake_request(method: str, url: str, headers: dict[str, str], **_: Any) -> httpx.Response:
        sent.append(headers)
        return httpx.Response(200, json={"id": f"{BASE}:a1"})

    monkeypatch.setattr(httpx, "request", fake_request)
    assert CliRunner().invoke(cli, ["adapters", "rm", "a1", "--api-key", "lpx-flag"]).exit_code == 0
    assert CliRunner().invoke(cli, ["adapters", "rm", "a1"], env={"LORAPLEX_API_KEY": "lpx-env"}).exit_code == 0
    assert [h["Authorization"] for h in sent] == ["Bearer lpx-flag", "Bearer lpx-env"]


async def test_only_admins_see_where_an_adapter_comes_from(client: httpx.AsyncClient, registry: FakeRegistry) -> None:
    """An adapter's `source` names buckets, prefixes and host paths: operators' business, not tenants'; nor the
    source of a version being rolled out."""
    registry.records["a1"] = replace(registry.records["a1"], canary=record("a1", 2, "s3://private/a1-v2"),
                                     canary_percent=10.0)  # fmt: skip
    registry.generation_ += 1
    for key, sees_source in ((USER, False), (ADMIN, True)):
        one = (await client.get("/v1/adapters/a1", headers=bearer(key))).json()
        listed = (await client.get("/v1/adapters", headers=bearer(key))).json()["data"]
        assert one["id"].endswith("a1") and listed and one["canary"]["version"] == 2
        assert ("source" in one) is sees_source and ("source" in one["canary"]) is sees_source
        assert all(("source" in item) is sees_source for item in listed)
        assert ("private" in json.dumps(listed)) is sees_source


# Open by default only on loopback (Redis' protected mode): the CLI and the Serve app builder refuse otherwise.


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "router.example.com"])
def test_an_open_router_on_a_reachable_address_is_refused(host: str) -> None:
    refusal = RouterConfig(host=host).open_refusal(host)
    assert refusal is not None and "router.auth.keys_file" in refusal and "allow_open" in refusal


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"])
def test_an_open_router_on_loopback_is_allowed(host: str) -> None:
    assert RouterConfig(host=host).open_refusal(host) is None


def test_keys_or_the_explicit_opt_out_allow_any_address() -> None:
    assert RouterConfig(auth=AuthConfig(keys=[ADMIN_CONF])).open_refusal("0.0.0.0") is None
    assert RouterConfig(auth=AuthConfig(keys_file="/k.yaml")).open_refusal("0.0.0.0") is None
    assert RouterConfig(auth=AuthConfig(allow_open=True)).open_refusal("0.0.0.0") is None
    assert RouterConfig().open_refusal(None) is not None  # behind Serve's proxy: its address is unknown


def test_the_cli_refuses_to_serve_openly_on_all_interfaces_and_starts_nothing(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["serve", "--model", str(tmp_path), "--host", "0.0.0.0"])
    assert result.exit_code == 2
    assert "refusing to serve on 0.0.0.0 without API keys" in result.output and "--allow-open" in result.output


def test_a_serve_config_app_without_keys_is_refused_unless_it_opts_out() -> None:
    from serve.app import build_app, build_application

    args = {"engine": {"model": "/models/base"}, "router": {"ingress": "serve-proxy"}}
    with pytest.raises(ValueError, match="without API keys"):
        build_app(args)
    build_app({**args, "router": {"ingress": "serve-proxy", "auth": {"allow_open": True}}})
    build_app({**args, "router": {"ingress": "direct", "host": "127.0.0.1"}})
    build_application(args, proxy_host="127.0.0.1")  # `loraplex serve` knows where it started Serve's proxy
    with pytest.raises(ValueError, match=r"on 0\.0\.0\.0 without API keys"):
        build_application(args, proxy_host="0.0.0.0")


# Slow clients: the key is checked before the body is read, and the body has a read deadline.


async def call_raw(app: Any, headers: list[tuple[bytes, bytes]], receive: Any) -> tuple[int, dict[str, Any]]:
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions", "query_string": b"",
             "root_path": "", "headers": [(b"content-type", b"application/json"), *headers],
             "client": ("127.0.0.1", 1), "server": ("router", 80)}  # fmt: skip
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await asyncio.wait_for(app(scope, receive, send), 10)
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], json.loads(body)


async def test_a_missing_key_is_401_before_a_byte_of_the_body_is_read(engine: FakeEngine) -> None:
    reads = 0

    async def trickle() -> dict[str, Any]:
        nonlocal reads
        reads += 1
        await asyncio.sleep(3600)  # a client that never finishes its body
        return {"type": "http.request", "body": b"", "more_body": False}

    app = make_app(KEYS, engine)
    status, body = await call_raw(app, [(b"content-length", b"4000000")], trickle)
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert reads == 0 and engine.requests == []


@pytest.mark.parametrize("keys", [KEYS, []], ids=["keys", "open"])
async def test_a_body_that_does_not_arrive_in_time_is_408(engine: FakeEngine, keys: list[Any]) -> None:
    async def trickle() -> dict[str, Any]:
        await asyncio.sleep(0.05)
        return {"type": "http.request", "body": b" ", "more_body": True}  # a byte at a time, for ever

    app = make_app(keys, engine, body_read_timeout_s=0.3)
    status, body = await call_raw(app, [(b"authorization", f"Bearer {BASE_ONLY}".encode())], trickle)
    assert status == 408 and body["error"]["code"] == "request_timeout"
    assert engine.requests == []


def test_constructing_an_audit_log_leaves_logging_alone() -> None:
    from routing.audit import LOGGER, AuditLog

    logger = logging.getLogger(LOGGER)
    level, handlers = logger.level, list(logger.handlers)
    logger.setLevel(logging.NOTSET)
    logger.handlers.clear()
    try:
        AuditLog()
        assert logger.level == logging.NOTSET and logger.handlers == []
    finally:
        logger.setLevel(level)
        logger.handlers[:] = handlers
