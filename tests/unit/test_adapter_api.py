"""The adapter API against a fake registry: writes, reads, vLLM's load/unload, and model visibility."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from routing.app import create_app
from routing.catalog import ModelCatalog
from serve.adapters.cache import NodeCache
from serve.adapters.loader import AdapterLoader
from serve.adapters.sources import LocalSource, SourceResolver
from serve.adapters.validation import AdapterInvalid
from serve.config import RouterConfig
from serve.wire import Changes, LoaderStats, ReplicaReport
from tests.unit.fake_engine import FakeEngine, FakeRegistry, engine_client, record

BASE = "tiny-base"


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(engine_client(), ModelCatalog(BASE, FakeRegistry()), RouterConfig())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router.localhost") as client:
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


async def test_an_adapter_that_no_longer_fits_the_base_is_listed_with_the_reason_and_never_served() -> None:
    """A record the registry marked unusable (checked again against another base model)."""
    reason = "does not fit base model tiny-base: q_proj is 64 wide"
    registry = FakeRegistry({"old": replace(record("old"), unusable=reason), "ok": record("ok")})
    engine = FakeEngine()
    app = create_app(engine_client(engine), ModelCatalog(BASE, registry), RouterConfig())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router.localhost") as client:
        assert await model_ids(client) == [BASE, f"{BASE}:ok"]
        listed = {a["name"]: a["unusable"] for a in (await client.get("/v1/adapters")).json()["data"]}
        assert listed == {"old": reason, "ok": None}
        refused = await client.post("/v1/completions", json={"model": f"{BASE}:old", "prompt": "x"})
        assert refused.status_code == 400 and reason in refused.json()["error"]["message"]
        assert refused.json()["error"]["param"] == "model"
        assert (await client.get(f"/v1/models/{BASE}:old")).status_code == 400
        assert (await client.post("/v1/completions", json={"model": "ok", "prompt": "x"})).status_code == 200
    assert [a.name for a in engine.adapters if a is not None] == ["ok"]


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


async def test_adapter_card_shows_where_it_is_installed_and_resident() -> None:
    registry = FakeRegistry()
    app = create_app(engine_client(), ModelCatalog(BASE, registry), RouterConfig())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router.localhost") as client:
        await client.post("/v1/adapters", json={"name": "hot", "source": "/a/hot"})
        registry.reports = [
            ReplicaReport(replica="r1", adapters=("hot",), engine_loras=1, stats=LoaderStats(), resident=("hot",)),
            ReplicaReport(replica="r2", adapters=("hot",), engine_loras=0, stats=LoaderStats()),
            ReplicaReport(replica="r3", adapters=(), engine_loras=0, stats=LoaderStats()),
        ]
        placement = (await client.get("/v1/adapters/hot")).json()["replicas"]
    assert placement == [{"replica": "r1", "resident": True}, {"replica": "r2", "resident": False}]


class _Models:
    """Stands in for vLLM's OpenAIServingModels: the LoRA requests the loader installed."""

    def __init__(self) -> None:
        self.lora_requests: dict[str, SimpleNamespace] = {}


def test_loader_counts_adapters_the_engine_evicted() -> None:
    models = _Models()
    cache = NodeCache(Path("/nonexistent"), SourceResolver(LocalSource(())), max_bytes=None)
    loader = AdapterLoader(None, models, cache, BASE)
    for lora_id, name in enumerate(("a", "b", "c"), start=1):
        models.lora_requests[loader.public_id(name)] = SimpleNamespace(lora_int_id=lora_id)
        loader._versions[name] = f"hash-{name}"
    assert loader.observe_engine({1, 2, 3}) == ["a", "b", "c"]
    assert loader.observe_engine({1, 3, 99}) == ["a", "c"] and loader.stats.evictions == 1
    assert loader.observe_engine({1, 2, 3}) == ["a", "b", "c"] and loader.stats.evictions == 1  # reloaded
    del loader._versions["c"]  # unregistered: leaving the engine is not an eviction
    assert loader.observe_engine({1, 2}) == ["a", "b"] and loader.stats.evictions == 1


async def test_the_loader_never_installs_an_unusable_record() -> None:
    """The replica's own check, should an unusable record ever reach it (a router on an older snapshot)."""
    cache = NodeCache(Path("/nonexistent"), SourceResolver(LocalSource(())), max_bytes=None)
    loader = AdapterLoader(None, _Models(), cache, BASE)
    with pytest.raises(AdapterInvalid, match="cannot be served: it does not fit"):
        await loader.ensure(replace(record("old"), unusable="does not fit base model b"))
    assert loader.stats.misses == 0


def test_concurrent_fetches_of_the_same_content_share_one_cached_copy(tmp_path: Path) -> None:
    """Two replicas on a node (or two adapters with equal files) may fetch the same hash at once."""
    from dataclasses import replace

    from serve.adapters.cache import NodeCache
    from serve.adapters.safetensors_files import content_hash

    source = tmp_path / "adapter"
    source.mkdir()
    (source / "adapter_config.json").write_text("{}")
    adapter = replace(record("a"), source=str(source), content_hash=content_hash(source))
    cache = tmp_path / "cache"

    class RacingResolver:
        """Fetches, while the other replica publishes the same content hash first."""

        def fetch(self, uri: str, dest: Path, max_bytes: int | None = None) -> None:
            (dest / "adapter_config.json").write_text("{}")
            (cache / adapter.content_hash).mkdir()
            (cache / adapter.content_hash / "adapter_config.json").write_text("{}")

    node = NodeCache(cache, RacingResolver(), max_bytes=None)  # type: ignore[arg-type]
    folder, hold = node.acquire(adapter)
    hold.release()
    assert folder == cache / adapter.content_hash
    assert [p.name for p in cache.iterdir()] == [adapter.content_hash]  # the staging folder is gone


async def test_the_adapter_list_pages_in_name_order_as_openai_lists_do() -> None:
    registry = FakeRegistry({name: record(name) for name in ("c", "a", "e", "b", "d")})
    app = create_app(engine_client(), ModelCatalog(BASE, registry), RouterConfig())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router.localhost") as client:
        whole = (await client.get("/v1/adapters")).json()
        assert [a["name"] for a in whole["data"]] == ["a", "b", "c", "d", "e"] and whole["has_more"] is False
        pages, params = [], {"limit": "2"}
        while True:
            page = (await client.get("/v1/adapters", params=params)).json()
            pages.append([a["name"] for a in page["data"]])
            assert (page["first_id"], page["last_id"]) == (page["data"][0]["id"], page["data"][-1]["id"])
            if not page["has_more"]:
                break
            params = {"limit": "2", "after": page["last_id"]}  # an id, BASE:NAME
        assert pages == [["a", "b"], ["c", "d"], ["e"]]
        bare = (await client.get("/v1/adapters", params={"after": "c"})).json()  # a bare name works too
        assert [a["name"] for a in bare["data"]] == ["d", "e"]
        empty = (await client.get("/v1/adapters", params={"after": "e"})).json()
        assert empty["data"] == [] and empty["has_more"] is False and empty["last_id"] is None
        for bad in ("0", "10001", "x"):
            refused = await client.get("/v1/adapters", params={"limit": bad})
            assert refused.status_code == 400, bad
            assert refused.json()["error"]["param"] == "limit"


def test_the_cli_lists_every_page(monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    import serve.cli.main
    import serve.cli.manage

    registry = FakeRegistry({f"a{i:02d}": record(f"a{i:02d}") for i in range(25)})
    app = create_app(engine_client(), ModelCatalog(BASE, registry), RouterConfig())
    asked: list[dict[str, str]] = []

    def call(method: str, url: str, api_key: str | None, params: dict[str, str]) -> object:
        import asyncio

        asked.append(params)

        async def get() -> object:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://router.localhost") as client:
                return (await client.get("/v1/adapters", params={**params, "limit": "10"})).json()

        return asyncio.run(get())

    monkeypatch.setattr(serve.cli.manage, "_call", call)
    result = CliRunner().invoke(serve.cli.main.app, ["adapters", "list"])
    assert result.exit_code == 0, result.output
    assert [line.split("\t")[0] for line in result.output.splitlines()] == [f"{BASE}:a{i:02d}" for i in range(25)]
    assert asked == [{}, {"after": f"{BASE}:a09"}, {"after": f"{BASE}:a19"}]


def test_the_cli_shows_an_adapters_options_and_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    import serve.cli.main
    import serve.cli.manage

    options = ("rank_pattern: per-module rank", "embed_tokens: LoRA")
    shown = replace(record("sql"), options=options, warnings=("every lora_B weight is zero",), alpha=8.0)
    app = create_app(engine_client(), ModelCatalog(BASE, FakeRegistry({"sql": shown})), RouterConfig())

    def call(method: str, url: str, api_key: str | None) -> object:
        import asyncio

        async def get() -> object:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://router.localhost") as client:
                return (await client.request(method, url.removeprefix("http://127.0.0.1:8000"))).json()

        return asyncio.run(get())

    monkeypatch.setattr(serve.cli.manage, "_call", call)
    result = CliRunner().invoke(serve.cli.main.app, ["adapters", "show", "sql"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        f"{BASE}:sql\tv1\tr=8\talpha=8\t/adapters/x",
        "  targets: q_proj",
        "  option: rank_pattern: per-module rank",
        "  option: embed_tokens: LoRA",
        "  warning: every lora_B weight is zero",
    ]


class CountingRegistry(FakeRegistry):
    """Counts the router's `changes` round trips."""

    asked: int = 0

    async def changes(self, since: int) -> Changes:
        self.asked += 1
        return await super().changes(since)


async def test_a_router_takes_in_its_own_write_without_a_round_trip_and_syncs_at_the_next_read() -> None:
    registry = CountingRegistry({"old": record("old")})
    catalog = ModelCatalog(BASE, registry)
    app = create_app(engine_client(), catalog, RouterConfig())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router.localhost") as client:
        assert await model_ids(client) == [BASE, f"{BASE}:old"]
        asked = registry.asked
        assert (await client.post("/v1/adapters", json={"name": "new", "source": "/a/new"})).status_code == 201
        assert registry.asked == asked  # answered from the registry's reply, not a second call
        registry.records["other"] = record("other")  # written meanwhile through another router
        assert await model_ids(client) == [BASE, f"{BASE}:new", f"{BASE}:old", f"{BASE}:other"]
        assert registry.asked == asked + 1
        assert (await client.delete("/v1/adapters/new")).status_code == 200
        assert registry.asked == asked + 1
        assert await model_ids(client) == [BASE, f"{BASE}:old", f"{BASE}:other"]
