"""Reading an adapter's and the base model's safetensors files without executing anything: the header's tensor
names and shapes (its layout checked against the file), the base model's linear shapes, whether every lora_B is
zero (reading only those tensors), and the adapter folder's content hash."""

from __future__ import annotations

import hashlib
import json
import math
import struct
from pathlib import Path
from typing import Any


class AdapterInvalid(ValueError):
    """An adapter that must not be registered; `param` names the request field at fault."""

    def __init__(self, message: str, param: str = "source") -> None:
        super().__init__(message)
        self.param = param


MAX_HEADER_BYTES = 64 * 1024 * 1024
FLOAT_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}


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
            if name == "__metadata__" or not name.endswith((".lora_B.weight", ".lora_embedding_B")):
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
