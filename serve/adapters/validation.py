"""Checks a downloaded adapter folder against the base model before anything is recorded or loaded.

Every refusal is an `AdapterInvalid` naming what is wrong; nothing is executed (pickled `.bin`
weights are refused; safetensors headers and `adapter_config.json` are read, and the few tensors a check needs).
Every tensor of the checkpoint must be one vLLM 0.32 applies, as PEFT would: LoRA A/B of a linear layer at the
rank `r` or `rank_pattern` gives its module, LoRA on the input embedding (`lora_embedding_A/B`), and the
embedding's own weights PEFT saves beside it when they equal the base model's (vLLM skips them; PEFT loads them),
and with `lora_bias` the bias of each linear layer's lora_B, with `use_dora` each linear layer's DoRA magnitude
(which loraplex's vLLM plugin serves, serve/vllm_lora_bias.py and serve/vllm_dora.py; checked by `lora_extras`),
each under the module name vLLM looks it up by (`tensor_names`). Options PEFT writes that are not served yet are
refused by their own field (`unserved`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serve.adapters.lora_extras import (
    DORA_OPTION,
    LORA_BIAS_OPTION,
    bias_shape_refusal,
    dora_refusal,
    lora_bias_refusal,
    magnitude_refusal,
)
from serve.adapters.safetensors_files import (
    NO_OP_WARNING,
    AdapterInvalid,
    content_hash,
    lora_b_all_zero,
    tensor_shapes,
)
from serve.adapters.tensor_names import PEFT_PREFIX, engine_name, misplaced_message, relocated, split
from serve.adapters.unserved import Refusal, unserved

__all__ = ["DORA_OPTION", "LORA_BIAS_OPTION", "AdapterInvalid"]  # where the registry and the tests read them

SUPPORTED_PEFT_TYPES = ("LORA",)


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
    options: tuple[str, ...] = ()
    """The PEFT options beyond plain LoRA it carries, each with how it is served (`rank_pattern: per-module rank`)."""


EMBEDDINGS = ("embed_tokens",)
"""Input embeddings vLLM wraps with its embedding LoRA (the models' `embedding_modules`)."""


@dataclass(frozen=True)
class LoraOptions:
    """How `adapter_config.json` ranks and scales each module: `r` and `lora_alpha`, overridden per module by
    `rank_pattern` and `alpha_pattern` (the first key that is the module name's tail at a `.` wins, PEFT's
    `get_pattern_key`, which vLLM's `PEFTHelper.get_rank_and_scaling` follows)."""

    r: int
    alpha: float
    rank_pattern: tuple[tuple[str, int], ...] = ()
    alpha_pattern: tuple[tuple[str, float], ...] = ()
    use_rslora: bool = False

    def rank_of(self, module: str) -> tuple[int, str]:
        """The rank PEFT gives `module` (`model.layers.0.mlp.down_proj`), and the config field it comes from."""
        for key, rank in self.rank_pattern:
            if re.match(rf"(.*\.)?({key})$", module):
                return rank, f"rank_pattern[{key!r}]"
        return self.r, "r"

    def served(self) -> tuple[str, ...]:
        return tuple(
            option
            for option, present in (
                ("rank_pattern: per-module rank", bool(self.rank_pattern)),
                ("alpha_pattern: per-module scale", bool(self.alpha_pattern)),
                ("use_rslora: scale alpha/sqrt(rank)", self.use_rslora),
            )
            if present
        )


def validate_adapter(
    folder: Path,
    base_shapes: dict[str, list[int]],
    *,
    max_rank: int,
    max_bytes: int,
    base_model: Path | None = None,
) -> AdapterMetadata:
    """Returns the adapter's metadata, or raises `AdapterInvalid` saying why it cannot be served. `base_model` is
    the base model's folder, read only for an adapter that saved the embedding's weights (None: such an adapter is
    refused)."""
    config = _read_config(folder)
    if str(config.get("peft_type", "")).upper() not in SUPPORTED_PEFT_TYPES:
        raise AdapterInvalid(f"not a LoRA adapter (peft_type={config.get('peft_type')!r})")
    options = read_options(config, max_rank)
    if list(folder.glob("*.bin")) or list(folder.glob("*.pt")) or list(folder.glob("*.pth")):
        raise AdapterInvalid("pickled weights (.bin/.pt) are refused: loading them could run code; use safetensors")
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise AdapterInvalid("adapter_model.safetensors is missing")
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    if size > max_bytes:
        raise AdapterInvalid(f"adapter is {size} bytes; the limit is {max_bytes}")
    tensors = tensor_shapes(weights)
    _refuse(unserved(config, tensors, base_shapes))
    checked = _check_shapes(tensors, base_shapes, options, config)
    _refuse(dora_refusal(config, checked.magnitudes, checked.plain, checked.embeddings))
    _refuse(lora_bias_refusal(config, checked.biased, checked.unbiased))
    for name in checked.saved_embeddings:
        _check_saved_embedding(weights, name, base_model)
    # DoRA's magnitudes change the base output even where lora_B is zero: the warning is for plain LoRA only.
    warnings = (NO_OP_WARNING,) if not checked.magnitudes and lora_b_all_zero(weights) else ()
    return AdapterMetadata(
        rank=checked.rank,
        alpha=options.alpha,
        target_modules=checked.targets,
        base_model=config.get("base_model_name_or_path"),
        size_bytes=size,
        content_hash=content_hash(folder),
        warnings=warnings,
        options=options.served()
        + (("embed_tokens: LoRA",) if "embed_tokens" in checked.targets else ())
        + ((LORA_BIAS_OPTION,) if checked.biased else ())
        + ((DORA_OPTION,) if checked.magnitudes else ()),
    )


def _refuse(refusal: Refusal | None) -> None:
    if refusal is not None:
        raise AdapterInvalid(*refusal)


def read_options(config: dict[str, Any], max_rank: int) -> LoraOptions:
    """`config`'s ranks and scales, or `AdapterInvalid` naming the field at fault. vLLM refuses an adapter any of
    whose ranks, in `rank_pattern` too, exceeds `max_lora_rank` (`PEFTHelper.validate_legal`): so does this."""
    rank = config.get("r")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise AdapterInvalid(f"adapter_config.json has no valid rank r: {rank!r}", "r")
    if rank > max_rank:
        raise AdapterInvalid(f"adapter rank {rank} exceeds this server's max_lora_rank {max_rank}", "r")
    alpha = config.get("lora_alpha", rank)
    if alpha is None:
        alpha = rank
    if not _positive_number(alpha):
        raise AdapterInvalid(f"adapter_config.json has no valid lora_alpha: {alpha!r} (a positive number)",
                             "lora_alpha")  # fmt: skip
    ranks = _pattern(config, "rank_pattern", lambda v: not isinstance(v, bool) and isinstance(v, int) and v >= 1)
    for key, value in ranks:
        if value > max_rank:
            raise AdapterInvalid(f"rank_pattern gives {key!r} rank {value}, which exceeds this server's max_lora_rank "
                                 f"{max_rank}", "rank_pattern")  # fmt: skip
    alphas = _pattern(config, "alpha_pattern", _positive_number)
    rslora = config.get("use_rslora") or False
    if not isinstance(rslora, bool):
        raise AdapterInvalid(f"adapter_config.json has use_rslora {rslora!r}; true or false", "use_rslora")
    return LoraOptions(r=rank, alpha=float(alpha), rank_pattern=ranks, alpha_pattern=tuple(
        (key, float(value)) for key, value in alphas), use_rslora=rslora)  # fmt: skip


def _positive_number(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value) and value > 0


def _pattern(config: dict[str, Any], field: str, valid: Callable[[object], bool]) -> tuple[tuple[str, Any], ...]:
    """`config[field]` (`{"down_proj": 16, ...}`) as pairs in its order, each key a regular expression and each
    value `valid`; refused naming `field` otherwise."""
    pattern = config.get(field) or {}
    if not isinstance(pattern, dict):
        raise AdapterInvalid(f"adapter_config.json's {field} must map module names to values: {pattern!r}", field)
    for key, value in pattern.items():
        try:
            re.compile(rf"(.*\.)?({key})$")  # as PEFT matches it
        except re.error as exc:
            raise AdapterInvalid(f"{field} key {key!r} is not a regular expression PEFT can match ({exc})",
                                 field) from None  # fmt: skip
        if not valid(value):
            kind = "a positive integer" if field == "rank_pattern" else "a positive number"
            raise AdapterInvalid(f"{field} gives {key!r} {value!r}; it must be {kind}", field)
    return tuple(pattern.items())


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


@dataclass(frozen=True)
class Checked:
    """What the tensors of an adapter hold: its target module names, its widest rank, and the embedding weights
    it saved (tensor names)."""

    targets: tuple[str, ...]
    rank: int
    saved_embeddings: tuple[str, ...]
    biased: tuple[str, ...] = ()
    """The modules whose lora_B carries a bias (`lora_bias`)."""
    unbiased: tuple[str, ...] = ()
    """The linear modules whose lora_B does not."""
    magnitudes: tuple[str, ...] = ()
    """The modules with a DoRA magnitude (`use_dora`)."""
    plain: tuple[str, ...] = ()
    """The linear modules with a LoRA and no magnitude."""
    embeddings: tuple[str, ...] = ()
    """The embedding modules with a LoRA."""


def _check_shapes(
    tensors: dict[str, list[int]], base: dict[str, list[int]], options: LoraOptions, config: dict[str, Any]
) -> Checked:
    """Each LoRA pair must fit a linear layer (or the input embedding) of the base model at the rank the config gives
    its module, under the name vLLM looks it up by (`tensor_names.split`); any other tensor is refused, since vLLM
    would drop it or fail on it."""
    if not tensors:
        raise AdapterInvalid("adapter_model.safetensors holds no tensors")
    parts: dict[str, set[str]] = {}
    ranks = [0]
    saved = []
    biased: list[str] = []
    magnitudes: list[str] = []
    held: dict[tuple[str, str], str] = {}
    misplaced: list[tuple[str, str, str, str]] = []
    for name, shape in tensors.items():
        module, part = split(name)
        if module is None:
            raise AdapterInvalid(f"unsupported tensor {name!r}: only LoRA A/B weights of linear layers and of the "
                                 "input embedding are served")  # fmt: skip
        if (other := held.setdefault((module, part), name)) != name:
            raise AdapterInvalid(f"{other!r} and {name!r} are both {part} of {module} as vLLM 0.32 reads tensor "
                                 f"names (without {PEFT_PREFIX!r}): it would apply one and drop the other")  # fmt: skip
        leaf = module.rsplit(".", 1)[-1]
        if module not in base and (target := relocated(module, base)) is not None:
            misplaced.append((name, module, target, part))
            continue
        if leaf == "lm_head" and module not in base:
            _refuse_tied_head(name, config)
        if module not in base:
            raise AdapterInvalid(f"{name!r} targets {module!r}, which the base model does not have (wrong base "
                                 "model?)")  # fmt: skip
        if part == "base_layer":
            saved.append(name)
            continue
        if part == "lora_bias" and leaf not in EMBEDDINGS:
            _refuse(bias_shape_refusal(name, shape, base[module]))
            biased.append(module)
            continue
        if part == "lora_magnitude":
            _refuse(magnitude_refusal(name, shape, module, base[module]))
            magnitudes.append(module)
            continue
        if (leaf in EMBEDDINGS) != part.startswith("lora_embedding"):
            kind = "an embedding (lora_embedding_A/B)" if leaf in EMBEDDINGS else "a linear layer (lora_A/B)"
            raise AdapterInvalid(f"{name}: {module} is {kind} in the base model, so vLLM would misread this LoRA")
        ranks.append(_check_pair_shape(name, shape, part, module, base[module], options))
        parts.setdefault(module, set()).add(part)
    if misplaced:
        raise AdapterInvalid(misplaced_message(misplaced))
    for module, pair in parts.items():
        if len(pair) == 1:
            (half,) = pair
            other = half[:-1] + ("B" if half.endswith("A") else "A")
            raise AdapterInvalid(f"{module} has {half} but no {other}: vLLM cannot apply half a LoRA")
    for module, tensor, field in [(m, "lora_B.bias", "lora_bias") for m in biased] + [
            (m, "lora_magnitude_vector", "use_dora") for m in magnitudes]:  # fmt: skip
        if "lora_B" not in parts.get(module, ()):
            raise AdapterInvalid(f"{module} has a {tensor} but no LoRA (lora_A/lora_B weights)", field)
    targets = tuple(sorted({module.rsplit(".", 1)[-1] for module in parts}))
    linear = [m for m, pair in parts.items() if "lora_B" in pair]
    return Checked(targets=targets, rank=max(ranks), saved_embeddings=tuple(saved), biased=tuple(biased),
                   unbiased=tuple(m for m in linear if m not in biased), magnitudes=tuple(magnitudes),
                   plain=tuple(m for m in linear if m not in magnitudes),
                   embeddings=tuple(m for m, pair in parts.items() if "lora_embedding_B" in pair))  # fmt: skip


def _check_pair_shape(
    name: str, shape: list[int], part: str, module: str, base_shape: list[int], options: LoraOptions
) -> int:
    """`shape` against the base layer's: lora_A is (rank, in), lora_B (out, rank); an embedding's A is (rank,
    vocabulary), its B (hidden, rank). Returns the rank it holds."""
    rank, field = options.rank_of(module)
    if part.startswith("lora_embedding"):
        vocabulary, hidden = base_shape
        expected = [rank, vocabulary] if part == "lora_embedding_A" else [hidden, rank]
    else:
        out_features, in_features = base_shape
        expected = [rank, in_features] if part == "lora_A" else [out_features, rank]
    rank_axis = 0 if part.endswith("A") else 1
    if len(shape) != 2 or shape[1 - rank_axis] != expected[1 - rank_axis]:
        raise AdapterInvalid(f"{name} has shape {shape}, the base model needs {expected} (wrong base model?)")
    if shape[rank_axis] != rank:
        param = "rank_pattern" if field != "r" else "r"
        raise AdapterInvalid(f"{name} has rank {shape[rank_axis]}, but adapter_config.json gives {module} rank {rank} "
                             f"({field})", param)  # fmt: skip
    return rank


def _refuse_tied_head(name: str, config: dict[str, Any]) -> None:
    """A LoRA on lm_head of a base model that ties lm_head to its embedding (no lm_head weight of its own)."""
    why = "PEFT's ensure_weight_tying put it there" if config.get("ensure_weight_tying") else "it targets lm_head"
    raise AdapterInvalid(
        f"{name}: a LoRA on lm_head, which this base model ties to its embedding ({why}); loraplex does not serve "
        "a LoRA on a tied lm_head yet (train without lm_head in target_modules, and ensure_weight_tying false)",
        "ensure_weight_tying" if config.get("ensure_weight_tying") else "target_modules",
    )


def _check_saved_embedding(weights: Path, name: str, base_model: Path | None) -> None:
    """The embedding's own weights saved beside its LoRA must equal the base model's (in the saved dtype): PEFT loads
    them over the base model's embedding, vLLM skips them, so different ones (a resized or trained vocabulary) would
    be served as the base model's."""
    import torch
    from safetensors import safe_open

    module = engine_name(name).removesuffix(".base_layer.weight")
    base = None
    for file in sorted(base_model.glob("*.safetensors")) if base_model is not None else ():
        with safe_open(file, framework="pt") as handle:
            if f"{module}.weight" in handle.keys():  # noqa: SIM118 (safe_open has no __contains__)
                base = handle.get_tensor(f"{module}.weight")
                break
    with safe_open(weights, framework="pt") as handle:
        saved = handle.get_tensor(name)
    if base is None:
        where = "the base model has no" if base_model is not None else "no base model folder to compare it with"
        raise AdapterInvalid(f"{name}: the adapter saved {module}'s own weights, and {where} {module}.weight",
                             "target_modules")  # fmt: skip
    if base.shape != saved.shape or not torch.equal(base.to(saved.dtype), saved):
        raise AdapterInvalid(
            f"{name}: the adapter saved {module}'s own weights and they differ from the base model's; PEFT would load "
            "them over the base model's, vLLM 0.32 ignores them (a resized or trained vocabulary is not served)",
            "target_modules",
        )
