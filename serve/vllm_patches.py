"""Fixes to vLLM 0.32.0 that loraplex applies in every vLLM process, through vLLM's plugin hook.

Registered as the `vllm.general_plugins` entry point `loraplex`, which vLLM calls in the API
process, the engine core and every worker. Each fix names the defect it repairs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from serve import vllm_dora, vllm_lora_bias, vllm_slots
from serve.processes import die_with_parent_if_asked

logger = logging.getLogger("loraplex.vllm_patches")
_applied = False
CPU_LORA_OPS_ENV = "LORAPLEX_CPU_LORA_OPS"
"""How `EngineConfig.cpu_lora_ops` reaches every vLLM process (set by `engine_env`, inherited by vLLM's children):
`grouped` (default): loraplex's CPU LoRA ops and slot resets; `vllm`: vLLM's own (with the base-row fix only)."""


def register() -> None:
    """vLLM's plugin entry point."""
    global _applied
    if _applied:
        return
    _applied = True
    # The engine core dies with the replica that spawned it, its worker with the engine core, however they died.
    die_with_parent_if_asked()
    _pin_adapters_in_memory_not_in_slots()
    vllm_slots.install()  # on only for an engine whose config asks for it
    _mask_base_rows_in_cpu_lora_ops()
    # PEFT's DoRA: g folded at load, (g - 1) W x added per slot (serve/vllm_dora.py); first, so that it wraps vLLM's
    # own loader (whose signature it reads) and lora_bias wraps it.
    vllm_dora.install()
    vllm_lora_bias.install()  # PEFT's lora_bias: read at load, added per slot (serve/vllm_lora_bias.py)
    if os.environ.get(CPU_LORA_OPS_ENV, "grouped") == "grouped":
        _group_cpu_lora_ops_by_slot()
        _reset_only_what_was_written()


def written_rank(lora_a: Any, lora_b: Any) -> int | None:
    """The rank `set_lora(index, lora_a, lora_b)` writes into a slot (A is (rank, in), B is (out, rank); either may
    be a tensor or a list of per-slice tensors and Nones), or None when the arguments are not of those kinds."""
    import torch

    ranks = []
    for weights, rank_dim in ((lora_a, 0), (lora_b, -1)):
        for tensor in weights if isinstance(weights, list | tuple) else [weights]:
            if tensor is None:
                continue
            if not isinstance(tensor, torch.Tensor) or tensor.dim() != 2:
                return None
            ranks.append(int(tensor.shape[rank_dim]))
    return max(ranks, default=0)


def _reset_only_what_was_written() -> None:
    """A slot's LoRA buffers are sized by `max_lora_rank` (and the vocabulary, for the embedding and the logits), and
    vLLM zeroes all of a slot's buffers in every layer each time it activates an adapter there: ~100 MB for the demo
    model at bound 64, a quarter of a rank-8 adapter's cold load on a CPU. Outside what a slot's last `set_lora`
    wrote its buffers are zero (they are made with `torch.zeros`, and only `set_lora` writes them), so:
    - a linear layer zeroes the first `rank` rows (A) and columns (B) its slot's previous adapter wrote;
    - the embedding and logits layers (adapters rarely train them) skip the reset of a slot nothing was written to
      since its last one.
    Either leaves the buffers exactly as vLLM's full reset does. Arguments of another kind than vLLM's tensors or
    lists, or a `set_lora` that failed, make that slot's next reset a full one."""
    from vllm.lora.layers import base_linear, column_parallel_linear, logits_processor, vocab_parallel_embedding

    base = base_linear.BaseLinearLayerWithLoRA
    if getattr(base.reset_lora, "_loraplex", False):
        return
    unknown = -1  # per slot: 0 = zero, > 0 = the rank written, unknown = anything may be written

    def state(layer: Any) -> dict[int, int]:
        held: dict[int, int] = layer.__dict__.setdefault("_loraplex_written", {})
        return held

    def linear_reset(full_reset: Callable[[Any, int], None]) -> Callable[[Any, int], None]:
        def reset_lora(self: Any, index: int) -> None:
            rank = state(self).get(index, 0)
            if rank == unknown:
                full_reset(self, index)
            elif rank > 0:
                for a, b in zip(self.lora_a_stacked, self.lora_b_stacked, strict=True):
                    a[index, :, :rank] = 0
                    b[index, :, :, :rank] = 0
            state(self)[index] = 0

        return reset_lora

    def clean_reset(full_reset: Callable[[Any, int], None]) -> Callable[[Any, int], None]:
        def reset_lora(self: Any, index: int) -> None:
            if state(self).get(index, 0) != 0:
                full_reset(self, index)
            state(self)[index] = 0

        return reset_lora

    def recording(set_lora: Callable[..., None], ranked: bool) -> Callable[..., None]:
        def wrapper(self: Any, index: int, lora_a: Any, lora_b: Any) -> None:
            try:
                set_lora(self, index, lora_a, lora_b)  # its reset first zeroes what the slot held
            except BaseException:
                state(self)[index] = unknown  # written in part, perhaps
                raise
            rank = written_rank(lora_a, lora_b) if ranked else None
            previous = state(self).get(index, 0)  # a subclass's set_lora calls its parent's: the widest is kept
            state(self)[index] = unknown if rank is None or previous == unknown else max(previous, rank)

        return wrapper

    patched: list[tuple[type, str, Callable[..., Any]]] = [(base, "reset_lora", linear_reset(base.reset_lora))]
    linear: tuple[type, ...] = (base, column_parallel_linear.MergedColumnParallelLinearWithLoRA,
                                column_parallel_linear.MergedColumnParallelLinearVariableSliceWithLoRA)  # fmt: skip
    for layer in linear:
        patched.append((layer, "set_lora", recording(vars(layer)["set_lora"], ranked=True)))
    vocabulary: tuple[type, ...] = (vocab_parallel_embedding.VocabParallelEmbeddingWithLoRA,
                                    logits_processor.LogitsProcessorWithLoRA)  # fmt: skip
    for layer in vocabulary:
        patched.append((layer, "reset_lora", clean_reset(vars(layer)["reset_lora"])))
        patched.append((layer, "set_lora", recording(vars(layer)["set_lora"], ranked=False)))
    for layer, name, function in patched:
        function._loraplex = True  # type: ignore[attr-defined]
        setattr(layer, name, function)


def _group_cpu_lora_ops_by_slot() -> None:
    """Installs serve.cpu_lora's punica wrapper as the one vLLM's CPU platform builds (see its docstring)."""
    from vllm.lora import model_manager
    from vllm.lora.punica_wrapper import punica_cpu

    from serve.cpu_lora import GroupedPunicaWrapperCPU, record_slot_rank

    punica_cpu.PunicaWrapperCPU = GroupedPunicaWrapperCPU  # type: ignore[misc]  # what CpuPlatform names
    activate = model_manager.LoRAModelManager.activate_adapter
    if getattr(activate, "_loraplex", False):
        return

    def activate_adapter(self: Any, lora_id: int) -> bool:
        activated = activate(self, lora_id)
        if activated:
            record_slot_rank(self, lora_id)
        return bool(activated)

    activate_adapter._loraplex = True  # type: ignore[attr-defined]
    model_manager.LoRAModelManager.activate_adapter = activate_adapter  # type: ignore[method-assign]
    logger.debug("loraplex: CPU LoRA ops grouped by slot, cut to each adapter's rank")


def _pin_adapters_in_memory_not_in_slots() -> None:
    """A pinned adapter must not hold one of the engine's LoRA slots, nor take an unpinned one's cache entry.

    vLLM's `pin_lora` pins an adapter in the engine's adapter cache *and* in one of its `max_loras` slots, but its
    scheduler still admits `max_loras` other adapters into one step: activating the last of them evicts another
    adapter of the same step, and building the step's LoRA mapping raises KeyError in the worker, which kills the
    engine (found by tests/integration/test_compose.py: a batch of eight adapters while one was pinned). Pinned
    here means what loraplex's `pinned` promises, never evicted from the engine's memory (its adapter cache); the
    adapter takes a slot only in the steps that use it, like any other. The cache itself holds the pinned ones
    beside `max_cpu_loras` others (`EngineConfig.cpu_cache_entries`): pinned in a cache of `max_loras` entries,
    the same step would still evict one of its own adapters from the cache.
    """
    from vllm.lora.model_manager import LRUCacheLoRAModelManager

    if getattr(LRUCacheLoRAModelManager.pin_adapter, "_loraplex", False):
        return

    def pin_adapter(self: Any, lora_id: int) -> bool:
        self._pin_lora_in_cpu_cache(lora_id)
        return True

    pin_adapter._loraplex = True  # type: ignore[attr-defined]
    LRUCacheLoRAModelManager.pin_adapter = pin_adapter  # type: ignore[method-assign]
    logger.debug("loraplex: pinned adapters stay in the adapter cache without holding a LoRA slot")


def _mask_base_rows_in_cpu_lora_ops() -> None:
    """Base-model tokens must get no LoRA delta on CPU.

    vLLM marks base-model tokens with LoRA index -1, and its CPU (torch) LoRA ops select weights with
    `weights[indices]`: -1 picks the *last* LoRA slot. Once every `max_loras` slot holds an adapter,
    base-model requests batched with adapter requests silently get the last slot's adapter applied.
    loraplex's integration test (base in a mixed batch after adapters were evicted) caught it; the
    fix zeroes the delta of rows whose index is negative.
    """
    from vllm.lora.ops import torch_ops
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    for name in ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice"):
        fixed = _masked(getattr(lora_ops, name))
        for module in (lora_ops, torch_ops, punica_cpu):
            if hasattr(module, name):
                setattr(module, name, fixed)
    logger.debug("loraplex: CPU LoRA ops mask base-model rows")


def _masked(op: Callable[..., None]) -> Callable[..., None]:
    def masked_op(inputs: Any, weights: Any, output: Any, indices: Any, *args: Any, **kwargs: Any) -> None:
        base_rows = indices < 0
        if base_rows.shape[0] != inputs.shape[0] or not bool(base_rows.any()):
            op(inputs, weights, output, indices, *args, **kwargs)
            return
        # Run the op on inputs zeroed for base rows with a valid index, so they add (or set) exactly 0.
        safe_inputs = inputs * (~base_rows[: inputs.shape[0]]).unsqueeze(-1).to(inputs.dtype)
        op(safe_inputs, weights, output, indices.clamp(min=0), *args, **kwargs)

    masked_op.__name__ = op.__name__
    masked_op.__doc__ = op.__doc__
    return masked_op
