"""Fixes to vLLM 0.32.0 that loraplex applies in every vLLM process, through vLLM's plugin hook.

Registered as the `vllm.general_plugins` entry point `loraplex`, which vLLM calls in the API
process, the engine core and every worker. Each fix names the defect it repairs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from serve.processes import die_with_parent_if_asked

logger = logging.getLogger("loraplex.vllm_patches")
_applied = False
CPU_LORA_OPS_ENV = "LORAPLEX_CPU_LORA_OPS"
"""`grouped` (default): loraplex's CPU LoRA ops; `vllm`: vLLM's own (with the base-row fix only)."""


def register() -> None:
    """vLLM's plugin entry point."""
    global _applied
    if _applied:
        return
    _applied = True
    # The engine core dies with the replica that spawned it, its worker with the engine core, however they died.
    die_with_parent_if_asked()
    _pin_adapters_in_memory_not_in_slots()
    _mask_base_rows_in_cpu_lora_ops()
    if os.environ.get(CPU_LORA_OPS_ENV, "grouped") == "grouped":
        _group_cpu_lora_ops_by_slot()


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
