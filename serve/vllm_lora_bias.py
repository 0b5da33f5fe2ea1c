"""PEFT's `lora_bias` served in vLLM 0.32: a LoRA whose B carries a bias, added to its adapter's tokens only.

With `lora_bias: true` PEFT's lora_B is a Linear with a bias, so a layer's output gains `scaling * lora_B.bias` on
every token of that adapter, and nothing on base tokens or another adapter's. vLLM 0.32 refuses such adapters
(`PEFTHelper`: "vLLM does not support LoRA bias") and its loader has nowhere to put the vector. Installed by
`serve.vllm_patches.register` in every vLLM process:
- loading: `<module>.lora_B.bias` is read into the module's `LoRALayerWeights.output_bias` with its scaling applied
  (what the output gains), carried through the packing of q/k/v and gate/up (one vector per slice), and PEFTHelper's
  refusal is lifted for `lora_bias` only; an adapter whose biases would land on a layer this cannot serve (not a
  linear LoRA layer, tensor parallelism, another width) fails its load, before it takes a slot;
- layers: every linear LoRA layer holds `lora_output_bias`, (max_loras + 1, output width) zeros; activating an
  adapter into slot i writes its vectors (or zeros) into row i, and after the LoRA product each token adds the row of
  its slot, read from the punica wrapper's per-token slot indices. The last row stays zero: base tokens (slot -1)
  pick it. Plain torch ops, so the same on any device. Run eagerly, a layer none of whose slots holds a bias skips
  the step; traced (torch.compile) or captured (CUDA graphs), it always runs, so the graph holds it.
Turned off only with the rest of the plugin: an adapter with `lora_bias` is then refused by vLLM at load.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("loraplex.vllm_lora_bias")
BIAS_SUFFIX = ".lora_B.bias"
BUFFER = "lora_output_bias"
"""The per-slot output vectors of a linear LoRA layer: row i for slot i, the last row zero (base tokens)."""
HELD = "_loraplex_bias_slots"
"""The slots of a layer whose row is not zero."""


def install() -> None:
    """Patches vLLM's LoRA loading, packing, manager and linear layers (see the module docstring); idempotent."""
    from vllm.lora import lora_model, model_manager, peft_helper
    from vllm.lora.layers import base_linear
    from vllm.lora.lora_weights import PackedLoRALayerWeights

    if getattr(peft_helper.PEFTHelper._validate_features, "_loraplex_bias", False):
        return
    manager = model_manager.LoRAModelManager
    layer = base_linear.BaseLinearLayerWithLoRA
    patched: list[tuple[Any, str, Any]] = [
        (peft_helper.PEFTHelper, "_validate_features", _features_but_bias(peft_helper.PEFTHelper._validate_features)),
        (lora_model, "parse_fine_tuned_lora_name", _parse_bias_as_b(lora_model.parse_fine_tuned_lora_name)),
        (lora_model.LoRAModel, "from_lora_tensors",
         classmethod(_reading_biases(vars(lora_model.LoRAModel)["from_lora_tensors"].__func__))),
        (PackedLoRALayerWeights, "pack", classmethod(_packing_biases(vars(PackedLoRALayerWeights)["pack"].__func__))),
        (manager, "_create_lora_modules", _with_buffers(manager._create_lora_modules)),
        (manager, "_create_merged_loras_inplace", _checking_biases(manager._create_merged_loras_inplace)),
        (manager, "activate_adapter", _writing_biases(manager.activate_adapter)),
        (layer, "_apply_lora_to_output", _adding_bias(layer._apply_lora_to_output)),
        (layer, "_apply_async_impl", _adding_bias(layer._apply_async_impl)),
    ]  # fmt: skip
    for owner, name, function in patched:
        target: Any = function.__func__ if isinstance(function, classmethod) else function
        target._loraplex_bias = True
        setattr(owner, name, function)
    logger.debug("loraplex: LoRA biases (lora_bias) read, packed and added per slot")


# Loading: the bias tensors read, scaled and packed.


def _features_but_bias(validate: Callable[[Any], list[str]]) -> Callable[[Any], list[str]]:
    return lifting_refusal(validate, "lora_bias")


def lifting_refusal(validate: Callable[[Any], list[str]], field: str) -> Callable[[Any], list[str]]:
    """PEFTHelper's feature check, run as if the config's `field` were off (the plugin serves it)."""

    @functools.wraps(validate)
    def _validate_features(self: Any) -> list[str]:
        return validate(dataclasses.replace(self, **{field: False}) if getattr(self, field) else self)

    return _validate_features


def _parse_bias_as_b(parse: Callable[..., tuple[str, bool]]) -> Callable[..., tuple[str, bool]]:
    return parsing_as_b(parse, BIAS_SUFFIX)


def parsing_as_b(parse: Callable[..., tuple[str, bool]], suffix: str) -> Callable[..., tuple[str, bool]]:
    """The loader's name check: `<module><suffix>` names the module `<module>.lora_B.weight` does."""

    @functools.wraps(parse)
    def parse_fine_tuned_lora_name(name: str, *args: Any, **kwargs: Any) -> tuple[str, bool]:
        as_b = name.removesuffix(suffix) + ".lora_B.weight" if name.endswith(suffix) else name
        return parse(as_b, *args, **kwargs)

    return parse_fine_tuned_lora_name


def _reading_biases(from_tensors: Callable[..., Any]) -> Callable[..., Any]:
    def keep(lora: Any, bias: torch.Tensor) -> None:
        import torch

        scaled = bias.to(torch.float32) * lora.scaling  # as the weights: on their device, in their dtype
        lora.output_bias = scaled.to(device=lora.lora_b.device, dtype=lora.lora_b.dtype)

    return reading_vectors(from_tensors, BIAS_SUFFIX, "a LoRA bias", keep)


def reading_vectors(from_tensors: Callable[..., Any], suffix: str, what: str,
                    keep: Callable[[Any, torch.Tensor], None]) -> Callable[..., Any]:  # fmt: skip
    """vLLM's loading of an adapter's tensors, the `<module><suffix>` vectors (one value per row of the module's
    lora_B) set aside and each handed to `keep(its module's LoRALayerWeights, vector)` once the rest is loaded; a
    vector without its lora_B, or of another length, fails the load."""

    @functools.wraps(from_tensors)
    def from_lora_tensors(cls: type, lora_model_id: int, tensors: dict[str, torch.Tensor], *args: Any,
                          **kwargs: Any) -> Any:  # fmt: skip
        from vllm.lora.lora_model import parse_fine_tuned_lora_name

        vectors = {name: tensors[name] for name in tensors if name.endswith(suffix)}
        weights = {name: tensor for name, tensor in tensors.items() if name not in vectors}
        model = from_tensors(cls, lora_model_id, weights, *args, **kwargs)
        bound = inspect.signature(from_tensors).bind(cls, lora_model_id, weights, *args, **kwargs)
        mapper = bound.arguments.get("weights_mapper")
        for name, vector in vectors.items():
            module, _ = parse_fine_tuned_lora_name(name, mapper)
            lora = model.loras.get(module)
            if lora is None or lora.lora_b is None:
                raise ValueError(f"{name}: {what} without the lora_B weight of its module {module}")
            if vector.dim() != 1 or vector.shape[0] != lora.lora_b.shape[0]:
                raise ValueError(f"{name} has shape {list(vector.shape)}; its lora_B has {lora.lora_b.shape[0]} rows")
            keep(lora, vector)
        return model

    return from_lora_tensors


def _packing_biases(pack: Callable[..., Any]) -> Callable[..., Any]:
    return packing_slices(pack, "output_bias")


def packing_slices(pack: Callable[..., Any], attribute: str) -> Callable[..., Any]:
    """vLLM's packing of q/k/v or gate/up weights, carrying each slice's `attribute` (None where it has none) as a
    list on the packed weights, when any slice has one."""

    @functools.wraps(pack)
    def packed(cls: type, loras: Any, *args: Any, **kwargs: Any) -> Any:
        result = pack(cls, loras, *args, **kwargs)
        held = [getattr(lora, attribute, None) for lora in loras]
        if any(value is not None for value in held):
            setattr(result, attribute, held)
        return result

    return packed


def bias_numel(loras: Iterable[Any]) -> int:
    """How many bias values the weights `loras` carry (a packed layer's, slice by slice)."""
    return slices_numel(loras, "output_bias")


def slices_numel(loras: Iterable[Any], attribute: str) -> int:
    """How many values of `attribute` the weights `loras` carry (a packed layer's, slice by slice)."""
    total = 0
    for lora in loras:
        held = getattr(lora, attribute, None)
        for value in held if isinstance(held, list) else [held]:
            total += 0 if value is None else int(value.numel())
    return total


# The manager: buffers made with the layers, biases checked at load, written at activation.


def _with_buffers(create: Callable[[Any], None]) -> Callable[[Any], None]:
    return with_buffers(create, give_buffer)


def with_buffers(create: Callable[[Any], None], give: Callable[[Any, int], None]) -> Callable[[Any], None]:
    """vLLM's creation of the LoRA layers, then `give(layer, slots)` for each linear LoRA layer."""

    @functools.wraps(create)
    def _create_lora_modules(self: Any) -> None:
        from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA

        create(self)
        for module in self.modules.values():
            if isinstance(module, BaseLinearLayerWithLoRA) and hasattr(module, "lora_b_stacked"):
                give(module, self.lora_slots)

    return _create_lora_modules


def give_buffer(layer: Any, slots: int) -> None:
    """`layer` (a linear LoRA layer whose LoRA buffers exist) gets its per-slot output vectors, all zero."""
    zero_rows(layer, slots, BUFFER, HELD)


def zero_rows(layer: Any, slots: int, buffer: str, held: str) -> None:
    """`layer`'s `buffer`: (slots + 1, output width) zeros in its LoRA weights' dtype, and `held`, its slots that are
    not zero (none)."""
    import torch

    width = sum(layer.output_slices)
    dtype = layer.lora_b_stacked[0].dtype
    layer.__dict__[buffer] = torch.zeros(slots + 1, width, dtype=dtype, device=layer.device)
    layer.__dict__[held] = set()


def _checking_biases(merge: Callable[[Any, Any], None]) -> Callable[[Any, Any], None]:
    """Every bias of an adapter must reach a layer that adds it: else the load fails, before the adapter is used."""

    @functools.wraps(merge)
    def _create_merged_loras_inplace(self: Any, lora_model: Any) -> None:
        loaded = bias_numel(lora_model.loras.values())
        merge(self, lora_model)
        if loaded == 0:
            return
        if bias_numel(lora_model.loras.values()) != loaded:
            raise ValueError(f"LoRA {lora_model.id}: a lora_bias on a module vLLM packs in a way loraplex does not "
                             "carry (fused MoE experts?); not served")  # fmt: skip
        for name, lora in lora_model.loras.items():
            if getattr(lora, "output_bias", None) is not None:
                output_vector(self.modules.get(name), lora, name)  # raises if it cannot be served

    return _create_merged_loras_inplace


def _writing_biases(activate: Callable[[Any, int], bool]) -> Callable[[Any, int], bool]:
    return writing_slots(activate, BUFFER, write_slot)


def writing_slots(activate: Callable[[Any, int], bool], buffer: str,
                  write: Callable[[Any, int, Any, str], None]) -> Callable[[Any, int], bool]:  # fmt: skip
    """vLLM's activation of an adapter into a slot, then `write(layer, slot, its weights there or None, name)` for
    each layer that holds `buffer`."""

    @functools.wraps(activate)
    def activate_adapter(self: Any, lora_id: int) -> bool:
        activated = activate(self, lora_id)
        if activated:
            index = self.lora_index_to_id.index(lora_id)
            lora_model = self._registered_adapters[lora_id]
            for name, module in self.modules.items():
                if buffer in module.__dict__:
                    write(module, index, self._get_lora_layer_weights(lora_model, name), name)
        return bool(activated)

    return activate_adapter


def output_vector(layer: Any, lora: Any, name: str) -> torch.Tensor | None:
    """What `lora` (a layer's LoRALayerWeights, packed or not, or None) adds to each of its tokens' outputs of
    `layer`, across the layer's slices; None: nothing. ValueError when `layer` cannot add it."""
    import torch

    held = getattr(lora, "output_bias", None)
    if held is None:
        return None
    stacked = None if layer is None else layer.__dict__.get(BUFFER)
    if stacked is None:
        raise ValueError(f"{name}: a lora_bias on a module that is not a linear LoRA layer; not served")
    if layer.tp_size > 1:
        raise ValueError(f"{name}: lora_bias is not served with tensor parallelism (the layer's output is sharded)")
    slices = held if isinstance(held, list) else [held]
    widths = list(layer.output_slices) if len(slices) == len(layer.output_slices) else [None] * len(slices)
    parts = []
    for bias, width in zip(slices, widths, strict=True):
        if bias is not None:
            parts.append(bias.to(stacked.dtype).cpu())
        elif width is not None:
            parts.append(torch.zeros(width, dtype=stacked.dtype))
        else:
            raise ValueError(f"{name}: a lora_bias on some slices of a layer packed as vLLM splits it differently")
    vector = torch.cat(parts)
    if vector.shape[0] != stacked.shape[1]:
        raise ValueError(f"{name}: lora_bias of {vector.shape[0]} values, the layer's output has {stacked.shape[1]}")
    return vector


def write_slot(layer: Any, index: int, lora: Any, name: str = "") -> None:
    """Slot `index` of `layer` now holds `lora` (None: no LoRA on this layer): its output vector, or zeros."""
    vector = output_vector(layer, lora, name)
    held: set[int] = layer.__dict__[HELD]
    stacked = layer.__dict__[BUFFER]
    if vector is not None:
        stacked[index].copy_(vector, non_blocking=True)
        held.add(index)
    elif index in held:
        stacked[index].zero_()
        held.discard(index)


# The forward: each token's row added after the LoRA product.


def _adding_bias(apply: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    @functools.wraps(apply)
    def with_bias(self: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        return add_slot_bias(self, apply(self, *args, **kwargs))

    return with_bias


def add_slot_bias(layer: Any, output: torch.Tensor) -> torch.Tensor:
    """`output` (tokens, width), or (1, tokens, width), with each token's slot's row of `layer`'s biases added."""
    stacked = layer.__dict__.get(BUFFER)
    if stacked is None or (not layer.__dict__[HELD] and not traced()):
        return output
    flat = output.view(-1, output.shape[-1])
    flat.add_(stacked[token_slots(layer, flat.shape[0], stacked.shape[0])].to(flat.dtype))
    return output


def token_slots(layer: Any, tokens: int, rows: int) -> torch.Tensor:
    """The slot of each of a step's first `tokens` tokens in `layer` (a linear LoRA layer), read from its punica
    wrapper, as row indices into a per-slot buffer of `rows` rows whose last row is zero: base tokens (slot -1) pick
    it. Indices past the step's tokens (graph padding) are clamped, not read."""
    indices: torch.Tensor = layer.punica_wrapper._token_lora_indices[:tokens]
    return indices.clamp(-1, rows - 2)


def traced() -> bool:
    """True while torch.compile traces or a CUDA graph is captured: the step must then be in the graph."""
    import torch

    if torch.compiler.is_compiling():
        return True
    return bool(torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())
