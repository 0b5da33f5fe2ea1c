"""The PEFT options that add tensors beside a linear layer's LoRA A/B, checked at registration as PEFT loads them:
a bias on lora_B (`lora_bias`, added per slot by serve/vllm_lora_bias.py) and DoRA's per-channel magnitude
(`use_dora`, folded at load and applied per slot by serve/vllm_dora.py). Each refusal names the config field.
"""

from __future__ import annotations

from typing import Any

from serve.adapters.unserved import EMBEDDING_LEAVES, Refusal

LORA_BIAS_OPTION = "lora_bias: lora_B.bias added to the adapter's tokens"
"""The `options` entry of an adapter trained with `lora_bias` (its lora_B has a bias)."""

DORA_OPTION = "use_dora: per-channel magnitude, computed at load against the base weights, applied per slot"
"""The `options` entry of a DoRA adapter (`use_dora`: a `lora_magnitude_vector` on each LoRA'd linear layer)."""


def bias_shape_refusal(name: str, shape: list[int], base_shape: list[int]) -> Refusal | None:
    """A lora_B.bias is one value per output of the base layer (out, in)."""
    if shape != base_shape[:1]:
        return (f"{name} has shape {shape}, the base model needs {base_shape[:1]} (one value per output of the layer; "
                "wrong base model?)", "lora_bias")  # fmt: skip
    return None


def lora_bias_refusal(config: dict[str, Any], biased: tuple[str, ...], unbiased: tuple[str, ...]) -> Refusal | None:
    """`lora_bias` and the biases saved must agree, as PEFT loads them: without the flag PEFT's lora_B has no bias
    and ignores saved ones; with it, each LoRA'd linear layer has one, and PEFT saves them all. `biased`: the modules
    whose lora_B has a bias; `unbiased`: the linear modules whose lora_B has none."""
    flag = config.get("lora_bias", False)
    if not isinstance(flag, bool):
        return f"adapter_config.json has lora_bias {flag!r}; true or false", "lora_bias"
    if biased and not flag:
        return (f"tensors such as '{biased[0]}.lora_B.bias' carry a bias on LoRA's B, but adapter_config.json does "
                "not set lora_bias: PEFT would ignore them", "lora_bias")  # fmt: skip
    if flag and unbiased:
        return (f"adapter_config.json sets lora_bias, but {unbiased[0]} has no lora_B.bias (PEFT saves one for every "
                "LoRA'd layer)", "lora_bias")  # fmt: skip
    return None


def magnitude_refusal(name: str, shape: list[int], module: str, base_shape: list[int]) -> Refusal | None:
    """A `lora_magnitude_vector` is one value per output of a linear layer (out, in); DoRA on the embedding (or on
    lm_head, which vLLM's logits LoRA layer serves) is not served."""
    leaf = module.rsplit(".", 1)[-1]
    if leaf in EMBEDDING_LEAVES:
        return (f"use_dora: DoRA on {leaf} ({name}) is not served: loraplex scales the outputs of linear LoRA layers "
                f"per slot, and vLLM's {leaf} LoRA layer has no such step; train with use_dora but without {leaf} in "
                "target_modules", "use_dora")  # fmt: skip
    if shape != base_shape[:1]:
        return (f"{name} has shape {shape}, the base model needs {base_shape[:1]} (one magnitude per output of the "
                "layer; wrong base model?)", "use_dora")  # fmt: skip
    return None


def dora_refusal(config: dict[str, Any], magnitudes: tuple[str, ...], plain: tuple[str, ...],
         embeddings: tuple[str, ...]) -> Refusal | None:  # fmt: skip
    """`use_dora` and the magnitudes saved must agree, as PEFT loads them: without the flag PEFT has no magnitude and
    ignores saved ones; with it, every LoRA'd layer has one, and PEFT saves them all. `magnitudes`: the modules with a
    magnitude; `plain`: the linear modules with a LoRA and no magnitude; `embeddings`: the embedding modules with a
    LoRA (PEFT gives them DoRA too)."""
    flag = config.get("use_dora", False)
    if not isinstance(flag, bool):
        return f"adapter_config.json has use_dora {flag!r}; true or false", "use_dora"
    if magnitudes and not flag:
        return (f"tensors such as '{magnitudes[0]}.lora_magnitude_vector' carry DoRA magnitudes, but "
                "adapter_config.json does not set use_dora: PEFT would ignore them", "use_dora")  # fmt: skip
    if not flag:
        return None
    if config.get("lora_bias"):
        return ("use_dora with lora_bias: PEFT refuses the pair (its LoraConfig: lora_bias is not supported for "
                "DoRA), so no adapter trained by PEFT carries both", "use_dora")  # fmt: skip
    if embeddings:
        leaf = embeddings[0].rsplit(".", 1)[-1]
        return (f"use_dora: DoRA on {leaf} ({embeddings[0]}) is not served: loraplex scales the outputs of linear "
                f"LoRA layers per slot, and vLLM's {leaf} LoRA layer has no such step; train with use_dora but "
                f"without {leaf} in target_modules", "use_dora")  # fmt: skip
    if plain:
        return (f"adapter_config.json sets use_dora, but {plain[0]} has no lora_magnitude_vector (PEFT saves one for "
                "every LoRA'd layer)", "use_dora")  # fmt: skip
    return None
