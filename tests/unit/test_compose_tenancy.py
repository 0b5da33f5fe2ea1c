"""Who may make inline composites: the compose scope on every route that takes `compose`, admission (rate limits,
fair share) before the registry is asked, weights checked before it is.

The router runs over the fake registry (no files: tests/unit/test_compose_bounds.py builds real ones).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from routing.ratelimit import LocalRateLimiter
from tests.unit.fake_engine import FakeEngine, FakeRegistry, record
from tests.unit.tenancy import ADAPTERS, BASE, api_key, bearer, client_for, make_app
from tests.unit.test_fairness import HeldEngine, until

TENANT, TENANT_CONF = api_key("tenant", adapters=["a1", "a2"], base=True)
COMPOSER, COMPOSER_CONF = api_key("composer", adapters=["a1", "a2"], base=True, compose=True)
ADMIN, ADMIN_CONF = api_key("ops", admin=True, adapters=["*"], base=True)
KEYS = [TENANT_CONF, COMPOSER_CONF, ADMIN_CONF]
COMPOSE = {"method": "cat", "adapters": [{"name": "a1", "weight": 0.7}, {"name": "a2", "weight": 0.3}]}
ROUTES: list[tuple[str, dict[str, Any]]] = [
    ("/v1/completions", {"prompt": "x"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/responses", {"input": "hi"}),
    ("/v1/messages", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}),
    ("/tokenize", {"prompt": "x"}),
    ("/detokenize", {"tokens": [1, 2]}),
]


def fake_registry() -> FakeRegistry:
    return FakeRegistry({name: record(name) for name in ADAPTERS})


@pytest.mark.parametrize(("path", "body"), ROUTES)
async def test_compose_needs_the_compose_scope_on_every_route_and_asks_nothing_of_the_registry_without_it(
    path: str, body: dict[str, Any]
) -> None:
    registry, engine = fake_registry(), FakeEngine()
    async with client_for(make_app(KEYS, engine, registry)) as client:
        request = {"model": BASE, **body, "compose": COMPOSE}
        denied = await client.post(path, json=request, headers=bearer(TENANT))
        assert denied.status_code == 403, denied.text
        assert denied.headers["content-type"] == "application/json"
        assert not registry.materialized and not engine.requests
        for key in (COMPOSER, ADMIN):  # granted, or admin
            allowed = await client.post(path, json=request, headers=bearer(key))
            assert allowed.status_code == 200, allowed.text
    assert len(registry.materialized) == 1, "the second key's request found the composite made for the first's"


async def test_the_refusal_names_the_compose_field_in_openai_shape() -> None:
    async with client_for(make_app(KEYS, registry=fake_registry())) as client:
        denied = await client.post("/v1/completions", json={"model": BASE, "prompt": "x", "compose": COMPOSE},
                                   headers=bearer(TENANT))  # fmt: skip
    error = denied.json()["error"]
    assert (error["type"], error["param"]) == ("permission_error", "compose")
    assert "compose" in error["message"]


async def test_an_open_server_composes_and_registering_a_composite_still_needs_admin() -> None:
    registry = fake_registry()
    async with client_for(make_app([], registry=registry)) as client:  # no keys: the anonymous admin
        answer = await client.post("/tokenize", json={"model": BASE, "prompt": "x", "compose": COMPOSE})
        assert answer.status_code == 200, answer.text
    async with client_for(make_app(KEYS, registry=registry)) as client:
        body = {"name": "mix", "compose": COMPOSE}
        denied = await client.post("/v1/adapters", json=body, headers=bearer(COMPOSER))
        assert denied.status_code == 403 and denied.json()["error"]["type"] == "permission_error"


async def test_a_rate_limited_key_asks_the_registry_for_no_composite() -> None:
    key, conf = api_key("limited", adapters=["a1", "a2"], base=True, compose=True, rpm=1)
    registry = fake_registry()
    app = make_app([conf], registry=registry, limiter=LocalRateLimiter(lambda: 1000.0))
    async with client_for(app) as client:
        answers = []
        for seed in range(3):  # dare_linear: each seed is another composite
            compose = {**COMPOSE, "method": "dare_linear", "density": 0.5, "seed": seed}
            answers.append(await client.post("/tokenize", json={"model": BASE, "prompt": "x", "compose": compose},
                                             headers=bearer(key)))  # fmt: skip
    assert [a.status_code for a in answers] == [200, 429, 429]
    assert answers[1].headers["retry-after"]
    assert [c.seed for c in registry.materialized] == [0], "only the admitted request reached the registry"


async def test_a_request_the_fair_share_gate_refuses_asks_the_registry_for_no_composite() -> None:
    registry, engine = fake_registry(), HeldEngine()
    app = make_app([COMPOSER_CONF], engine, registry, max_inflight=1, max_waiting=0)
    async with client_for(app) as client:
        first = asyncio.create_task(client.post("/v1/completions", json={"model": BASE, "prompt": "a"},
                                                headers=bearer(COMPOSER)))  # fmt: skip
        await until(lambda: engine.order == ["a"])  # holds the gate's one slot
        refused = await client.post("/v1/completions", json={"model": BASE, "prompt": "b", "compose": COMPOSE},
                                    headers=bearer(COMPOSER))  # fmt: skip
        engine.release.set()
        assert (await first).status_code == 200
    assert refused.status_code == 503 and refused.headers["retry-after"]
    assert not registry.materialized


BAD_WEIGHTS = [(0.0, "compose.adapters.0.weight"), (0.00004, "compose.adapters.0.weight"),
               (-16.5, "compose.adapters.0.weight"), (float("inf"), "compose.adapters.0.weight")]  # fmt: skip


@pytest.mark.parametrize(("weight", "param"), BAD_WEIGHTS)
async def test_weights_that_round_to_zero_or_pass_the_bound_are_refused_before_the_registry(
    weight: float, param: str
) -> None:
    registry = fake_registry()
    body = {"model": BASE, "prompt": "x", "compose": {"adapters": [{"name": "a1", "weight": weight}]}}
    async with client_for(make_app(KEYS, registry=registry)) as client:
        refused = await client.post("/v1/completions", content=json.dumps(body),
                                    headers={**bearer(COMPOSER), "content-type": "application/json"})  # fmt: skip
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"]["param"] == param
    assert not registry.materialized
