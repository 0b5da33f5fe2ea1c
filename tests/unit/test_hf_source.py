"""`hf://ORG/REPO[@REVISION][/SUBFOLDER]` adapter sources, registered into a real registry.

No hub is reachable from where these tests run, so they use `tests.hub_standin`, a stand-in for the Hugging Face Hub
on loopback that answers the routes huggingface_hub calls, the way huggingface.co answers them. Nothing here
contacts huggingface.co: every source names the stand-in's endpoint (or a closed loopback port).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from serve.adapters.cache import NodeCache
from serve.adapters.hf_source import HfSource, HfUri
from serve.adapters.registry import AdapterRegistry
from serve.adapters.resolver import make_resolver
from serve.adapters.sources import UNREACHABLE, LocalSource, SourceResolver
from serve.adapters.store import SqliteStore
from serve.config import AppConfig
from serve.demo.assets import DEFAULT_MODEL_NAME, build_default_model
from serve.wire import AdapterRecord, WireError
from tests.conftest import free_port
from tests.hub_standin import TOKEN, StandInHub
from tests.unit.test_adapter_validation import ASSETS, LAYER, write_adapter

TRAINED = {f"{LAYER}.q_proj.lora_A.weight": torch.ones(4, 576), f"{LAYER}.q_proj.lora_B.weight": torch.ones(576, 4)}
"""Weights unlike `write_adapter`'s default: a push of these is a change of weights."""
WEIGHTS_BYTES = 576 * 4 * 2 * 4  # two float32 tensors of 576 by 4


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return build_default_model(ASSETS / "models" / DEFAULT_MODEL_NAME)


@pytest.fixture(autouse=True)
def no_ambient_token(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Only what a test gives counts: no `HF_TOKEN` from the environment, no saved login."""
    from huggingface_hub import constants

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-saved-token"))


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[StandInHub]:
    with StandInHub(tmp_path / "hub") as standin:
        yield standin


def open_registry(tmp_path: Path, model_dir: Path, hf: HfSource, max_bytes: int = 10**9) -> AdapterRegistry:
    resolver = SourceResolver(local=LocalSource(()), hf=hf)
    return AdapterRegistry(SqliteStore(tmp_path / "registry.db"), model_dir, resolver, max_rank=64, max_bytes=max_bytes)


def register(registry: AdapterRegistry, name: str, source: str) -> AdapterRecord | WireError:
    return asyncio.run(registry.register(name, source))


def test_registering_pins_the_revision_to_its_commit(tmp_path: Path, model_dir: Path, hub: StandInHub) -> None:
    sha = hub.push("acme/sql", write_adapter(tmp_path / "v1"))
    registry = open_registry(tmp_path, model_dir, HfSource(endpoint=hub.url))
    record = register(registry, "sql", "hf://acme/sql")
    assert isinstance(record, AdapterRecord), record
    assert (record.source, record.version) == (f"hf://acme/sql@{sha}", 1)
    again = register(registry, "sql", "hf://acme/sql@main")  # the same commit, named by its branch
    assert again == record


def test_a_restart_against_another_base_rechecks_the_pinned_commit(
    tmp_path: Path, model_dir: Path, hub: StandInHub, caplog: pytest.LogCaptureFixture
) -> None:
    hub.push("acme/sql", write_adapter(tmp_path / "v1"))
    resolver = SourceResolver(local=LocalSource((tmp_path,)), hf=HfSource(endpoint=hub.url))
    store = tmp_path / "registry.db"
    first = AdapterRegistry(SqliteStore(store), model_dir, resolver, max_rank=64, max_bytes=10**9, base_id="one")
    record = register(first, "sql", "hf://acme/sql")
    local = register(first, "here", str(write_adapter(tmp_path / "local")))
    assert isinstance(local, AdapterRecord) and local.source == str(tmp_path / "local")  # other sources: as given
    hub.push("acme/sql", write_adapter(tmp_path / "v2", tensors=TRAINED))
    second = AdapterRegistry(SqliteStore(store), model_dir, resolver, max_rank=64, max_bytes=10**9, base_id="two")
    assert "checking all 2 against two" in caplog.text
    assert asyncio.run(second.snapshot()).records["sql"] == record  # still usable: the commit, not the branch head


def test_a_push_is_a_new_version_only_when_registered_again(tmp_path: Path, model_dir: Path, hub: StandInHub) -> None:
    first = hub.push("acme/sql", write_adapter(tmp_path / "v1"))
    hf = HfSource(endpoint=hub.url)
    registry = open_registry(tmp_path, model_dir, hf)
    v1 = register(registry, "sql", "hf://acme/sql@main")
    assert isinstance(v1, AdapterRecord)
    second = hub.push("acme/sql", write_adapter(tmp_path / "v2", tensors=TRAINED))
    assert asyncio.run(registry.snapshot()).records["sql"] == v1  # the push alone changes nothing
    # A node still fetches exactly what was registered (the hash check would refuse the pushed weights).
    cache = NodeCache(tmp_path / "node", SourceResolver(local=LocalSource(()), hf=hf), max_bytes=None)
    folder, hold = cache.acquire(v1)
    hold.release()
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == sorted(
        ["adapter_config.json", "adapter_model.safetensors"]
    )
    v2 = register(registry, "sql", "hf://acme/sql@main")
    assert isinstance(v2, AdapterRecord)
    assert (v2.version, v2.source, v1.source) == (2, f"hf://acme/sql@{second}", f"hf://acme/sql@{first}")
    assert v2.content_hash != v1.content_hash


def test_a_subfolder_is_an_adapter_and_only_its_files_are_fetched(
    tmp_path: Path, model_dir: Path, hub: StandInHub
) -> None:
    repo = tmp_path / "repo"
    write_adapter(repo / "adapters" / "sql")
    write_adapter(repo / "adapters" / "chat", tensors=TRAINED)
    (repo / "README.md").write_text("# adapters\n")
    (repo / "adapters" / "sql" / "tokenizer.json").write_text("{}")
    (repo / "adapters" / "sql" / "optimizer.pt").write_bytes(b"\0" * 1024)  # pickled: never downloaded
    sha = hub.push("acme/many", repo)
    registry = open_registry(tmp_path, model_dir, HfSource(endpoint=hub.url))
    record = register(registry, "sql", "hf://acme/many@main/adapters/sql")
    assert isinstance(record, AdapterRecord), record
    assert record.source == f"hf://acme/many@{sha}/adapters/sql"
    assert sorted(hub.downloads()) == [
        f"/acme/many/resolve/{sha}/adapters/sql/adapter_config.json",
        f"/acme/many/resolve/{sha}/adapters/sql/adapter_model.safetensors",
    ]
    other = register(registry, "chat", "hf://acme/many/adapters/chat")  # no revision: the default branch
    assert isinstance(other, AdapterRecord) and other.source == f"hf://acme/many@{sha}/adapters/chat"


def test_a_revision_with_a_slash_is_written_percent_encoded(tmp_path: Path, model_dir: Path, hub: StandInHub) -> None:
    hub.push("acme/sql", write_adapter(tmp_path / "v1"))
    sha = hub.push("acme/sql", write_adapter(tmp_path / "pr", tensors=TRAINED), branch="refs/pr/1")
    assert str(HfUri.parse("hf://acme/sql@refs%2Fpr%2F1/x")) == "hf://acme/sql@refs%2Fpr%2F1/x"
    record = register(
        open_registry(tmp_path, model_dir, HfSource(endpoint=hub.url)), "pr", "hf://acme/sql@refs%2Fpr%2F1"
    )
    assert isinstance(record, AdapterRecord) and record.source == f"hf://acme/sql@{sha}"


def test_a_private_repo_needs_a_token(
    tmp_path: Path, model_dir: Path, hub: StandInHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    sha = hub.push("acme/secret", write_adapter(tmp_path / "v1"), private=True)
    refused = register(open_registry(tmp_path / "a", model_dir, HfSource(endpoint=hub.url)), "s", "hf://acme/secret")
    assert isinstance(refused, WireError)
    assert (refused.status, refused.param, refused.code) == (400, "source", UNREACHABLE)
    assert "hf://acme/secret" in refused.message and "private" in refused.message and "HF_TOKEN" in refused.message
    wrong = HfSource(endpoint=hub.url, token="hf_wrong")
    assert isinstance(register(open_registry(tmp_path / "b", model_dir, wrong), "s", "hf://acme/secret"), WireError)

    configured = HfSource(endpoint=hub.url, token=TOKEN)  # registry.hf_token
    assert TOKEN not in repr(configured)
    record = register(open_registry(tmp_path / "c", model_dir, configured), "s", "hf://acme/secret")
    assert isinstance(record, AdapterRecord) and record.source == f"hf://acme/secret@{sha}"

    monkeypatch.setenv("HF_TOKEN", TOKEN)  # as huggingface_hub reads it
    from_env = register(open_registry(tmp_path / "d", model_dir, HfSource(endpoint=hub.url)), "s", "hf://acme/secret")
    assert isinstance(from_env, AdapterRecord) and from_env.source == f"hf://acme/secret@{sha}"


def test_too_large_is_refused_from_the_listing_before_any_download(
    tmp_path: Path, model_dir: Path, hub: StandInHub
) -> None:
    hub.push("acme/big", write_adapter(tmp_path / "v1"))
    registry = open_registry(tmp_path, model_dir, HfSource(endpoint=hub.url), max_bytes=WEIGHTS_BYTES // 2)
    refused = register(registry, "big", "hf://acme/big")
    assert isinstance(refused, WireError) and (refused.status, refused.param) == (400, "source")
    assert "hf://acme/big@" in refused.message and f"the limit is {WEIGHTS_BYTES // 2}" in refused.message
    assert not [path for _, path in hub.requests if "/resolve/" in path]  # not even a HEAD of the weights


BAD_SOURCES = [
    # (source, code, what the message says besides naming the source)
    ("hf://acme/nothing", UNREACHABLE, "no such repo"),
    ("hf://acme/sql@v9", UNREACHABLE, "no such revision"),
    (f"hf://acme/sql@{'0' * 40}", UNREACHABLE, "no such revision"),
    ("hf://acme/sql@main/elsewhere", UNREACHABLE, "no adapter at"),
    ("hf://acme", None, "not a Hugging Face source"),
    ("hf://acme/sql/../etc", None, "not a Hugging Face source"),
]


@pytest.mark.parametrize(("source", "code", "says"), BAD_SOURCES)
def test_bad_sources_are_400s_naming_the_source(
    tmp_path: Path, model_dir: Path, hub: StandInHub, source: str, code: str | None, says: str
) -> None:
    hub.push("acme/sql", write_adapter(tmp_path / "v1"))
    refused = register(open_registry(tmp_path, model_dir, HfSource(endpoint=hub.url)), "sql", source)
    assert isinstance(refused, WireError), refused
    assert (refused.status, refused.param, refused.code) == (400, "source", code)
    assert source.split("@")[0].split("/elsewhere")[0] in refused.message and says in refused.message


def test_an_unreachable_hub_is_source_unreachable(tmp_path: Path, model_dir: Path) -> None:
    closed = HfSource(endpoint=f"http://127.0.0.1:{free_port()}")
    refused = register(open_registry(tmp_path, model_dir, closed), "sql", "hf://acme/sql")
    assert isinstance(refused, WireError)
    assert (refused.status, refused.param, refused.code) == (400, "source", UNREACHABLE)
    assert "hf://acme/sql" in refused.message


def test_a_rollout_records_the_pinned_commit(tmp_path: Path, model_dir: Path, hub: StandInHub) -> None:
    hub.push("acme/sql", write_adapter(tmp_path / "v1"))
    registry = open_registry(tmp_path, model_dir, HfSource(endpoint=hub.url))
    assert isinstance(register(registry, "sql", "hf://acme/sql"), AdapterRecord)
    sha = hub.push("acme/sql", write_adapter(tmp_path / "v2", tensors=TRAINED))
    rolling = asyncio.run(registry.rollout("sql", "hf://acme/sql@main", 10.0))
    assert isinstance(rolling, AdapterRecord) and rolling.canary is not None
    assert (rolling.canary.source, rolling.canary.version) == (f"hf://acme/sql@{sha}", 2)


def test_the_config_gives_the_hub_endpoint_and_token() -> None:
    config = AppConfig.model_validate(
        {"engine": {"model": "/m"}, "registry": {"hf_endpoint": "http://hub.internal", "hf_token": "hf_secret"}}
    )
    hf = make_resolver(config).hf
    assert (hf.endpoint, hf.token) == ("http://hub.internal", "hf_secret")
    assert "hf_secret" not in repr(config) and "hf_secret" not in repr(hf)
    default = make_resolver(AppConfig.model_validate({"engine": {"model": "/m"}})).hf
    assert (default.endpoint, default.token) == (None, None)
