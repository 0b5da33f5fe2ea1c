"""Which module of the base model each tensor of an adapter lands on, read as vLLM 0.32 reads tensor names.

vLLM drops `base_model.model.` (every occurrence, when the name starts with it: `parse_fine_tuned_lora_name` in
`vllm/lora/utils.py`) and looks the rest up by whole module name when it activates the adapter; at load it checks
only the name's last segment (`q_proj`). A tensor under any other prefix (`language_model.model.layers...`,
`base_model.model.layers...`) is loaded and applied to no module: the adapter answers as the base model (vLLM
issues #34186, #48019, #55193). `relocated` finds the module such a name meant, so a refusal can say what to rename.
"""

from __future__ import annotations

from collections.abc import Collection

PEFT_PREFIX = "base_model.model."
LORA_SUFFIXES = (
    ("lora_A", ".lora_A.weight"),
    ("lora_B", ".lora_B.weight"),
    ("lora_bias", ".lora_B.bias"),
    ("lora_magnitude", ".lora_magnitude_vector"),
    ("lora_embedding_A", ".lora_embedding_A"),
    ("lora_embedding_B", ".lora_embedding_B"),
)
SAVED_EMBEDDING_WEIGHTS = (".embed_tokens.base_layer.weight", ".lm_head.base_layer.weight")
"""The base weights PEFT saves beside an embedding's LoRA, which vLLM skips (`vllm/lora/utils.py`
`is_base_embedding_weights`) and PEFT loads over the base model's."""


def engine_name(name: str) -> str:
    """`name` as vLLM 0.32 reads it: without `base_model.model.`, every occurrence of it when `name` starts with it."""
    return name.replace(PEFT_PREFIX, "") if name.startswith(PEFT_PREFIX) else name


def split(name: str) -> tuple[str | None, str]:
    """`base_model.model.<module>.lora_A.weight` → (`<module>`, `lora_A`), `<module>.lora_B.bias` → (`<module>`,
    `lora_bias`), `<module>.lora_magnitude_vector` → (`<module>`, `lora_magnitude`), `...embed_tokens.lora_embedding_B`
    → (`...embed_tokens`, `lora_embedding_B`), `...embed_tokens.base_layer.weight` → (`...embed_tokens`, `base_layer`);
    (None, "") for other tensors. `<module>` is the name vLLM looks the LoRA up by."""
    read = engine_name(name)
    for part, suffix in LORA_SUFFIXES:
        if read.endswith(suffix):
            return read.removesuffix(suffix), part
    if name.endswith(SAVED_EMBEDDING_WEIGHTS):  # vLLM skips these by the whole name's suffix
        return read.removesuffix(".base_layer.weight"), "base_layer"
    return None, ""


def relocated(module: str, base: Collection[str]) -> str | None:
    """The base model's module that `module` names under another prefix (`language_model.model.layers.0.mlp.up_proj`
    or `layers.0.mlp.up_proj` → `model.layers.0.mlp.up_proj`), or None when it names none."""
    parts = module.split(".")
    for start in range(len(parts)):
        tail = ".".join(parts[start:])
        for candidate in (tail, f"model.{tail}"):
            if candidate != module and candidate in base:
                return candidate
    return None


def misplaced_message(names: list[tuple[str, str, str, str]]) -> str:
    """Why tensors whose modules `relocated` found elsewhere are refused: `names` holds (tensor, the module vLLM
    would look up, the base model's module, the part `split` found) for each."""
    name, module, target, part = names[0]
    suffix = dict(LORA_SUFFIXES).get(part, ".base_layer.weight")
    listed = ", ".join(repr(n) for n, *_ in names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    return (
        f"{len(names)} tensors are named under a prefix vLLM 0.32 does not map onto this base model's modules: it "
        f"would load them and apply them to no module, so the adapter would answer as the base model. {name!r} is "
        f"read as module {module!r}; the base model's is {target!r}, which PEFT's layout names "
        f"{PEFT_PREFIX + target + suffix!r}. loraplex does not rename tensors: save the adapter with PEFT's names "
        f"(the tensors: {listed})"
    )
