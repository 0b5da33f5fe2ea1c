"""Rolling out a new version of an adapter (issue 17, item 3): the split lives in the real registry (SQLite) and
survives a restart, requests choose by it (sticky per `user`), /metrics compares the versions, every change is
audited, and engine replicas let go of a version once its rollout ends. Real stack: tests/integration/test_rollout.py.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from routing.app import create_app
from routing.catalog import ModelCatalog
from routing.rollout_choice import choose_version, user_point
from serve.adapters.registry import AdapterRegistry
from serve.adapters.sources import LocalSource, SourceResolver
from serve.adapters.store import SqliteStore
from serve.config import AuthConfig, RouterConfig
from serve.demo.assets import DEFAULT_MODEL_NAME, build_default_model
from serve.replica import Replica
from serve.wire import AdapterRecord, Changes, WireError
from tests.unit.fake_engine import FakeEngine, engine_client
from tests.unit.tenancy import api_key, bearer
from tests.unit.test_adapter_validation import ASSETS, write_adapter


def sources(tmp_path: Path) -> dict[str, str]:
    """Three versions' worth of distinct adapter files."""
    import torch

    folders = {}
    for version in (1, 2, 3):
        tensors = {
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.full((4, 576), float(version)),
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.full((576, 4), 0.01 * version),
        }
        folders[f"v{version}"] = str(write_adapter(tmp_path / "adapters" / f"v{version}", tensors=tensors))
    return folders


def make_registry(tmp_path: Path) -> AdapterRegistry:
    model = build_default_model(ASSETS / "models" / DEFAULT_MODEL_NAME)
    resolver = SourceResolver(local=LocalSource((tmp_path / "adapters",)))
    return AdapterRegistry(SqliteStore(tmp_path / "registry.db"), model, resolver, max_rank=64, max_bytes=10**9)


async def test_a_rollout_is_started_changed_promoted_or_rolled_back_and_survives_a_restart(tmp_path: Path) -> None:
    files = sources(tmp_path)
    registry = make_registry(tmp_path)
    assert isinstance(await registry.register("support", files["v1"]), AdapterRecord)
    started = await registry.rollout("support", files["v2"], 10)
    assert isinstance(started, AdapterRecord) and started.canary is not None
    assert (started.version, started.canary.version, started.canary_percent) == (1, 2, 10)
    # Nothing else changes the name meanwhile.
    for refused in (await registry.register("support", files["v3"]), await registry.rollout("support", files["v3"], 5)):
        assert isinstance(refused, WireError) and refused.status == 409 and "being rolled out" in refused.message
    same = await registry.rollout("other", files["v1"], 5)
    assert isinstance(same, WireError) and same.status == 404
    changed = await registry.split("support", 50)
    assert isinstance(changed, AdapterRecord) and changed.canary_percent == 50
    # The split is in the store: a restarted registry has it.
    restarted = make_registry(tmp_path)
    assert (await restarted.snapshot()).records["support"] == changed
    rolled_back = await restarted.rollback("support")
    assert isinstance(rolled_back, AdapterRecord) and rolled_back.canary is None and rolled_back.version == 1
    assert isinstance(await restarted.split("support", 20), WireError), "no rollout in progress"
    await restarted.rollout("support", files["v3"], 10)
    promoted = await restarted.promote("support")
    assert isinstance(promoted, AdapterRecord) and promoted.canary is None and promoted.version == 2
    assert promoted.content_hash != rolled_back.content_hash


def test_a_user_keeps_their_version_and_the_shares_hold() -> None:
    stable = AdapterRecord(name="support", source="/a", version=3, content_hash="h3", rank=8, alpha=16,
                           target_modules=("q_proj",), size_bytes=1, pinned=False, created=0)  # fmt: skip
    record = replace(stable, canary=replace(stable, version=4, content_hash="h4"), canary_percent=10)
    users = [f"user-{i}" for i in range(20_000)]
    chosen = Counter(choose_version(record, user).name for user in users)
    assert chosen.keys() == {"support", "support@v4"}
    assert abs(chosen["support@v4"] / len(users) - 0.10) < 0.01
    assert all(choose_version(record, user).name == choose_version(record, user).name for user in users[:200])
    # Raising the share only moves users onto the new version.
    wider = replace(record, canary_percent=30)
    assert all(choose_version(wider, u).version == 4 for u in users if choose_version(record, u).version == 4)
    assert choose_version(record, None, draw=lambda: 0.05).version == 4
    assert choose_version(record, None, draw=lambda: 0.5).version == 3
    assert 0 <= user_point("support", 4, "x") < 100


def test_engine_replicas_let_go_of_a_version_once_its_rollout_ends() -> None:
    base = AdapterRecord(name="support", source="/a", version=3, content_hash="h3", rank=8, alpha=16,
                         target_modules=("q_proj",), size_bytes=1, pinned=False, created=0)  # fmt: skip
    rolling = replace(base, canary=replace(base, version=4), canary_percent=10)
    held = {"support", "support@v4", "other"}
    assert Replica._gone(Changes(2, {"support": rolling}), held) == set()
    assert Replica._gone(Changes(3, {"support": base}), held) == {"support@v4"}  # rolled back
    assert Replica._gone(Changes(3, {"support": replace(base, version=4)}), held) == {"support@v4"}  # promoted
    assert Replica._gone(Changes(4, {"support": None}), held) == {"support", "support@v4"}
    assert Replica._gone(Changes(5, {"other": base}, full=True), held) == {"support", "support@v4"}


@pytest.fixture
async def router(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, FakeEngine, dict[str, str], Path]]:
    files = sources(tmp_path)
    registry = make_registry(tmp_path)
    await registry.register("support", files["v1"])
    engine = FakeEngine()
    key, admin = api_key("ops", admin=True, metrics=True, adapters=["*"], base=True)
    audit = tmp_path / "audit.jsonl"
    app = create_app(engine_client(engine), ModelCatalog("tiny-base", registry),
                     RouterConfig(auth=AuthConfig(keys=[admin], audit_file=str(audit))))  # fmt: skip
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://router.localhost", headers=bearer(key)
    ) as client:
        yield client, engine, files, audit


async def test_a_rollout_through_the_api_splits_requests_labels_metrics_and_audits_every_change(
    router: tuple[httpx.AsyncClient, FakeEngine, dict[str, str], Path],
) -> None:
    client, engine, files, audit = router
    started = await client.post("/v1/adapters/support/rollout", json={"source": files["v2"], "percent": 25})
    assert started.status_code == 201, started.text
    assert started.json()["canary"]["version"] == 2 and started.json()["canary_percent"] == 25
    users = [f"u{i}" for i in range(200)]
    for user in users:
        answer = await client.post("/v1/completions", json={"model": "support", "prompt": "x", "user": user})
        assert answer.status_code == 200
    served = Counter(record.name for record in engine.adapters if record is not None)
    assert served.keys() == {"support", "support@v2"} and 25 <= served["support@v2"] <= 75
    expected = {user: "support@v2" if user_point("support", 2, user) < 25 else "support" for user in users}
    assert [record.name for record in engine.adapters if record is not None] == [expected[u] for u in users]
    metrics = (await client.get("/metrics")).text
    for version, count in (("1", served["support"]), ("2", served["support@v2"])):
        line = f'loraplex_rollout_requests_total{{model="tiny-base:support",status="200",version="{version}"}}'
        assert f"{line} {float(count)}" in metrics
    assert (await client.patch("/v1/adapters/support/rollout", json={"percent": 101})).status_code == 400
    assert (await client.patch("/v1/adapters/support/rollout", json={"percent": 60})).json()["canary_percent"] == 60
    assert (await client.post("/v1/adapters/support/promote")).json()["version"] == 2
    refused = await client.post("/v1/adapters/support/rollback")
    assert refused.status_code == 409 and "no rollout" in refused.json()["error"]["message"]
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [(line["action"], line.get("split"), line["outcome"]) for line in lines] == [
        ("rollout", "v1 75% / v2 25%", "ok"),
        ("split", "v1 40% / v2 60%", "ok"),
        ("promote", "v2 100%", "ok"),
        ("rollback", None, "refused"),
    ]
