"""What a tenant's key sees of what it may not use: an adapter's load error or unusable reason (host paths, buckets,
the S3 endpoint) only as "unavailable" with a request id, which the log holds with the reason; a composite's
components only those the key may use. Admin keys see everything."""

from __future__ import annotations

import logging
import re
from dataclasses import replace
from typing import Any

import pytest

from serve.adapters.cache import CacheUnavailable
from serve.adapters.loader import install_failure
from serve.adapters.validation import AdapterInvalid
from serve.wire import Composition, ReplicaItem
from tests.unit.fake_engine import FakeEngine, FakeRegistry, record
from tests.unit.tenancy import api_key, bearer, client_for, make_app

SECRET = "s3://acme-private-bucket/adapters/a1 (endpoint http://10.0.0.7:9000)"
USER, USER_CONF = api_key("user", adapters=["a1", "mix"])
ADMIN, ADMIN_CONF = api_key("ops", adapters=["*"], admin=True)
REQUEST_ID = re.compile(r"request id (req_[0-9a-f]{24})")


def completion(model: str) -> dict[str, Any]:
    return {"model": model, "prompt": "x", "max_tokens": 2}


@pytest.mark.parametrize(
    ("failure", "status"),
    [(AdapterInvalid(f"{SECRET} changed since it was registered"), 422),
     (CacheUnavailable(f"this node's adapter cache cannot store adapters now: {SECRET}"), 503),
     (OSError(f"[Errno 13] Permission denied: '{SECRET}'"), 500)],
)  # fmt: skip
async def test_an_engine_load_error_reaches_a_tenant_as_unavailable_with_a_request_id(
    failure: Exception, status: int, caplog: pytest.LogCaptureFixture
) -> None:
    answered = install_failure(record("a1"), failure)
    assert SECRET not in answered.message

    def script(*_: Any) -> list[ReplicaItem | Exception]:
        return [answered]

    app = make_app([USER_CONF, ADMIN_CONF], FakeEngine(script=script))
    async with client_for(app) as client:
        with caplog.at_level(logging.WARNING, logger="loraplex.router"):
            tenant = await client.post("/v1/completions", json=completion("a1"), headers=bearer(USER))
        admin = await client.post("/v1/completions", json=completion("a1"), headers=bearer(ADMIN))

    assert tenant.status_code == admin.status_code == status
    error = tenant.json()["error"]
    assert SECRET not in tenant.text and "unavailable" in error["message"]
    assert error["code"] == "adapter_unavailable"
    found = REQUEST_ID.search(error["message"])
    assert found is not None
    logged = [r.getMessage() for r in caplog.records if found.group(1) in r.getMessage()]
    assert len(logged) == 1 and SECRET in logged[0]  # the log holds the reason under the id the tenant quotes
    assert SECRET in admin.json()["error"]["message"] and REQUEST_ID.search(admin.json()["error"]["message"])
    if status == 503:
        assert tenant.headers["Retry-After"] == "30"


async def test_an_unusable_adapter_reaches_a_tenant_as_unavailable_and_its_reason_only_admins() -> None:
    reason = f"does not fit base model tiny-base: {SECRET} has no q_proj"
    registry = FakeRegistry({"a1": replace(record("a1"), unusable=reason)})
    app = make_app([USER_CONF, ADMIN_CONF], registry=registry)
    async with client_for(app) as client:
        tenant = await client.post("/v1/completions", json=completion("a1"), headers=bearer(USER))
        admin = await client.post("/v1/completions", json=completion("a1"), headers=bearer(ADMIN))
        tenant_list = (await client.get("/v1/adapters", headers=bearer(USER))).json()["data"]
        admin_list = (await client.get("/v1/adapters", headers=bearer(ADMIN))).json()["data"]
        tenant_rows = (await client.get("/v1/console/adapters", headers=bearer(USER))).json()["data"]

    assert tenant.status_code == admin.status_code == 400
    assert SECRET not in tenant.text and REQUEST_ID.search(tenant.json()["error"]["message"])
    assert tenant.json()["error"]["param"] == "model"
    assert SECRET in admin.json()["error"]["message"]
    assert [a["unusable"] for a in tenant_list] == [r["unusable"] for r in tenant_rows]
    assert tenant_list[0]["unusable"] and SECRET not in tenant_list[0]["unusable"]
    assert admin_list[0]["unusable"] == reason


async def test_a_composite_shows_a_tenant_only_the_components_its_key_may_use() -> None:
    made = Composition("linear", ("a1", "team-x"), (0.7, 0.3), built_from=("hash-a1", "hash-team-x"))
    records = {name: record(name) for name in ("a1", "team-x")}
    records["mix"] = replace(record("mix"), composition=made)
    app = make_app([USER_CONF, ADMIN_CONF], registry=FakeRegistry(records))
    async with client_for(app) as client:
        tenant_card = (await client.get("/v1/adapters/mix", headers=bearer(USER))).json()
        tenant_page = (await client.get("/v1/adapters", headers=bearer(USER))).json()["data"]
        tenant_row = (await client.get("/v1/console/adapters", headers=bearer(USER))).json()["data"]
        admin_card = (await client.get("/v1/adapters/mix", headers=bearer(ADMIN))).json()
        admin_row = (await client.get("/v1/console/adapters", headers=bearer(ADMIN))).json()["data"]

    for shown in (tenant_card, next(a for a in tenant_page if a["name"] == "mix")):
        assert shown["composition"] == {"method": "linear", "adapters": ["a1"], "weights": [0.7], "density": None,
                                        "seed": 0, "built_from": ["hash-a1"]}  # fmt: skip
        assert "team-x" not in str(shown) and "0.3" not in str(shown)
    (mix_row,) = [row for row in tenant_row if row["name"] == "mix"]
    assert mix_row["composite"] == {"method": "linear", "components": [{"name": "a1", "weight": 0.7}]}
    assert admin_card["composition"]["adapters"] == ["a1", "team-x"]
    (admin_mix,) = [row for row in admin_row if row["name"] == "mix"]
    assert [c["name"] for c in admin_mix["composite"]["components"]] == ["a1", "team-x"]
