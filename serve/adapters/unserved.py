"""The PEFT options loraplex does not serve yet, each refused at registration by its own name.

vLLM 0.32 fails on some of them when it loads the adapter (trainable tokens), and
silently serves others wrong (`modules_to_save` naming a LoRA'd module drops its LoRA, `layer_replication` and
activated LoRA change which layers or tokens the LoRA applies to): either way the adapter is refused here, with the
`adapter_config.json` field as the error's `param`, before anything is recorded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

Refusal = tuple[str, str]
"""Why an adapter is refused, and the field at fault (`AdapterInvalid`'s message and `param`)."""


@dataclass(frozen=True)
class Unserved:
    """A PEFT option: its `adapter_config.json` field, what it is in words, and the marks its tensors' names carry."""

    field: str
    what: str
    marks: tuple[str, ...] = ()


UNSERVED = (
    Unserved("modules_to_save", "whole modules trained and saved beside the LoRA",
             (".modules_to_save.", ".original_module.")),
    Unserved("trainable_token_indices", "trained rows of the embedding (trainable tokens)",
             (".trainable_tokens_delta",)),
    Unserved("layer_replication", "layers repeated to deepen the model"),
    Unserved("alora_invocation_tokens", "activated LoRA (on only after its invocation tokens)"),
)  # fmt: skip
EMBEDDING_LEAVES = ("embed_tokens", "lm_head")


def unserved(config: dict[str, Any], tensors: dict[str, list[int]], base: dict[str, list[int]]) -> Refusal | None:
    """The first option of `UNSERVED` that `config` sets or `tensors` carry, or a vocabulary the adapter resized
    (`resized_vocabulary`), as a refusal; None: none of them."""
    for option in UNSERVED:
        value = config.get(option.field)
        marked = [name for name in tensors if any(mark in name for mark in option.marks)]
        if not value and not marked:
            continue
        said = f"adapter_config.json has {option.field}={json.dumps(value)}" if value else "its config does not say so"
        carried = f"; tensors such as {marked[0]!r}" if marked else ""
        message = (f"{option.field}: {option.what} is not served yet ({said}{carried}); train the adapter without "
                   f"{option.field}, or merge it into the base model")  # fmt: skip
        return message, option.field
    return resized_vocabulary(tensors, base)


def resized_vocabulary(tensors: dict[str, list[int]], base: dict[str, list[int]]) -> Refusal | None:
    """An adapter that saved an embedding (or its LoRA) with rows for a vocabulary other than the base model's: its
    tokenizer added tokens, and vLLM 0.32 serves the base model's vocabulary only. `param` is `vocab_size`, the base
    model's config field that resizing changes (PEFT's config has no field for it)."""
    embedding = next((shape for module, shape in base.items() if module.rsplit(".", 1)[-1] == "embed_tokens"), None)
    if embedding is None:
        return None
    vocabulary, hidden = embedding
    for name, shape in tensors.items():
        leaf = name.rsplit(".", 1)[0].removesuffix(".base_layer").rsplit(".", 1)[-1]  # `embed_tokens`, `lora_A`
        if name.endswith(".lora_embedding_A") and len(shape) == 2:
            rows = shape[1]
        elif leaf in EMBEDDING_LEAVES and name.endswith(".weight") and shape[1:] == [hidden]:
            rows = shape[0]
        else:
            continue
        if rows != vocabulary:
            message = (f"vocab_size: {name} is sized for a vocabulary of {rows} tokens, the base model's has "
                       f"{vocabulary}: the adapter's tokenizer added tokens (a resized vocabulary), which is not "
                       "served yet; vLLM 0.32 serves the base model's vocabulary")  # fmt: skip
            return message, "vocab_size"
    return None
