"""Adapter validation and the registry, on real adapter folders checked against the real base model's shapes."""

from __future__ import annotations

import asyncio
import json
import shutil
import struct
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from serve.adapters import registry as registry_module
from serve.adapters.records import AdapterRecord
from serve.adapters.registry import AdapterRegistry
from serve.adapters.sources import LocalSource, SourceResolver
from serve.adapters.validation import AdapterInvalid, base_linear_shapes, validate_adapter
from serve.assets import DEFAULT_MODEL_NAME, build_default_model
from serve.wire import WireError

ASSETS = Path(__file__).resolve().parents[2] / ".loraplex"
LAYER = "base_model.model.model.layers.0.self_attn"


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return build_default_model(ASSETS / "models" / DEFAULT_MODEL_NAME)


@pytest.fixture(scope="module")
def shapes(model_dir: Path) -> dict[str, list[int]]:
    return base_linear_shapes(model_dir)


def write_adapter(
    folder: Path, rank: int = 4, tensors: dict[str, torch.Tensor] | None = None, **config: object
) -> Path:
    """A minimal PEFT LoRA folder on q_proj of layer 0 (576 → 576 in SmolLM2-135M)."""
    folder.mkdir(parents=True, exist_ok=True)
    settings = {"peft_type": "LORA", "r": rank, "lora_alpha": 8, "target_modules": ["q_proj"], **config}
    (folder / "adapter_config.json").write_text(json.dumps(settings))
    default = {
        f"{LAYER}.q_proj.lora_A.weight": torch.zeros(rank, 576),
        f"{LAYER}.q_proj.lora_B.weight": torch.zeros(576, rank),
    }
    save_file(tensors if tensors is not None else default, str(folder / "adapter_model.safetensors"))
    return folder


def check(folder: Path, shapes: dict[str, list[int]], max_rank: int = 64, max_bytes: int = 10**9) -> object:
    return validate_adapter(folder, shapes, max_rank=max_rank, max_bytes=max_bytes)


def test_a_valid_adapter_is_described(tmp_path: Path, shapes: dict[str, list[int]]) -> None:
    meta = check(write_adapter(tmp_path / "ok"), shapes)
    assert (meta.rank, meta.target_modules) == (4, ("q_proj",))  # type: ignore[attr-defined]
    assert len(meta.content_hash) == 64  # type: ignore[attr-defined]


BAD_ADAPTERS = [
    ("no config", lambda f: (f / "adapter_config.json").unlink(), "adapter_config.json is missing"),
    ("broken config", lambda f: (f / "adapter_config.json").write_text("{"), "not valid JSON"),
    ("not lora", lambda f: write_adapter(f, peft_type="IA3"), "not a LoRA adapter"),
    ("rank too high", lambda f: write_adapter(f, rank=128, tensors={}), "exceeds this server's max_lora_rank"),
    ("pickled", lambda f: (f / "adapter_model.bin").write_bytes(b"x"), "pickled weights"),
    ("no weights", lambda f: (f / "adapter_model.safetensors").unlink(), "adapter_model.safetensors is missing"),
    ("wrong shape", lambda f: write_adapter(f, tensors={f"{LAYER}.q_proj.lora_A.weight": torch.zeros(4, 999)}),
     "wrong base model"),
    ("unknown module", lambda f: write_adapter(f, tensors={f"{LAYER}.nope.lora_A.weight": torch.zeros(4, 576)}),
     "does not have"),
    ("not lora tensors", lambda f: write_adapter(f, tensors={"model.embed_tokens.weight": torch.zeros(2, 2)}),
     "unsupported tensor"),
    ("garbage weights", lambda f: (f / "adapter_model.safetensors").write_bytes(b"\x08"), "not a safetensors"),
    ("truncated weights", lambda f: truncate(f / "adapter_model.safetensors", 100), "truncated or corrupt"),
    ("alpha not a number", lambda f: write_adapter(f, lora_alpha="x"), "no valid lora_alpha"),
    ("alpha negative", lambda f: write_adapter(f, lora_alpha=-2), "no valid lora_alpha"),
    ("header not an object", lambda f: header_of(f / "adapter_model.safetensors", b"[]"), "not a JSON object"),
    ("integer weights",
     lambda f: write_adapter(f, tensors={f"{LAYER}.q_proj.lora_A.weight": torch.zeros(4, 576, dtype=torch.int32)}),
     "must be floating point"),
]  # fmt: skip


def header_of(file: Path, header: bytes) -> None:
    """A safetensors file whose header is `header` (valid JSON of the wrong shape)."""
    file.write_bytes(struct.pack("<Q", len(header)) + header)


def truncate(file: Path, drop: int) -> None:
    data = file.read_bytes()
    file.write_bytes(data[:-drop])


@pytest.mark.parametrize(("case", "damage", "reason"), BAD_ADAPTERS, ids=[c[0] for c in BAD_ADAPTERS])
def test_bad_adapters_are_refused_with_the_reason(
    tmp_path: Path, shapes: dict[str, list[int]], case: str, damage: object, reason: str
) -> None:
    folder = write_adapter(tmp_path / "a")
    damage(folder)  # type: ignore[operator]
    with pytest.raises(AdapterInvalid, match=reason):
        check(folder, shapes, max_rank=64)


def test_oversized_adapter_is_refused(tmp_path: Path, shapes: dict[str, list[int]]) -> None:
    with pytest.raises(AdapterInvalid, match="the limit is 100"):
        check(write_adapter(tmp_path / "a"), shapes, max_bytes=100)


def make_registry(tmp_path: Path, model_dir: Path) -> AdapterRegistry:
    resolver = SourceResolver(local=LocalSource((tmp_path / "adapters",)))
    return AdapterRegistry(tmp_path / "state.json", model_dir, resolver, max_rank=64, max_bytes=10**9)


def test_registry_versions_persist_and_unregister(tmp_path: Path, model_dir: Path) -> None:
    registry = make_registry(tmp_path, model_dir)
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

    reopened = make_registry(tmp_path, model_dir)
    assert asyncio.run(reopened.snapshot()).records["sql"] == second
    assert isinstance(asyncio.run(reopened.unregister("sql")), AdapterRecord)
    missing = asyncio.run(reopened.unregister("sql"))
    assert isinstance(missing, WireError) and missing.status == 404
    assert make_registry(tmp_path, model_dir) is not None
    assert asyncio.run(make_registry(tmp_path, model_dir).snapshot()).records == {}


def test_a_restarted_registry_never_reuses_a_generation(tmp_path: Path, model_dir: Path) -> None:
    """A router that cached generation G before a restart must see the restarted registry's as new."""
    registry = make_registry(tmp_path, model_dir)
    seen = {asyncio.run(registry.generation())}
    for i in range(3):
        asyncio.run(registry.register(f"a{i}", str(write_adapter(tmp_path / "adapters" / f"a{i}"))))
        seen.add(asyncio.run(registry.generation()))
    restarted = make_registry(tmp_path, model_dir)
    asyncio.run(restarted.unregister("a0"))
    for _ in range(3):  # as many writes as before the restart: the counter alone would repeat
        asyncio.run(restarted.register("b", str(write_adapter(tmp_path / "adapters" / "a1"))))
    assert asyncio.run(restarted.generation()) not in seen
    assert asyncio.run(restarted.snapshot()).generation > max(seen)  # and it keeps growing


def test_a_file_linked_from_outside_the_allowed_roots_is_refused(tmp_path: Path, model_dir: Path) -> None:
    registry = make_registry(tmp_path, model_dir)
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


def test_a_slow_download_holds_up_no_other_registry_call(tmp_path: Path, model_dir: Path) -> None:
    """The fetch runs outside the registry's lock: an unregister and a snapshot finish while it downloads."""
    registry = make_registry(tmp_path, model_dir)
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


def test_a_malformed_adapter_registers_as_400_not_500(tmp_path: Path, model_dir: Path) -> None:
    registry = make_registry(tmp_path, model_dir)
    alpha = write_adapter(tmp_path / "adapters" / "alpha", lora_alpha="x")
    header = write_adapter(tmp_path / "adapters" / "header")
    header_of(header / "adapter_model.safetensors", b"[]")
    for source in (alpha, header):
        refused = asyncio.run(registry.register("bad", str(source)))
        assert isinstance(refused, WireError) and refused.status == 400, refused


def test_a_write_that_cannot_be_saved_changes_nothing(
    tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = make_registry(tmp_path, model_dir)
    kept = asyncio.run(registry.register("kept", str(write_adapter(tmp_path / "adapters" / "kept"))))
    before = asyncio.run(registry.snapshot())

    def disk_full(*_: object, **__: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(registry_module, "atomic_write", disk_full)
    failed = asyncio.run(registry.register("new", str(write_adapter(tmp_path / "adapters" / "new"))))
    assert isinstance(failed, WireError) and failed.status == 500 and "No space left" in failed.message
    gone = asyncio.run(registry.unregister("kept"))
    assert isinstance(gone, WireError) and gone.status == 500
    assert asyncio.run(registry.snapshot()) == before  # memory unchanged, generation included
    assert isinstance(kept, AdapterRecord)
    assert make_registry(tmp_path, model_dir) is not None
    assert set(asyncio.run(make_registry(tmp_path, model_dir).snapshot()).records) == {"kept"}  # disk unchanged


def test_a_damaged_state_file_is_set_aside_and_the_last_good_state_used(tmp_path: Path, model_dir: Path) -> None:
    registry = make_registry(tmp_path, model_dir)
    for name in ("one", "two"):
        asyncio.run(registry.register(name, str(write_adapter(tmp_path / "adapters" / name))))
    state = tmp_path / "state.json"
    state.write_text('{"adapters": [')  # damaged outside loraplex (a full disk, a bad edit)
    reopened = make_registry(tmp_path, model_dir)
    assert set(asyncio.run(reopened.snapshot()).records) == {"one"}  # the state before the last write
    assert [p.read_text() for p in tmp_path.glob("state.json.corrupt-*")] == ['{"adapters": [']
    assert json.loads(state.read_text())["adapters"][0]["name"] == "one"


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
    tmp_path: Path, model_dir: Path, name: str, source: str, param: str, reason: str
) -> None:
    root = tmp_path / "adapters"
    ok = write_adapter(root / "ok")
    registry = make_registry(tmp_path, model_dir)
    outcome = asyncio.run(registry.register(name, source.format(ok=ok, root=root)))
    assert isinstance(outcome, WireError) and outcome.param == param and reason in outcome.message
    assert asyncio.run(registry.snapshot()).records == {}
    shutil.rmtree(root)
