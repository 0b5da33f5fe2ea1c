"""Adapter validation and the registry, on real adapter folders checked against the real base model's shapes."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from serve.adapters.validation import NO_OP_WARNING, AdapterInvalid, base_linear_shapes, validate_adapter
from serve.assets import DEFAULT_MODEL_NAME, build_default_model

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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_an_adapter_whose_lora_b_is_zero_is_registered_with_a_warning(
    tmp_path: Path, shapes: dict[str, list[int]], dtype: torch.dtype
) -> None:
    """PEFT initializes lora_B to zeros: such an adapter answers as the base model does (vLLM issue #34186)."""
    a = torch.randn(4, 576).to(dtype)
    for b, expected in [
        (torch.zeros(576, 4), (NO_OP_WARNING,)),
        (-torch.zeros(576, 4), (NO_OP_WARNING,)),  # -0.0 is zero too
        (torch.zeros(576, 4).index_fill_(0, torch.tensor([575]), 1e-3), ()),  # one non-zero row: it does something
    ]:
        folder = write_adapter(tmp_path / f"b{len(expected)}-{b.sum()}", tensors={
            f"{LAYER}.q_proj.lora_A.weight": a, f"{LAYER}.q_proj.lora_B.weight": b.to(dtype)})  # fmt: skip
        meta = validate_adapter(folder, shapes, max_rank=64, max_bytes=10**9)
        assert meta.warnings == expected, (dtype, b.sum())
