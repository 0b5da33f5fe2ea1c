"""Read routes (`/v1/models`, `/v1/adapters`, `/v1/console/*`, `/metrics`) count against the key's `rpm`, and what
they compute from every adapter (a key's glob matched against each name) is computed once per registry generation,
not per request on the event loop that relays streams."""

from __future__ import annotations

from typing import Any

import pytest

from routing import principals
from routing.ratelimit import LocalRateLimiter
from serve.wire import ReplicaReport
from tests.unit.fake_engine import FakeEngine, FakeRegistry, record
from tests.unit.tenancy import BASE, api_key, bearer, client_for, make_app

READ_ROUTES = [
    "/v1/models",
    f"/v1/models/{BASE}",
    "/v1/adapters",
    "/v1/adapters/a1",
    "/v1/console/adapters",
    "/v1/console/server",
    "/metrics",
]


@pytest.mark.parametrize("path", READ_ROUTES)
async def test_read_routes_count_against_the_keys_requests_per_minute(path: str) -> None:
    key, conf = api_key("reader", adapters=["a1"], base=True, metrics=True, rpm=2)
    app = make_app([conf], FakeEngine(), limiter=LocalRateLimiter())
    async with client_for(app) as client:
        answers = [await client.get(path, headers=bearer(key)) for _ in range(3)]
    assert [answer.status_code for answer in answers] == [200, 200, 429], answers[-1].text
    assert answers[-1].headers["retry-after"] == "30"
    assert answers[-1].json()["error"]["code"] == "rate_limit_exceeded"


async def test_a_key_without_rpm_reads_freely() -> None:
    key, conf = api_key("reader", adapters=["a1"], base=True)
    async with client_for(make_app([conf], FakeEngine(), limiter=LocalRateLimiter())) as client:
        assert {(await client.get("/v1/models", headers=bearer(key))).status_code for _ in range(20)} == {200}


def many_adapters(count: int) -> FakeRegistry:
    return FakeRegistry({f"team-{i:05d}": record(f"team-{i:05d}") for i in range(count)} | {"a1": record("a1")})


async def test_what_a_key_may_see_is_matched_once_per_registry_generation(monkeypatch: pytest.MonkeyPatch) -> None:
    matched: list[str] = []
    real = principals.fnmatchcase

    def counting(name: str, pattern: str) -> bool:
        matched.append(name)
        return real(name, pattern)

    monkeypatch.setattr(principals, "fnmatchcase", counting)
    key, conf = api_key("team", adapters=["team-0000*"], base=True)
    admin, admin_conf = api_key("ops", admin=True, adapters=["*"])
    app = make_app([conf, admin_conf], FakeEngine(), many_adapters(2000))
    reads: list[tuple[str, Any]] = [("/v1/models", lambda j: len(j["data"]) == 11),
                                    ("/v1/adapters?limit=3", lambda j: j["has_more"] and len(j["data"]) == 3),
                                    ("/v1/adapters?limit=5&after=team-00007", lambda j: len(j["data"]) == 2),
                                    ("/v1/console/server", lambda j: j["adapters"] == 10),
                                    ("/v1/console/adapters", lambda j: len(j["data"]) == 10)]  # fmt: skip
    async with client_for(app) as client:
        for path, expected in reads:
            answer = await client.get(path, headers=bearer(key))
            assert answer.status_code == 200 and expected(answer.json()), (path, answer.text)
        first = len(matched)
        assert first >= 2000, "the first listing matches every name"
        for path, expected in reads * 3:
            answer = await client.get(path, headers=bearer(key))
            assert expected(answer.json()), path
        assert len(matched) - first < 50, "later listings at the same generation match nothing but a few ids"
        registered = await client.post(
            "/v1/adapters", json={"name": "team-0000-new", "source": "/adapters/x"}, headers=bearer(admin)
        )
        assert registered.status_code == 201, registered.text
        listing = (await client.get("/v1/console/server", headers=bearer(key))).json()
    assert listing["adapters"] == 11, "a new generation is matched again"


class CountingRegistry(FakeRegistry):
    """Counts the replica-report calls the router makes."""

    calls: int = 0

    async def replica_reports(self) -> list[ReplicaReport]:
        self.calls += 1
        return await super().replica_reports()


async def test_read_routes_share_the_replica_reports_instead_of_one_registry_call_each() -> None:
    registry = CountingRegistry({"a1": record("a1")})
    key, conf = api_key("ops", admin=True, metrics=True, adapters=["*"], base=True)
    async with client_for(make_app([conf], FakeEngine(), registry)) as client:
        for _ in range(5):
            for path in ("/v1/console/server", "/v1/console/adapters", "/metrics", "/v1/adapters/a1"):
                assert (await client.get(path, headers=bearer(key))).status_code == 200, path
    assert registry.calls == 1, "20 reads within a second: one registry call"
