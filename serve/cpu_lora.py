"""LoRA on CPU, computed per adapter slot and cut to each adapter's own rank.

vLLM 0.32.0's CPU path (vllm/lora/ops/torch_ops) applies LoRA token by token: `weights[indices]`
copies every token's whole LoRA matrices, sized by the server's `max_lora_rank`, before a batched
einsum. For SmolLM2-135M at bound 64 that is ~80 MB of weights copied per token per step, more than
the model's own weights for a batch of a few tokens; it is why mixed-adapter throughput was a third of
base-only, and why the rank bound, not the adapters' ranks, set the cost.

This wrapper does what the GPU kernels (sgmv) do instead: for each LoRA slot present in the batch, one
matrix product over that slot's tokens, with the slot's weights read once. It also reads only the
first `rank` rows/columns of the slot's buffers, `rank` being the adapter's own (recorded when vLLM
activates it into the slot); the rest of the buffer is zero padding up to `max_lora_rank`. Base-model
tokens (index -1) get no LoRA work at all. Same results as vLLM's ops up to float summation order
(tests/unit/test_cpu_lora.py compares them; the integration tests compare served tokens with PEFT).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

logger = logging.getLogger("vllm.loraplex")  # under vLLM's logger: printed by its handler in every process
INSTALLED_MESSAGE = "loraplex CPU LoRA ops in use: per adapter slot, cut to each adapter's rank"

Groups = list[tuple[int, torch.Tensor | None]]
"""(slot, row positions in the batch) per slot in use; positions None when the slot has every row."""


def slot_groups(indices: torch.Tensor) -> Groups:
    if indices.numel() == 0:
        return []
    slots = [int(slot) for slot in torch.unique(indices).tolist()]
    if len(slots) == 1:
        return [] if slots[0] < 0 else [(slots[0], None)]
    return [(slot, torch.nonzero(indices == slot).squeeze(1)) for slot in slots if slot >= 0]


def record_slot_rank(manager: Any, lora_id: int) -> None:
    """Called after vLLM's LoRAModelManager put adapter `lora_id` in a slot: remember that slot's rank."""
    slot = manager.lora_index_to_id.index(lora_id)
    model = manager._registered_adapters[lora_id]
    rank = max([int(model.rank or 0)] + [int(getattr(w, "rank", 0) or 0) for w in model.loras.values()])
    wrappers = list(getattr(manager, "punica_wrapper_mapping", {}).values())
    wrappers.append(getattr(manager, "punica_wrapper", None))
    for wrapper in wrappers:
        if isinstance(wrapper, GroupedPunicaWrapperCPU):
            wrapper.slot_ranks[slot] = rank


class GroupedPunicaWrapperCPU(PunicaWrapperCPU):
    """vLLM's CPU punica wrapper with its LoRA products done per slot (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.slot_ranks: dict[int, int] = {}
        self._token_groups: Groups = []
        self._sampler_groups: Groups = []
        logger.info(INSTALLED_MESSAGE)

    def update_metadata(self, *args: Any, **kwargs: Any) -> None:
        super().update_metadata(*args, **kwargs)
        self._token_groups = slot_groups(self.token_lora_indices)
        self._sampler_groups = slot_groups(self.sampler_indices)

    def _rank(self, slot: int, bound: int) -> int:
        return min(self.slot_ranks.get(slot, bound), bound)

    def _shrink(self, y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, scale: float, groups: Groups) -> None:
        """y[rows] = scale * x[rows] @ w[slot, :rank].T per slot; other rows 0 (vLLM's op overwrites y)."""
        y.zero_()
        x = x.to(y.dtype)
        for slot, rows in groups:
            a = w[slot].reshape(w.shape[-2], w.shape[-1])
            rank = self._rank(slot, a.shape[0])
            if rank == 0:
                continue
            a = a[:rank].to(y.dtype)
            if rows is None:
                y[:, :rank] = (x @ a.t()).mul_(scale)
            else:
                y[:, :rank].index_copy_(0, rows, (x.index_select(0, rows) @ a.t()).mul_(scale))

    def _expand(
        self, y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, offset: int, size: int, add: bool, groups: Groups
    ) -> None:
        """y[rows, offset:offset+size] (+)= x[rows, :rank] @ w[slot, :size, :rank].T per slot."""
        target = y[:, offset : offset + size]
        if not add:
            target.zero_()
        for slot, rows in groups:
            b = w[slot].reshape(w.shape[-2], w.shape[-1])
            rank = self._rank(slot, b.shape[1])
            if rank == 0:
                continue
            b = b[:size, :rank].to(y.dtype)
            if rows is None:
                target += x[:, :rank].to(y.dtype) @ b.t()
            else:
                target.index_add_(0, rows, x.index_select(0, rows)[:, :rank].to(y.dtype) @ b.t())

    # vLLM's V1 runner always takes the "prefill" (sgmv) path; the decode (bgmv) path is kept equal.
    def _shrink_prefill(self, y: torch.Tensor, x: torch.Tensor, w_t_all: torch.Tensor, scale: float) -> None:
        if not self.no_lora:
            self._shrink(y, x, w_t_all, scale, self._token_groups)

    def _shrink_decode(self, y: torch.Tensor, x: torch.Tensor, w_t_all: torch.Tensor, scale: float) -> None:
        self._shrink(y, x, w_t_all, scale, self._token_groups)

    def _expand_prefill(self, y: torch.Tensor, x: torch.Tensor, w_t_all: torch.Tensor, add_inputs: bool) -> None:
        if not self.no_lora:
            self._expand(y, x, w_t_all, 0, min(w_t_all.shape[-2], y.shape[1]), add_inputs, self._token_groups)

    def _expand_decode(self, y: torch.Tensor, x: torch.Tensor, w_t_all: torch.Tensor, add_inputs: bool) -> None:
        self._expand(y, x, w_t_all, 0, min(w_t_all.shape[-2], y.shape[1]), add_inputs, self._token_groups)

    def _expand_slice_prefill(
        self, y: torch.Tensor, x: torch.Tensor, w_t_all: torch.Tensor, y_offset: int, y_slice_size: int,
        add_inputs: bool,
    ) -> None:  # fmt: skip
        if not self.no_lora:
            self._expand(y, x, w_t_all, y_offset, y_slice_size, add_inputs, self._token_groups)

    def _expand_slice_decode(
        self, y: torch.Tensor, x: torch.Tensor, w_t_all: torch.Tensor, y_offset: int, y_slice_size: int,
        add_inputs: bool,
    ) -> None:  # fmt: skip
        self._expand(y, x, w_t_all, y_offset, y_slice_size, add_inputs, self._token_groups)

    def add_lora_logits(
        self, y: torch.Tensor, x: torch.Tensor, lora_a_stacked: torch.Tensor, lora_b_stacked: torch.Tensor,
        scale: float, *, buffer: torch.Tensor | None = None, **kwargs: Any,
    ) -> None:  # fmt: skip
        """y += (x @ a.T * scale) @ b.T per slot of the rows' requests (vLLM: bgmv over every row)."""
        if not self._sampler_groups:
            return
        y2 = y.view(-1, y.shape[-1])
        x2 = x.view(-1, x.shape[-1])
        if buffer is None:
            buffer = torch.zeros((x2.size(0), lora_b_stacked.size(-1)), dtype=torch.float32, device=x2.device)
        self._shrink(buffer, x2, lora_a_stacked, scale, self._sampler_groups)
        size = min(lora_b_stacked.shape[-2], y2.shape[1])
        self._expand(y2, buffer, lora_b_stacked, 0, size, True, self._sampler_groups)
