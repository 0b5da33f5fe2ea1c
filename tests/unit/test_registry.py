"""The adapter registry on each of its stores: SQLite in a file, and S3 on moto's real S3 server on loopback.

Every test runs once per store (the same suite for both); the store is reopened the way a restarted registry
replica opens it (a new store object on the same file or bucket prefix, on this or any other node).
"""

from __future__ import annotations

import asyncio
import json
import pickle
import re
import socket
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

import boto3
import pytest
import torch
from safetensors.torch import save_file

from serve.adapters import registry as registry_module
from serve.adapters import store as store_module
from serve.adapters.registry import AdapterRegistry
from serve.adapters.safetensors_files import NO_OP_WARNING
from serve.adapters.sources import LocalSource, S3Source, SourceResolver
from serve.adapters.store import BaseIdentity, RegistryStore, S3Store, SqliteStore, StoreUnavailable, open_store
from serve.adapters.validation import LORA_BIAS_OPTION
from serve.config import RegistryConfig
from serve.demo.assets import DEFAULT_MODEL_NAME, build_default_model
from serve.wire import AdapterRecord, Changes, WireError
from tests.conftest import S3_KEYS
from tests.unit.test_adapter_validation import ASSETS, LAYER, header_of, write_adapter

Opener = Callable[..., AdapterRegistry]


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return build_default_model(ASSETS / "models" / DEFAULT_MODEL_NAME)


@pytest.fixture(params=["sqlite", "s3"])
def store_at(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], RegistryStore]:
    """Opens this test's store afresh at each call (a restarted registry): a SQLite file, or an S3 bucket prefix."""
    if request.param == "sqlite":
        return lambda: SqliteStore(tmp_path / "registry.db")
    url = request.getfixturevalue("s3_url")
    connection = S3Source(
        endpoint_url=url, access_key_id=S3_KEYS["AWS_ACCESS_KEY_ID"], secret_access_key=S3_KEYS["AWS_SECRET_ACCESS_KEY"]
    )
    bucket = f"registry-{abs(hash(str(tmp_path))) % 10**12}"
    connection.client().create_bucket(Bucket=bucket)
    return lambda: S3Store(bucket=bucket, prefix="cluster/registry", connection=connection)


@pytest.fixture
def open_registry(tmp_path: Path, model_dir: Path, store_at: Callable[[], RegistryStore]) -> Opener:
    def opener(base: Path = model_dir, **options: object) -> AdapterRegistry:
        resolver = SourceResolver(local=LocalSource((tmp_path / "adapters",)))
        return AdapterRegistry(store_at(), base, resolver, max_rank=64, max_bytes=10**9, **options)  # type: ignore[arg-type]

    return opener


def test_registry_versions_persist_and_unregister(tmp_path: Path, open_registry: Opener) -> None:
    registry = open_registry()
    source = str(write_adapter(tmp_path / "adapters" / "v1"))
    first = asyncio.run(registry.register("sql", source))
    assert isinstance(first, AdapterRecord) and first.version == 1
    again = asyncio.run(registry.register("sql", source))
    assert isinstance(again, AdapterRecord) and again.version == 1  # same weights: same version
    changed = tmp_path / "adapters" / "v2"
    write_adapter(changed, tensors={f"{LAYER}.q_proj.lora_A.weight": torch.ones(4, 576),
                                    f"{LAYER}.q_proj.lora_B.weight": torch.ones(576, 4)})  # fmt: skip
    second = asyncio.run(registry.register("sql", str(changed)))
    assert isinstance(second, AdapterRecord) and second.version == 2

    reopened = open_registry()
    assert asyncio.run(reopened.snapshot()).records["sql"] == second
    assert isinstance(asyncio.run(reopened.unregister("sql")), AdapterRecord)
    missing = asyncio.run(reopened.unregister("sql"))
    assert isinstance(missing, WireError) and missing.status == 404
    assert asyncio.run(open_registry().snapshot()).records == {}


def test_a_restarted_registry_never_reuses_a_generation(tmp_path: Path, open_registry: Opener) -> None:
    """A router that cached generation G before a restart must see the restarted registry's as new."""
    registry = open_registry()
    seen = {asyncio.run(registry.generation())}
    for i in range(3):
        asyncio.run(registry.register(f"a{i}", str(write_adapter(tmp_path / "adapters" / f"a{i}"))))
        seen.add(asyncio.run(registry.generation()))
    restarted = open_registry()
    asyncio.run(restarted.unregister("a0"))
    for i in range(3):  # as many writes as before the restart: the counter alone would repeat
        asyncio.run(restarted.register(f"b{i}", str(write_adapter(tmp_path / "adapters" / "a1"))))
    assert asyncio.run(restarted.generation()) not in seen
    assert asyncio.run(restarted.snapshot()).generation > max(seen)  # and it keeps growing


def test_two_registries_on_one_store_never_overwrite_each_other(tmp_path: Path, open_registry: Opener) -> None:
    """A split brain (a replaced registry replica still running): the second writer gets a 409, not a silent
    overwrite; it re-reads the record, and its retry is a new version on top of the other's."""
    first, second = open_registry(), open_registry()
    one = write_adapter(tmp_path / "adapters" / "one")
    two = write_adapter(tmp_path / "adapters" / "two", rank=8)
    won = asyncio.run(first.register("shared", str(one)))
    assert isinstance(won, AdapterRecord) and won.version == 1
    lost = asyncio.run(second.register("shared", str(two)))
    assert isinstance(lost, WireError) and lost.status == 409 and "another registry" in lost.message
    assert asyncio.run(second.snapshot()).records["shared"] == won  # it re-read what the other wrote
    retried = asyncio.run(second.register("shared", str(two)))
    assert isinstance(retried, AdapterRecord) and retried.version == 2 and retried.rank == 8
    stale = asyncio.run(first.unregister("shared"))  # `first` still holds version 1
    assert isinstance(stale, WireError) and stale.status == 409
    assert asyncio.run(open_registry().snapshot()).records["shared"] == retried


def test_a_registry_takes_the_writes_another_made_to_their_store_when_it_re_reads_it(
    tmp_path: Path, open_registry: Opener
) -> None:
    """A split brain where the two registries write different names: each one's writes reach the other's routers and
    replicas at its next re-read of the store (`resync`, every `RESYNC_S`), as changes since their generation."""
    first, second = open_registry(), open_registry()
    kept = asyncio.run(first.register("kept", str(write_adapter(tmp_path / "adapters" / "kept"))))
    assert isinstance(kept, AdapterRecord)
    assert asyncio.run(second.resync()) == 1  # `second` read the store before `kept` was written
    since = asyncio.run(second.snapshot()).generation
    made = asyncio.run(first.register("new", str(write_adapter(tmp_path / "adapters" / "new", rank=8))))
    gone = asyncio.run(first.unregister("kept"))
    assert isinstance(made, AdapterRecord) and isinstance(gone, AdapterRecord)
    assert set(asyncio.run(second.snapshot()).records) == {"kept"}  # not seen yet
    assert asyncio.run(second.resync()) == 2
    assert asyncio.run(second.snapshot()).records == {"new": made}
    assert asyncio.run(second.changes(since)).records == {"kept": None, "new": made}
    assert asyncio.run(second.resync()) == 0  # nothing more to take


def test_a_file_linked_from_outside_the_allowed_roots_is_refused(tmp_path: Path, open_registry: Opener) -> None:
    registry = open_registry()
    outside = write_adapter(tmp_path / "elsewhere" / "secret")  # not under tmp_path / "adapters"
    inside = write_adapter(tmp_path / "adapters" / "linked")
    (inside / "adapter_model.safetensors").unlink()
    (inside / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")
    refused = asyncio.run(registry.register("linked", str(inside)))
    assert isinstance(refused, WireError) and refused.status == 400
    assert "links outside the allowed adapter roots" in refused.message
    within = write_adapter(tmp_path / "adapters" / "within")  # a link that stays inside is fine
    (within / "adapter_model.safetensors").rename(tmp_path / "adapters" / "shared.safetensors")
    (within / "adapter_model.safetensors").symlink_to(tmp_path / "adapters" / "shared.safetensors")
    assert isinstance(asyncio.run(registry.register("within", str(within))), AdapterRecord)


def test_a_slow_download_holds_up_no_other_registry_call(tmp_path: Path, open_registry: Opener) -> None:
    """The fetch runs outside the registry's lock: an unregister and a snapshot finish while it downloads."""
    registry = open_registry()
    asyncio.run(registry.register("other", str(write_adapter(tmp_path / "adapters" / "other"))))
    release = threading.Event()
    fetching = threading.Event()
    local = registry._resolver

    class SlowS3:
        def fetch(self, uri: str, dest: Path, max_bytes: int | None = None) -> None:
            fetching.set()
            release.wait(30)  # a multi-gigabyte object on a slow link
            local.fetch(str(tmp_path / "adapters" / "other"), dest)

    registry._resolver = SourceResolver(local=local.local, s3=SlowS3())  # type: ignore[arg-type]

    async def scenario() -> None:
        slow = asyncio.create_task(registry.register("big", "s3://bucket/big"))
        await asyncio.to_thread(fetching.wait, 10)
        gone = await asyncio.wait_for(registry.unregister("other"), 2)
        assert isinstance(gone, AdapterRecord)
        assert "other" not in (await asyncio.wait_for(registry.snapshot(), 2)).records
        release.set()
        assert isinstance(await slow, AdapterRecord)

    asyncio.run(scenario())


def test_a_malformed_adapter_registers_as_400_not_500(tmp_path: Path, open_registry: Opener) -> None:
    registry = open_registry()
    alpha = write_adapter(tmp_path / "adapters" / "alpha", lora_alpha="x")
    header = write_adapter(tmp_path / "adapters" / "header")
    header_of(header / "adapter_model.safetensors", b"[]")
    for source in (alpha, header):
        refused = asyncio.run(registry.register("bad", str(source)))
        assert isinstance(refused, WireError) and refused.status == 400, refused


def test_the_peft_options_an_adapter_carries_are_recorded_and_a_malformed_one_records_nothing(
    tmp_path: Path, open_registry: Opener
) -> None:
    registry = open_registry()
    folder = write_adapter(tmp_path / "adapters" / "p", rank_pattern={"q_proj": 4}, alpha_pattern={"q_proj": 2})
    record = asyncio.run(registry.register("p", str(folder)))
    assert isinstance(record, AdapterRecord), record
    assert record.options == ("rank_pattern: per-module rank", "alpha_pattern: per-module scale")
    assert asyncio.run(open_registry().snapshot()).records["p"] == record  # the store keeps them
    biased = write_adapter(tmp_path / "adapters" / "b", lora_bias=True, tensors={
        f"{LAYER}.q_proj.lora_A.weight": torch.ones(4, 576), f"{LAYER}.q_proj.lora_B.weight": torch.ones(576, 4),
        f"{LAYER}.q_proj.lora_B.bias": torch.ones(576)})  # fmt: skip
    record = asyncio.run(registry.register("b", str(biased)))
    assert isinstance(record, AdapterRecord) and record.options == (LORA_BIAS_OPTION,), record
    bad = write_adapter(tmp_path / "adapters" / "bad", rank_pattern={"q_proj": 8})  # the weights have rank 4
    refused = asyncio.run(registry.register("bad", str(bad)))
    assert isinstance(refused, WireError) and (refused.status, refused.param) == (400, "rank_pattern"), refused
    assert "bad" not in asyncio.run(open_registry().snapshot()).records


NOT_RECORDED = [
    # (case, the adapter's tensors (None: a plain LoRA on q_proj) and config, status, param, words of the message)
    ("DoRA without its magnitudes", None, {"use_dora": True}, 400, "use_dora",
     r"sets use_dora, but \S+q_proj has no lora_magnitude_vector"),
    ("LoRA bias", {f"{LAYER}.q_proj.lora_A.weight": torch.ones(4, 576), f"{LAYER}.q_proj.lora_B.weight":
                   torch.ones(576, 4), f"{LAYER}.q_proj.lora_B.bias": torch.ones(576)}, {}, 400, "lora_bias",
     r"carry a bias on LoRA's B, but adapter_config.json does not set lora_bias: PEFT would ignore them"),
    ("modules_to_save", None, {"modules_to_save": ["lm_head"]}, 400, "modules_to_save", "not served yet"),
    ("a wrapper's prefix", {"language_model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(4, 576),
                            "language_model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.ones(576, 4)}, {},
     400, "source", "would load them and apply them to no module"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "tensors", "config", "status", "param", "words"), NOT_RECORDED,
                         ids=[c[0] for c in NOT_RECORDED])  # fmt: skip
def test_an_adapter_vllm_would_not_serve_as_trained_is_refused_naming_why_and_records_nothing(
    tmp_path: Path, open_registry: Opener, case: str, tensors: dict[str, torch.Tensor] | None,
    config: dict[str, object], status: int, param: str, words: str,
) -> None:  # fmt: skip
    registry = open_registry()
    folder = write_adapter(tmp_path / "adapters" / "a", tensors=tensors, **config)
    refused = asyncio.run(registry.register("a", str(folder)))
    assert isinstance(refused, WireError) and (refused.status, refused.param) == (status, param), refused
    assert re.search(words, refused.message), refused.message
    assert "a" not in asyncio.run(open_registry().snapshot()).records


def test_a_slow_store_write_holds_up_no_read_or_report(tmp_path: Path, open_registry: Opener) -> None:
    """The store's I/O runs off the registry's event loop: while a write waits on a slow store (an S3 endpoint that
    answers late), snapshots and the followers' changes are answered at once; the write lands when the store does."""
    registry = open_registry()
    asyncio.run(registry.register("other", str(write_adapter(tmp_path / "adapters" / "other"))))
    store = registry._store
    release, writing = threading.Event(), threading.Event()
    delete = store.delete

    def slow_delete(name: str, expected: AdapterRecord) -> None:
        writing.set()
        release.wait(3)  # past the assertion's bound below: today's loop would be blocked this long
        delete(name, expected)

    store.delete = slow_delete  # type: ignore[method-assign]

    async def scenario() -> None:
        generation = (await registry.snapshot()).generation
        started = time.monotonic()
        slow = asyncio.create_task(registry.unregister("other"))
        await asyncio.sleep(0)  # the unregister starts and reaches the store
        await asyncio.to_thread(writing.wait, 5)
        during = await registry.snapshot()
        await registry.changes(generation)
        assert time.monotonic() - started < 1.0, "the registry's loop waited for the store"
        assert "other" in during.records  # not current before the store took it
        release.set()
        assert isinstance(await slow, AdapterRecord)
        assert "other" not in (await registry.snapshot()).records

    asyncio.run(scenario())


def test_an_s3_store_whose_endpoint_never_answers_fails_a_write_within_its_bounds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A write to an S3 endpoint that accepts connections and never answers is a `StoreUnavailable` once the store's
    bounds are spent (a connection, a read, attempts: seconds), not after botocore's minutes (60 s a read, 5
    attempts). The bounds are shortened here so the test is quick; the shipped ones are what the client gets."""
    monkeypatch.setattr(store_module, "STORE_READ_TIMEOUT_S", 1, raising=False)
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # connections queue in the kernel; nothing ever reads or answers them
    try:
        connection = S3Source(endpoint_url=f"http://127.0.0.1:{silent.getsockname()[1]}", access_key_id="k",
                              secret_access_key="s")  # fmt: skip
        store = S3Store(bucket="b", prefix="p", connection=connection)
        outcome: list[BaseException] = []

        def write() -> None:
            try:
                store.put(make_record("a"), None)
            except BaseException as exc:  # the outcome is what the test checks
                outcome.append(exc)

        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        writer.join(15)
        assert not writer.is_alive(), "the write was still waiting after 15 s"
        assert len(outcome) == 1 and isinstance(outcome[0], StoreUnavailable), outcome
        config = store.client.meta.config
        assert config.retries["total_max_attempts"] == store_module.STORE_ATTEMPTS
        assert config.connect_timeout == store_module.STORE_CONNECT_TIMEOUT_S
    finally:
        silent.close()
    shipped = S3Store(bucket="b", prefix="p", connection=S3Source(endpoint_url="http://127.0.0.1:9"))
    monkeypatch.undo()
    assert shipped.client.meta.config.read_timeout == store_module.STORE_READ_TIMEOUT_S == 10


def break_store(registry: AdapterRegistry) -> None:
    """Makes the registry's store refuse writes for real: a read-only SQLite connection, or a bucket gone."""
    store = registry._store
    if isinstance(store, SqliteStore):
        store._db = sqlite3.connect(f"file:{store.path}?mode=ro", uri=True, isolation_level=None)
    else:
        assert isinstance(store, S3Store)
        client = store.client
        objects = client.list_objects_v2(Bucket=store.bucket).get("Contents", [])
        for item in objects:
            client.delete_object(Bucket=store.bucket, Key=item["Key"])
        client.delete_bucket(Bucket=store.bucket)


def test_a_write_the_store_refuses_changes_nothing(tmp_path: Path, open_registry: Opener) -> None:
    registry = open_registry()
    kept = asyncio.run(registry.register("kept", str(write_adapter(tmp_path / "adapters" / "kept"))))
    assert isinstance(kept, AdapterRecord)
    before = asyncio.run(registry.snapshot())
    break_store(registry)
    failed = asyncio.run(registry.register("new", str(write_adapter(tmp_path / "adapters" / "new"))))
    assert isinstance(failed, WireError) and failed.status == 500 and "nothing changed" in failed.message
    gone = asyncio.run(registry.unregister("kept"))
    assert isinstance(gone, WireError) and gone.status == 500
    assert asyncio.run(registry.snapshot()) == before  # memory unchanged, generation included


def other_base(folder: Path, model_dir: Path) -> Path:
    """A base model of another shape: layer 0's q_proj is 64 wide, so adapters made for the demo model don't fit."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text((model_dir / "config.json").read_text().replace("{", '{"other": 1, ', 1))
    save_file(
        {"model.layers.0.self_attn.q_proj.weight": torch.zeros(64, 64),
         "model.layers.0.self_attn.k_proj.weight": torch.zeros(64, 64)},
        str(folder / "model.safetensors"),
    )  # fmt: skip
    return folder


def test_records_are_checked_again_when_the_base_model_changes(
    tmp_path: Path, open_registry: Opener, model_dir: Path
) -> None:
    """A store belongs to one base: started with another, the registry re-validates every record, keeps the ones
    that no longer fit as unusable with the reason, and makes them usable again under the base they fit."""
    registry = open_registry(base_id="smol")
    asyncio.run(registry.register("fits", str(write_adapter(tmp_path / "adapters" / "fits"))))
    other = other_base(tmp_path / "other", model_dir)

    elsewhere = open_registry(base=other, base_id="other-model")
    record = asyncio.run(elsewhere.snapshot()).records["fits"]
    assert record.unusable is not None
    assert "does not fit base model other-model" in record.unusable and "q_proj" in record.unusable
    assert asyncio.run(open_registry(base=other, base_id="other-model").snapshot()).records["fits"].unusable

    back = open_registry(base_id="smol")
    assert asyncio.run(back.snapshot()).records["fits"].unusable is None


def test_the_store_records_the_base_models_identity(tmp_path: Path, store_at: Callable[[], RegistryStore],
                                                     open_registry: Opener, model_dir: Path) -> None:  # fmt: skip
    open_registry(base_id="smol")
    stored = store_at().load().base
    assert stored == BaseIdentity.of("smol", model_dir)
    assert stored != BaseIdentity.of("smol", other_base(tmp_path / "other", model_dir))


@pytest.mark.parametrize(
    ("name", "source", "param", "reason"),
    [
        ("../etc", "{ok}", "name", "must match"),
        ("support\n", "{ok}", "name", "must match"),  # `$` alone would accept a trailing newline
        (".", "{ok}", "name", "must match"),
        ("..", "{ok}", "name", "must match"),
        ("x", "/etc", "source", "outside the allowed adapter roots"),
        ("x", "{root}/missing", "source", "is not a folder"),
        ("x", "ftp://host/a", "source", "unsupported adapter source scheme"),
        ("x", "{root}/../../etc", "source", "outside the allowed adapter roots"),
    ],
)
def test_registry_refuses_bad_names_and_sources(
    tmp_path: Path, open_registry: Opener, name: str, source: str, param: str, reason: str
) -> None:
    root = tmp_path / "adapters"
    ok = write_adapter(root / "ok")
    registry = open_registry()
    outcome = asyncio.run(registry.register(name, source.format(ok=ok, root=root)))
    assert isinstance(outcome, WireError) and outcome.param == param and reason in outcome.message


def test_store_urls_open_the_store_they_name(tmp_path: Path) -> None:
    config = RegistryConfig(state_file=str(tmp_path / "state" / "registry.json"))
    assert config.store_url == f"sqlite:///{tmp_path}/state/registry.db"
    store = open_store(config.store_url, S3Source())
    assert isinstance(store, SqliteStore) and store.path == tmp_path / "state" / "registry.db"
    s3 = open_store("s3://bucket/some/prefix/", S3Source())
    assert isinstance(s3, S3Store) and (s3.bucket, s3.prefix) == ("bucket", "some/prefix")
    for bad in ("postgres://db", "sqlite://relative", "s3:///no-bucket", "sqlite:///"):
        with pytest.raises(ValueError, match="registry store"):
            RegistryConfig(store=bad)


def test_the_s3_store_is_one_object_per_adapter(tmp_path: Path, s3_url: str, model_dir: Path) -> None:
    """What an operator sees in the bucket: a record per adapter, readable JSON, the base identity beside them."""
    client = boto3.client("s3", endpoint_url=s3_url, region_name="us-east-1",
                          aws_access_key_id="loraplex-test", aws_secret_access_key="loraplex-test")  # fmt: skip
    client.create_bucket(Bucket="layout")
    connection = S3Source(endpoint_url=s3_url, access_key_id="loraplex-test", secret_access_key="loraplex-test")
    resolver = SourceResolver(local=LocalSource((tmp_path / "adapters",)))
    registry = AdapterRegistry(
        S3Store("layout", "p", connection), model_dir, resolver, max_rank=64, max_bytes=10**9, base_id="smol"
    )
    asyncio.run(registry.register("a", str(write_adapter(tmp_path / "adapters" / "a"))))
    keys = sorted(item["Key"] for item in client.list_objects_v2(Bucket="layout")["Contents"])
    assert keys == ["p/adapters/a.json", "p/base.json"]
    body = json.loads(client.get_object(Bucket="layout", Key="p/adapters/a.json")["Body"].read())
    assert (body["name"], body["version"], body["rank"]) == ("a", 1, 4)


def test_a_damaged_database_is_set_aside_and_the_last_good_copy_used(tmp_path: Path, model_dir: Path) -> None:
    """SQLite survives crashes by itself; a file damaged outside it (a bad copy, a failing disk) is kept aside and
    the copy taken at the last sound start is used, named in the log, instead of the registry failing to start."""
    resolver = SourceResolver(local=LocalSource((tmp_path / "adapters",)))

    def reopen() -> AdapterRegistry:
        return AdapterRegistry(SqliteStore(tmp_path / "registry.db"), model_dir, resolver, max_rank=64, max_bytes=10**9)

    registry = reopen()
    for name in ("one", "two"):
        asyncio.run(registry.register(name, str(write_adapter(tmp_path / "adapters" / name))))
    registry._store.close()  # type: ignore[attr-defined]
    reopen()._store.close()  # type: ignore[attr-defined]  # a sound start: the copy now holds one and two
    registry = reopen()
    asyncio.run(registry.register("three", str(write_adapter(tmp_path / "adapters" / "three"))))
    registry._store.close()  # type: ignore[attr-defined]
    database = tmp_path / "registry.db"
    damaged = b"this is not a database" + database.read_bytes()[22:]
    database.write_bytes(damaged)
    (tmp_path / "registry.db-wal").unlink(missing_ok=True)
    restored = reopen()
    assert set(asyncio.run(restored.snapshot()).records) == {"one", "two"}
    assert [p.read_bytes() for p in tmp_path.glob("registry.db.corrupt-*")] == [damaged]


def test_a_source_unreadable_during_the_check_is_checked_again_at_the_next_start(
    tmp_path: Path, open_registry: Opener, store_at: Callable[[], RegistryStore], model_dir: Path
) -> None:
    """An outage while the records are checked against a new base must not leave adapters unusable for good."""
    source = write_adapter(tmp_path / "adapters" / "fits")
    asyncio.run(open_registry(base_id="smol").register("fits", str(source)))
    other = other_base(tmp_path / "other", model_dir)
    source.rename(tmp_path / "adapters" / "away")  # the source's folder unreachable for a moment

    during = asyncio.run(open_registry(base=other, base_id="other-model").snapshot()).records["fits"]
    assert during.unusable is not None and "could not be checked against base model other-model" in during.unusable
    assert store_at().load().base not in (BaseIdentity.of("smol", model_dir), BaseIdentity.of("other-model", other))

    (tmp_path / "adapters" / "away").rename(source)
    back = asyncio.run(open_registry(base_id="smol").snapshot()).records["fits"]
    assert back.unusable is None  # checked again, for real, and it fits this base
    assert store_at().load().base == BaseIdentity.of("smol", model_dir)


def test_followers_catch_up_by_what_changed_since_their_generation(
    tmp_path: Path, open_registry: Opener, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A router or replica holding generation G gets the records written since G (None for removed ones), not
    every record; one whose G the registry cannot answer from its log (another run's, or older than the log)
    gets every record, marked `full`. Either way, applying them gives the registry's own records."""
    registry = open_registry()
    source = str(write_adapter(tmp_path / "adapters" / "a"))
    for name in ("a", "b", "c"):
        asyncio.run(registry.register(name, source))
    follower = asyncio.run(registry.snapshot())
    assert asyncio.run(registry.changes(follower.generation)) == Changes(follower.generation, {})

    asyncio.run(registry.unregister("a"))
    asyncio.run(registry.register("d", source))
    asyncio.run(registry.register("b", source, pinned=True))
    changes = asyncio.run(registry.changes(follower.generation))
    assert not changes.full and set(changes.records) == {"a", "b", "d"} and changes.records["a"] is None
    follower = follower.updated(changes)
    assert follower == asyncio.run(registry.snapshot())

    restarted = open_registry()  # a new run: the old generation means nothing to it
    asyncio.run(restarted.unregister("c"))
    full = asyncio.run(restarted.changes(follower.generation))
    assert full.full and set(full.records) == {"b", "d"}
    assert follower.updated(full) == asyncio.run(restarted.snapshot())

    monkeypatch.setattr(registry_module, "CHANGE_LOG", 2)  # a follower that fell behind the log
    behind = asyncio.run(restarted.snapshot())
    for name in ("e", "f", "g", "h", "i"):
        asyncio.run(restarted.register(name, source))
    assert asyncio.run(restarted.changes(behind.generation)).full
    recent = asyncio.run(restarted.snapshot())
    asyncio.run(restarted.unregister("e"))
    assert asyncio.run(restarted.changes(recent.generation)).records == {"e": None}


def test_records_share_their_repeated_values_however_they_were_made(tmp_path: Path, open_registry: Opener) -> None:
    """100,000 records from one bucket and one kind of adapter hold one copy of the source, targets and alpha, in
    the registry (records made and decoded from the store) and in a follower (records unpickled from Ray calls)."""
    registry = open_registry()
    folder = write_adapter(tmp_path / "adapters" / "a")
    for name in ("a", "b"):
        asyncio.run(registry.register(name, "".join(str(folder))))  # equal sources, two string objects
    made = [asyncio.run(registry.changes(0)).records[name] for name in ("a", "b")]
    decoded = [record for record in open_registry()._records.values()]
    received = [pickle.loads(pickle.dumps(record)) for record in made]  # each as its own Ray reply
    for a, b in (made, decoded, received):
        assert a is not None and b is not None and a.source == str(folder)
        assert a.source is b.source and a.target_modules is b.target_modules and a.alpha is b.alpha
        assert a.size_bytes is b.size_bytes and a.size_bytes > 256  # not one of Python's own shared small ints
        assert a.canary_percent is b.canary_percent
    assert received == made


def test_holders_key_records_by_their_own_name_object(tmp_path: Path, open_registry: Opener) -> None:
    """The registry (live and restarted) and a follower (by a full list, by changes, by its own write) key each
    record by `record.name` itself: an equal key string beside it would be a second copy of every name."""
    from routing.catalog import ModelCatalog

    class OverRay:  # a follower receives its own copies, as from Ray calls
        def __init__(self, registry: AdapterRegistry) -> None:
            self.registry = registry

        async def changes(self, since: int) -> Changes:
            changes: Changes = pickle.loads(pickle.dumps(await self.registry.changes(since)))
            return changes

    def fresh(name: str) -> str:  # an equal string that is another object, as a request's or a row's is
        return "".join(list(name))

    registry = open_registry()
    folder = str(write_adapter(tmp_path / "adapters" / "a"))
    for name in ("adapter-a", "adapter-b"):
        asyncio.run(registry.register(fresh(name), folder))
    catalog = ModelCatalog("base", OverRay(registry))  # type: ignore[arg-type]
    asyncio.run(catalog.refresh(force=True))  # everything, as a router starting
    asyncio.run(registry.register(fresh("adapter-c"), folder))
    asyncio.run(registry.register(fresh("adapter-a"), folder))  # a new version of a name the follower holds
    asyncio.run(catalog.refresh(force=True))  # what changed
    record = asyncio.run(registry.register(fresh("adapter-d"), folder))
    assert isinstance(record, AdapterRecord)
    catalog.wrote(fresh("adapter-d"), pickle.loads(pickle.dumps(record)))  # its own write, from the registry's reply
    for holder in (registry._records, open_registry()._records, catalog._snapshot.records):
        assert sorted(holder) == ["adapter-a", "adapter-b", "adapter-c", "adapter-d"]
        assert all(key is record.name for key, record in holder.items())


def test_a_router_follows_the_registry_by_changes_not_snapshots(tmp_path: Path, open_registry: Opener) -> None:
    from routing.catalog import ModelCatalog

    registry = open_registry()
    source = str(write_adapter(tmp_path / "adapters" / "a"))

    async def no_snapshots() -> None:
        raise AssertionError("the router asked for every record")

    registry.snapshot = no_snapshots  # type: ignore[assignment,method-assign]
    catalog = ModelCatalog("smol", registry)

    async def follow() -> None:
        for name in ("a", "b"):
            await registry.register(name, source)
            await catalog.refresh(force=True)
        assert [r.name for r in await catalog.records()] == ["a", "b"]
        await registry.unregister("a")
        await catalog.refresh(force=True)
        assert [r.name for r in await catalog.records()] == ["b"]
        assert (await catalog.resolve("b")).adapter == (await registry.changes(0)).records["b"]

    asyncio.run(follow())


def test_an_s3_store_restarts_from_its_snapshot_and_fetches_only_what_changed(s3_url: str) -> None:
    """At 100,000 adapters a restart cannot GET every object: the snapshot holds each record with its ETag, the
    listing gives every object's current ETag, and only objects the snapshot does not match are fetched."""
    from dataclasses import replace as changed

    keys = {"access_key_id": S3_KEYS["AWS_ACCESS_KEY_ID"], "secret_access_key": S3_KEYS["AWS_SECRET_ACCESS_KEY"]}
    connection = S3Source(endpoint_url=s3_url, **keys)
    connection.client().create_bucket(Bucket="snapshots")

    def store() -> S3Store:
        return S3Store(bucket="snapshots", prefix="base", connection=connection)

    writer = store()
    records = {f"a{i:03d}": make_record(f"a{i:03d}") for i in range(150)}
    for record in records.values():
        writer.put(record, None)
    first = store()
    assert first.load().records == records and first.stats["fetched"] == 150  # no snapshot yet: then one is written
    second = store()
    assert second.load().records == records and second.stats == {"listed": 150, "from_snapshot": 150, "fetched": 0}

    other = store()  # another registry writes meanwhile: a new version, a removal, a new adapter
    other.load()
    records["a001"] = changed(records["a001"], version=2, content_hash="new")
    other.put(records["a001"], make_record("a001"))
    other.delete("a002", records.pop("a002"))
    records["b"] = make_record("b")
    other.put(records["b"], None)
    third = store()
    assert third.load().records == records and third.stats["fetched"] == 2
    third.put(changed(records["a003"], pinned=True), records["a003"])  # its ETags came with the listing

    connection.client().put_object(Bucket="snapshots", Key="base/snapshot.json", Body=b"{not json")
    damaged = store()
    records["a003"] = changed(records["a003"], pinned=True)
    assert damaged.load().records == records and damaged.stats["fetched"] == len(records)


def make_record(name: str) -> AdapterRecord:
    return AdapterRecord(name=name, source=f"s3://b/{name}", version=1, content_hash=f"h-{name}", rank=8, alpha=16.0,
                         target_modules=("q_proj",), size_bytes=1, pinned=False, created=0)  # fmt: skip


def test_records_made_one_after_another_in_one_second_share_its_timestamp() -> None:
    """Adapters registered in bulk (or decoded in the order they were written) hold one `created` int per second,
    also when each arrives in a message of its own; a record of another second keeps its own."""

    def made_at(name: str, created: int) -> AdapterRecord:
        return AdapterRecord(name=name, source="s3://b/x", version=1, content_hash=f"h-{name}", rank=8, alpha=16.0,
                             target_modules=("q_proj",), size_bytes=1, pinned=False, created=created)  # fmt: skip

    second = int("1790000000")
    made = [made_at("a", second), made_at("b", int(str(second)))]  # equal ints, two objects
    received = [pickle.loads(pickle.dumps(record)) for record in made]
    assert made[0].created is made[1].created and received[0].created is received[1].created
    assert made_at("c", second + 1).created == second + 1 and made[0].created == second


def test_a_no_op_adapters_warning_is_recorded_and_survives_a_restart(tmp_path: Path, open_registry: Opener) -> None:
    registry = open_registry()
    record = asyncio.run(registry.register("silent", str(write_adapter(tmp_path / "adapters" / "silent"))))
    assert isinstance(record, AdapterRecord) and record.warnings == (NO_OP_WARNING,)
    assert asyncio.run(open_registry().snapshot()).records["silent"] == record


def test_pins_beyond_the_engines_room_are_refused_and_a_rollout_counts_as_one_more(
    tmp_path: Path, open_registry: Opener
) -> None:
    """Every replica's adapter cache holds `max_pinned` pinned versions beside its unpinned ones; one more would let
    a step of max_loras other adapters evict one of its own (the engine died of that)."""
    registry = open_registry(max_pinned=2)

    def weights(i: int) -> dict[str, torch.Tensor]:
        return {f"{LAYER}.q_proj.lora_A.weight": torch.full((4, 576), i + 1.0),
                f"{LAYER}.q_proj.lora_B.weight": torch.ones(576, 4)}  # fmt: skip

    sources = [str(write_adapter(tmp_path / "adapters" / f"p{i}", tensors=weights(i))) for i in range(3)]
    assert isinstance(asyncio.run(registry.register("one", sources[0], pinned=True)), AdapterRecord)
    assert isinstance(asyncio.run(registry.register("two", sources[1])), AdapterRecord)
    assert isinstance(asyncio.run(registry.register("unpinned", sources[2])), AdapterRecord)
    rolled = asyncio.run(registry.rollout("one", sources[1], 10.0))  # its canary is pinned too: 2 of 2
    assert isinstance(rolled, AdapterRecord) and rolled.canary is not None and rolled.canary.pinned
    refused = asyncio.run(registry.register("two", sources[1], pinned=True))
    assert isinstance(refused, WireError) and refused.status == 409 and refused.param == "pinned", refused
    assert asyncio.run(registry.snapshot()).records["two"].pinned is False  # nothing half-done
    assert isinstance(asyncio.run(registry.rollback("one")), AdapterRecord)
    assert isinstance(asyncio.run(registry.register("two", sources[1], pinned=True)), AdapterRecord)
    refused = asyncio.run(registry.rollout("two", sources[2], 50.0))
    assert isinstance(refused, WireError) and refused.param == "pinned", refused
    # Unpinning and unregistering free room; a registry without a bound refuses nothing.
    assert isinstance(asyncio.run(registry.register("one", sources[0])), AdapterRecord)
    assert isinstance(asyncio.run(registry.rollout("two", sources[2], 50.0)), AdapterRecord)
    assert isinstance(asyncio.run(open_registry().register("unpinned", sources[2], pinned=True)), AdapterRecord)


def test_a_pin_counts_what_the_store_holds_not_only_this_registrys_own_writes(
    tmp_path: Path, open_registry: Opener
) -> None:
    """A split brain: two registries on one store, each opened before the other's pin. The second re-reads the store
    before a write that pins, so the first one's pin counts: 409, and the store keeps what it held."""
    first, second = open_registry(max_pinned=1), open_registry(max_pinned=1)
    one = str(write_adapter(tmp_path / "adapters" / "one"))
    two = str(write_adapter(tmp_path / "adapters" / "two", rank=8))
    assert isinstance(asyncio.run(first.register("one", one, pinned=True)), AdapterRecord)
    refused = asyncio.run(second.register("two", two, pinned=True))
    assert isinstance(refused, WireError) and (refused.status, refused.param) == (409, "pinned"), refused
    assert "1 of the 1 pinned" in refused.message
    assert asyncio.run(second.snapshot()).records["one"].pinned, "it took the record it re-read"
    assert set(asyncio.run(open_registry().snapshot()).records) == {"one"}
    unpinned = asyncio.run(second.register("two", two))  # a write that pins nothing is not refused
    assert isinstance(unpinned, AdapterRecord) and not unpinned.pinned


def test_an_adapters_tool_call_parser_is_one_the_server_loads_and_survives_a_restart(
    tmp_path: Path, open_registry: Opener
) -> None:
    registry = open_registry(tool_parsers=("hermes", "llama3_json"))
    source = str(write_adapter(tmp_path / "adapters" / "tools"))
    refused = asyncio.run(registry.register("tools", source, tool_call_parser="mistral"))
    assert isinstance(refused, WireError) and refused.status == 400 and refused.param == "tool_call_parser", refused
    assert "hermes, llama3_json" in refused.message and "tools" not in asyncio.run(registry.snapshot()).records
    record = asyncio.run(registry.register("tools", source, tool_call_parser="hermes"))
    assert isinstance(record, AdapterRecord) and record.tool_call_parser == "hermes" and record.version == 1
    # The same weights with another parser: the same version, the parser changed; a restart reads it back.
    again = asyncio.run(registry.register("tools", source, tool_call_parser="llama3_json"))
    assert isinstance(again, AdapterRecord) and again.version == 1 and again.tool_call_parser == "llama3_json"
    assert asyncio.run(open_registry().snapshot()).records["tools"] == again
    refused = asyncio.run(open_registry().register("other", source, tool_call_parser="hermes"))  # loads none
    assert isinstance(refused, WireError) and "loaded: none" in refused.message


def test_an_s3_store_on_a_bucket_that_does_not_exist_says_so(s3_url: str) -> None:
    keys = {"access_key_id": S3_KEYS["AWS_ACCESS_KEY_ID"], "secret_access_key": S3_KEYS["AWS_SECRET_ACCESS_KEY"]}
    store = S3Store(
        bucket="no-such-bucket", prefix="cluster/registry", connection=S3Source(endpoint_url=s3_url, **keys)
    )
    with pytest.raises(StoreUnavailable, match=r"bucket 'no-such-bucket' does not exist .*s3://no-such-bucket/cluster"):
        store.load()
