"""Checks a downloaded adapter folder against the base model before anything is recorded or loaded.

Every refusal is an `AdapterInvalid` naming what is wrong; nothing is executed (pickled `.bin`
weights are refused, only safetensors headers and `adapter_config.json` are read).
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED_PEFT_TYPES = ("LORA",)
MAX_HEADER_BYTES = 64 * 1024 * 1024
FLOAT_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}


class AdapterInvalid(ValueError):
    """An adapter that must not be registered; `param` names the request field at fault."""

    def __init__(self, message: str, param: str = "source") -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class AdapterMetadata:
    """What validation learnt about an adapter."""

    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    base_model: str | None
    size_bytes: int
    content_hash: str
    warnings: tuple[str, ...] = ()
    """What makes the adapter suspect without making it unservable (it is registered, and shows them)."""


def tensor_shapes(file: Path) -> dict[str, list[int]]:
    """Tensor names and shapes from a safetensors header, without reading the tensors."""
    with file.open("rb") as handle:
        raw = handle.read(8)
        if len(raw) != 8:
            raise AdapterInvalid(f"{file.name} is not a safetensors file")
        (length,) = struct.unpack("<Q", raw)
        if length > MAX_HEADER_BYTES:
            raise AdapterInvalid(f"{file.name} has an implausible safetensors header")
        try:
            header: dict[str, Any] = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise AdapterInvalid(f"{file.name} is not a safetensors file") from None
    if not isinstance(header, dict):
        raise AdapterInvalid(f"{file.name} is not a safetensors file: its header is not a JSON object")
    data_bytes = file.stat().st_size - 8 - length
    tensors = {name: info for name, info in header.items() if name != "__metadata__"}
    # The engine reads these weights in the middle of a step, where a bad file would stop it: check the
    # layout now (float dtypes, each tensor's bytes = its shape, every byte inside the file).
    try:
        for name, info in tensors.items():
            start, end = info["data_offsets"]
            itemsize = FLOAT_DTYPE_BYTES.get(info["dtype"])
            if itemsize is None:
                raise AdapterInvalid(f"{name} has dtype {info['dtype']}; LoRA weights must be floating point")
            if not 0 <= start <= end <= data_bytes or end - start != itemsize * math.prod(info["shape"]):
                raise AdapterInvalid(f"{file.name} is truncated or corrupt: {name} does not fit its data")
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, AdapterInvalid):
            raise
        raise AdapterInvalid(f"{file.name} has a malformed safetensors header") from None
    return {name: list(info["shape"]) for name, info in tensors.items()}


def base_linear_shapes(model_dir: Path) -> dict[str, list[int]]:
    """`module path → [out, in]` of every 2-D weight of the base model (e.g. `model.layers.0.mlp.up_proj`)."""
    shapes: dict[str, list[int]] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        for name, shape in tensor_shapes(file).items():
            if name.endswith(".weight") and len(shape) == 2:
                shapes[name.removesuffix(".weight")] = shape
    return shapes


def content_hash(folder: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        digest.update(file.relative_to(folder).as_posix().encode() + b"\0")
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def validate_adapter(
    folder: Path, base_shapes: dict[str, list[int]], *, max_rank: int, max_bytes: int
) -> AdapterMetadata:
    """Returns the adapter's metadata, or raises `AdapterInvalid` saying why it cannot be served."""
    config = _read_config(folder)
    if str(config.get("peft_type", "")).upper() not in SUPPORTED_PEFT_TYPES:
        raise AdapterInvalid(f"not a LoRA adapter (peft_type={config.get('peft_type')!r})")
    rank = config.get("r")
    if not isinstance(rank, int) or rank < 1:
        raise AdapterInvalid(f"adapter_config.json has no valid rank r: {rank!r}")
    if rank > max_rank:
        raise AdapterInvalid(f"adapter rank {rank} exceeds this server's max_lora_rank {max_rank}")
    if list(folder.glob("*.bin")) or list(folder.glob("*.pt")) or list(folder.glob("*.pth")):
        raise AdapterInvalid("pickled weights (.bin/.pt) are refused: loading them could run code; use safetensors")
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise AdapterInvalid("adapter_model.safetensors is missing")
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    if size > max_bytes:
        raise AdapterInvalid(f"adapter is {size} bytes; the limit is {max_bytes}")
    alpha = config.get("lora_alpha", rank)
    if alpha is None:
        alpha = rank
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha) or alpha <= 0:
        raise AdapterInvalid(f"adapter_config.json has no valid lora_alpha: {alpha!r} (a positive number)")
    targets = _check_shapes(tensor_shapes(weights), base_shapes, rank)
    warnings = (NO_OP_WARNING,) if lora_b_all_zero(weights) else ()
    return AdapterMetadata(
        rank=rank,
        alpha=float(alpha),
        target_modules=targets,
        base_model=config.get("base_model_name_or_path"),
        size_bytes=size,
        content_hash=content_hash(folder),
        warnings=warnings,
    )


NO_OP_WARNING = (
    "every lora_B weight is zero, so the adapter changes nothing: a freshly initialized adapter, not a trained one?"
)


def lora_b_all_zero(file: Path) -> bool:
    """True when every lora_B weight in the safetensors `file` is zero (either sign): LoRA's output is B·A·x, so such
    an adapter answers exactly as the base model (PEFT initializes B to zeros; vLLM issue #34186). The header was
    checked by `tensor_shapes`; only the lora_B tensors are read."""
    import numpy as np

    with file.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header: dict[str, Any] = json.loads(handle.read(length))
        found = False
        for name, info in header.items():
            if name == "__metadata__" or not name.endswith(".lora_B.weight"):
                continue
            found = True
            start, end = info["data_offsets"]
            bits = 8 * FLOAT_DTYPE_BYTES[info["dtype"]]
            handle.seek(8 + length + start)
            words = np.frombuffer(handle.read(end - start), dtype=f"<u{bits // 8}")
            magnitude = np.array((1 << (bits - 1)) - 1, dtype=words.dtype)  # every bit but the sign
            if np.any(words & magnitude):
                return False
    return found


def _read_config(folder: Path) -> dict[str, Any]:
    file = folder / "adapter_config.json"
    if not file.is_file():
        raise AdapterInvalid("adapter_config.json is missing")
    try:
        config = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterInvalid(f"adapter_config.json is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise AdapterInvalid("adapter_config.json must hold a JSON object")
    return config


def _check_shapes(tensors: dict[str, list[int]], base: dict[str, list[int]], rank: int) -> tuple[str, ...]:
    """Each lora_A/lora_B pair must fit a linear layer of the base model; returns the target module names."""
    if not tensors:
        raise AdapterInvalid("adapter_model.safetensors holds no tensors")
    targets: set[str] = set()
    for name, shape in tensors.items():
        module, part = _split(name)
        if module is None:
            raise AdapterInvalid(f"unsupported tensor {name!r}: only LoRA A/B weights of linear layers are served")
        if module not in base:
            raise AdapterInvalid(f"adapter targets {module!r}, which the base model does not have (wrong base model?)")
        out_features, in_features = base[module]
        expected = [rank, in_features] if part == "lora_A" else [out_features, rank]
        if shape != expected:
            raise AdapterInvalid(f"{name} has shape {shape}, the base model needs {expected} (wrong base model?)")
        targets.add(module.rsplit(".", 1)[-1])
    return tuple(sorted(targets))


def _split(name: str) -> tuple[str | None, str]:
    """`base_model.model.<module>.lora_A.weight` → (`<module>`, `lora_A`); (None, "") for other tensors."""
    for part in ("lora_A", "lora_B"):
        suffix = f".{part}.weight"
        if name.endswith(suffix):
            module = name.removesuffix(suffix).removeprefix("base_model.model.")
            return module, part
    return None, ""
