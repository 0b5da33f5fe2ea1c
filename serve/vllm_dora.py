"""PEFT's DoRA (`use_dora`) served in vLLM 0.32: a per-output-channel magnitude over base + LoRA, on its adapter's
tokens only.

For a linear layer with weight W (out x in), bias b, LoRA A (r x in), B (out x r), scale s and DoRA's magnitude m
(out), PEFT's output at inference is (`peft/tuners/lora/dora.py` DoraLinearLayer.forward, dropout off, b not scaled)

    y = W x + b + (g - 1) * (W x) + g * (s B A x),    g = m / ||W + s B A||, a norm per output channel (row).

g depends on the weights only, so it is computed once, when the adapter is loaded. vLLM 0.32 refuses DoRA
(`PEFTHelper`: "vLLM does not yet support DoRA"). Installed by `serve.vllm_patches.register` in every vLLM process:
- g without the base weight: vLLM's CPU path packs each linear layer's weight for its GEMM and drops `weight`
  (`dispatch_cpu_unquantized_gemm(remove_weight=True)`), so g is computed through the layer's own forward, on any
  device: ||W_i + s B_i A||^2 = ||W_i||^2 + 2 s B_i (W A^T)_i + s^2 ||B_i A||^2, where ||W_i||^2 is recorded for every
  unquantized linear layer when vLLM finishes loading it (before its weight is packed; `out` floats per layer) and
  W A^T is the base layer applied to A's r rows without its bias; the rest is float32 torch ops. A layer whose norms
  were not recorded (a quantized method: PEFT would dequantize W) fails the load rather than guess;
- loading: `<module>.lora_magnitude_vector` is read beside its LoRA into `LoRALayerWeights.dora_magnitude`, carried
  through the packing of q/k/v and gate/up (one per slice), and PEFTHelper's refusal is lifted for `use_dora` only.
  Once vLLM's manager has packed and scaled the adapter, g is computed slice by slice, folded into B (so the LoRA
  product is g * s B A x) and g - 1 kept as the adapter's `output_scale`. An adapter whose magnitudes would land on a
  layer this cannot serve (not a linear LoRA layer, tensor parallelism, dual CUDA streams, no recorded norms, another
  width) fails its load, before it takes a slot;
- layers: every linear LoRA layer holds `lora_output_scale`, (max_loras + 1, output width) zeros; activating an
  adapter into slot i writes its g - 1 (or zeros) into row i, and each token adds its slot's row times the base
  output without its bias (W x) after the LoRA product. The last row stays zero: base tokens (slot -1) pick it. Run
  eagerly, a layer none of whose slots holds a scale skips the step; traced or captured, it always runs.
Turned off only with the rest of the plugin: an adapter with `use_dora` is then refused by vLLM at load.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from serve.vllm_lora_bias import (
    lifting_refusal,
    packing_slices,
    parsing_as_b,
    reading_vectors,
    slices_numel,
    token_slots,
    traced,
    with_buffers,
    writing_slots,
    zero_rows,
)

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("loraplex.vllm_dora")
MAGNITUDE_SUFFIX = ".lora_magnitude_vector"
ROW_NORMS = "_loraplex_row_norms"
"""||W_i||^2 of a linear layer's weight, float32, recorded when vLLM finishes loading the layer."""
BUFFER = "lora_output_scale"
"""The per-slot g - 1 of a linear LoRA layer: row i for slot i, the last row zero (base tokens)."""
HELD = "_loraplex_scale_slots"
"""The slots of a layer whose row is not zero."""


def install() -> None:
    """Patches vLLM's linear layers' loading, its LoRA loading, packing, manager and linear LoRA layers (see the
    module docstring); idempotent."""
    from vllm.lora import lora_model, model_manager, peft_helper
    from vllm.lora.layers import base_linear
    from vllm.lora.lora_weights import PackedLoRALayerWeights
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    if getattr(UnquantizedLinearMethod.process_weights_after_loading, "_loraplex_dora", False):
        return
    manager = model_manager.LoRAModelManager
    layer = base_linear.BaseLinearLayerWithLoRA
    patched: list[tuple[Any, str, Any]] = [
        (UnquantizedLinearMethod, "process_weights_after_loading",
         _recording_norms(UnquantizedLinearMethod.process_weights_after_loading)),
        (peft_helper.PEFTHelper, "_validate_features", _features_but_dora(peft_helper.PEFTHelper._validate_features)),
        (lora_model, "parse_fine_tuned_lora_name", _parse_magnitude_as_b(lora_model.parse_fine_tuned_lora_name)),
        (lora_model.LoRAModel, "from_lora_tensors",
         classmethod(_reading_magnitudes(vars(lora_model.LoRAModel)["from_lora_tensors"].__func__))),
        (PackedLoRALayerWeights, "pack",
         classmethod(_packing_magnitudes(vars(PackedLoRALayerWeights)["pack"].__func__))),
        (manager, "_create_lora_modules", _with_buffers(manager._create_lora_modules)),
        (manager, "_create_merged_loras_inplace", _folding_magnitudes(manager._create_merged_loras_inplace)),
        (manager, "activate_adapter", _writing_scales(manager.activate_adapter)),
        (layer, "_apply_sync", _scaling_sync(layer._apply_sync)),
        (layer, "_apply_base_forward", _scaling_base_forward(layer._apply_base_forward)),
    ]  # fmt: skip
    for owner, name, function in patched:
        target: Any = function.__func__ if isinstance(function, classmethod) else function
        target._loraplex_dora = True
        setattr(owner, name, function)
    logger.debug("loraplex: DoRA magnitudes (use_dora) read, folded at load and applied per slot")


# Loading: the base layers' row norms recorded; the magnitudes read and packed.


def _recording_norms(process: Callable[[Any, Any], None]) -> Callable[[Any, Any], None]:
    @functools.wraps(process)
    def process_weights_after_loading(self: Any, layer: Any) -> None:
        record_row_norms(layer)
        process(self, layer)

    return process_weights_after_loading


def record_row_norms(layer: Any) -> None:
    """Keeps ||W_i||^2 of `layer`'s 2-D float weight (each output channel's), before vLLM may pack or drop it."""
    import torch

    weight = getattr(layer, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2 and not weight.is_meta and weight.is_floating_point():
        layer.__dict__[ROW_NORMS] = torch.linalg.vector_norm(weight.detach(), dim=1, dtype=torch.float32).square()


def _features_but_dora(validate: Callable[[Any], list[str]]) -> Callable[[Any], list[str]]:
    return lifting_refusal(validate, "use_dora")


def _parse_magnitude_as_b(parse: Callable[..., tuple[str, bool]]) -> Callable[..., tuple[str, bool]]:
    return parsing_as_b(parse, MAGNITUDE_SUFFIX)


def _reading_magnitudes(from_tensors: Callable[..., Any]) -> Callable[..., Any]:
    def keep(lora: Any, magnitude: torch.Tensor) -> None:
        import torch

        lora.dora_magnitude = magnitude.to(device=lora.lora_b.device, dtype=torch.float32)

    return reading_vectors(from_tensors, MAGNITUDE_SUFFIX, "a DoRA magnitude", keep)


def _packing_magnitudes(pack: Callable[..., Any]) -> Callable[..., Any]:
    return packing_slices(pack, "dora_magnitude")


def magnitude_numel(loras: Iterable[Any]) -> int:
    """How many magnitude values the weights `loras` carry (a packed layer's, slice by slice)."""
    return slices_numel(loras, "dora_magnitude")


# The manager: buffers made with the layers, g computed and folded at load, written at activation.


def _with_buffers(create: Callable[[Any], None]) -> Callable[[Any], None]:
    return with_buffers(create, give_buffer)


def give_buffer(layer: Any, slots: int) -> None:
    """`layer` (a linear LoRA layer whose LoRA buffers exist) gets its per-slot output scales, all zero."""
    zero_rows(layer, slots, BUFFER, HELD)


def _folding_magnitudes(merge: Callable[[Any, Any], None]) -> Callable[[Any, Any], None]:
    """After vLLM's packing and scaling, each module's g is folded into its B; a magnitude that would not reach a
    layer that applies it fails the load, before the adapter is used."""

    @functools.wraps(merge)
    def _create_merged_loras_inplace(self: Any, lora_model: Any) -> None:
        loaded = magnitude_numel(lora_model.loras.values())
        merge(self, lora_model)
        if loaded == 0:
            return
        if magnitude_numel(lora_model.loras.values()) != loaded:
            raise ValueError(f"LoRA {lora_model.id}: a DoRA magnitude on a module vLLM packs in a way loraplex does "
                             "not carry (fused MoE experts?); not served")  # fmt: skip
        for name, lora in lora_model.loras.items():
            if getattr(lora, "dora_magnitude", None) is not None:
                fold_magnitudes(self.modules.get(name), lora, name)

    return _create_merged_loras_inplace


def check_servable(layer: Any, name: str) -> None:
    """ValueError naming why `layer` cannot apply a DoRA magnitude; None when it can."""
    if layer is None or BUFFER not in layer.__dict__:
        raise ValueError(f"{name}: a DoRA magnitude on a module that is not a linear LoRA layer; not served")
    if layer.tp_size > 1:
        raise ValueError(f"{name}: DoRA is not served with tensor parallelism (its weight norms are sharded)")
    if getattr(layer, "_enable_aux_cuda_stream", False):
        raise ValueError(f"{name}: DoRA is not served with VLLM_LORA_ENABLE_DUAL_STREAM (the LoRA stream adds to the "
                         "base output after loraplex would scale it)")  # fmt: skip
    if ROW_NORMS not in layer.base_layer.__dict__:
        raise ValueError(f"{name}: DoRA needs the base layer's weight norms, recorded only for unquantized linear "
                         f"layers ({type(layer.base_layer.quant_method).__name__}); not served")  # fmt: skip


def fold_magnitudes(layer: Any, lora: Any, name: str) -> None:
    """`lora` (a layer's packed and scaled LoRALayerWeights with `dora_magnitude`) gets g folded into its B, slice by
    slice, and `output_scale`, g - 1 across `layer`'s output (zeros for slices without a magnitude). Done once."""
    import torch

    if getattr(lora, "output_scale", None) is not None:
        return
    check_servable(layer, name)
    packed = isinstance(lora.lora_b, list)
    magnitudes = lora.dora_magnitude if packed else [lora.dora_magnitude]
    lora_as = lora.lora_a if packed else [lora.lora_a]
    lora_bs = lora.lora_b if packed else [lora.lora_b]
    scalings = lora.scaling if packed else [lora.scaling]
    widths = list(layer.output_slices)
    if len(magnitudes) != len(widths):
        raise ValueError(f"{name}: DoRA magnitudes for {len(magnitudes)} slices, the layer has {len(widths)}")
    norms = layer.base_layer.__dict__[ROW_NORMS]
    projected = None  # W A^T of each slice's A, through the base layer, computed only for slices with a magnitude
    scales, folded, offset = [], [], 0
    for magnitude, lora_a, lora_b, scaling, width in zip(magnitudes, lora_as, lora_bs, scalings, widths, strict=True):
        if magnitude is None:
            scales.append(torch.zeros(width, dtype=torch.float32))
            folded.append(lora_b)
        else:
            if lora_a is None or lora_b is None or lora_b.shape[0] != width or magnitude.shape[0] != width:
                raise ValueError(f"{name}: a DoRA magnitude of {magnitude.shape[0]} values for an output slice of "
                                 f"{width}")  # fmt: skip
            projected = base_forward(layer, lora_a)
            scale = magnitude_scale(norms[offset : offset + width].float().cpu(), projected[:, offset : offset + width],
                                    lora_a, lora_b, float(scaling), magnitude)  # fmt: skip
            # A new tensor, not an in-place product: the loaded weights may be inference-mode tensors.
            new_b = lora_b * scale[:, None].to(device=lora_b.device, dtype=lora_b.dtype)
            folded.append(new_b.pin_memory() if lora_b.is_pinned() else new_b)
            scales.append(scale - 1)
        offset += width
    if projected is not None and projected.shape[1] != offset:
        raise ValueError(f"{name}: the base layer's output has {projected.shape[1]} values, its LoRA slices {offset}")
    lora.lora_b = folded if packed else folded[0]
    lora.output_scale = torch.cat(scales)


def base_forward(layer: Any, lora_a: torch.Tensor) -> torch.Tensor:
    """W A^T as (rank, output): `layer`'s base layer applied, without its bias, to the rows of `lora_a`, by the
    layer's own GEMM on its device; float32 on the CPU."""
    import torch

    base = layer.base_layer
    dtype = getattr(base, "params_dtype", lora_a.dtype)
    with torch.no_grad():
        out = base.quant_method.apply(base, lora_a.to(device=layer.device, dtype=dtype), None)
    return out.float().cpu()


def magnitude_scale(row_norms: torch.Tensor, projected: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                    scaling: float, magnitude: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """g = m / ||W + s B A|| per output channel, from ||W_i||^2 (`row_norms`), W A^T (`projected`, rank x out), the
    LoRA pair and its scale; float32 on the CPU."""
    a = lora_a.float().cpu()
    b = lora_b.float().cpu() * scaling
    cross = (b * projected.T).sum(dim=1)  # B_i . (W A^T)_i
    lora = ((b @ (a @ a.T)) * b).sum(dim=1)  # ||B_i A||^2
    norm = (row_norms + 2 * cross + lora).clamp_min(0).sqrt()
    scale: torch.Tensor = magnitude.float().cpu() / norm
    return scale


def _writing_scales(activate: Callable[[Any, int], bool]) -> Callable[[Any, int], bool]:
    return writing_slots(activate, BUFFER, write_slot)


def write_slot(layer: Any, index: int, lora: Any, name: str = "") -> None:
    """Slot `index` of `layer` now holds `lora` (None: no LoRA on this layer): its g - 1, or zeros."""
    held: set[int] = layer.__dict__[HELD]
    stacked = layer.__dict__[BUFFER]
    scale = getattr(lora, "output_scale", None)
    if scale is not None:
        if scale.shape[0] != stacked.shape[1]:
            raise ValueError(f"{name}: a DoRA scale of {scale.shape[0]} values, the layer's output has "
                             f"{stacked.shape[1]}")  # fmt: skip
        stacked[index].copy_(scale.to(stacked.dtype), non_blocking=True)
        held.add(index)
    elif index in held:
        stacked[index].zero_()
        held.discard(index)


# The forward: (g - 1) * W x of each token's slot added after the LoRA product.


def _scaling_sync(apply_sync: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """vLLM's `_apply_sync` (base GEMM, then the LoRA product), with the DoRA term of each token."""

    @functools.wraps(apply_sync)
    def _apply_sync(self: Any, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if not scaling(self):
            return apply_sync(self, x, bias)
        output = self._get_quant_method().apply(self.base_layer, x, bias)
        term = base_term(self, output, bias)
        return add_term(self._apply_lora_to_output(x, output), term)

    return _apply_sync


def _scaling_base_forward(apply_base: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """vLLM's `_apply_base_forward` (the base layer's own forward, then the LoRA product), with the DoRA term."""

    @functools.wraps(apply_base)
    def _apply_base_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
        if not scaling(self):
            return apply_base(self, x)
        base_output = self.base_layer(x)
        output = base_output[0] if isinstance(base_output, tuple) else base_output
        bias = None if self.base_layer.skip_bias_add else getattr(self.base_layer, "bias", None)  # what it added
        term = base_term(self, output, bias)
        return add_term(self._apply_lora_to_output(x, output), term)

    return _apply_base_forward


def scaling(layer: Any) -> bool:
    """Whether `layer`'s forward must add DoRA terms: a slot holds a scale, or the step is traced into a graph."""
    return BUFFER in layer.__dict__ and (bool(layer.__dict__[HELD]) or traced())


def base_term(layer: Any, output: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """(g - 1) * W x for each token of `output` (the base output, with `bias` added if not None), by its slot."""
    stacked = layer.__dict__[BUFFER]
    flat = output.reshape(-1, output.shape[-1])
    base = flat if bias is None else flat - bias.to(flat.dtype)
    term: torch.Tensor = stacked[token_slots(layer, flat.shape[0], stacked.shape[0])].to(flat.dtype) * base
    return term


def add_term(output: torch.Tensor, term: torch.Tensor) -> torch.Tensor:
    output.view(-1, output.shape[-1]).add_(term)
    return output
