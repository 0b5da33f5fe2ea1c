"""LoRA on CPU, computed per adapter slot and cut to each adapter's own rank.

vLLM 0.32.0's CPU path (vllm/lora/ops/torch_ops) applies LoRA token by token: `weights[indices]`
copies every token's whole LoRA matrices, sized by the server's `max_lora_rank`, before a batched
einsum. For SmolLM2-135M at bound 64 that is ~80 MB of weights copied per token per step, more than
the model's own weights for a batch of a few tokens; it is why mixed-adapter throughput was a third of
base-only, and why the rank bound, not the adapters' ranks, set the cost.

This wrapper does what the GPU kernels (sgmv) do instead: for each LoRA slot present in the batch, one
matrix product over that slot's tokens, with the slot's weights read once. It also reads only the
first `rank` rows/columns of the slot's buffers, `rank` being the widest of the adapter's own ranks
(recorded when vLLM activates it into the slot; with PEFT's rank_pattern its modules' ranks differ);
the rest of the buffer is zero padding up to `max_lora_rank`. Base-model tokens (index -1) get no
LoRA work at all. Same results as vLLM's ops up to float summation order (tests/unit/test_cpu_lora.py
compares them; the integration tests compare served tokens with PEFT).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

from serve.vllm_patches import written_rank

logger = logging.getLogger("vllm.loraplex")  # under vLLM's logger: printed by its handler in every process
INSTALLED_MESSAGE = "loraplex CPU LoRA ops in use: per adapter slot, cut to each adapter's rank"

WEIGHTS_CACHE_BYTES = 256 * 1024**2
"""Bound of the per-step weight stacks kept between steps (see `GroupedPunicaWrapperCPU._slot_weights`)."""

Groups = list[tuple[int, torch.Tensor | None]]
"""(slot, row positions in the batch) per slot in use; positions None when the slot has every row."""


def slot_groups(indices: torch.Tensor) -> Groups:
    if indices.numel() == 0:
        return []
    slots = [int(slot) for slot in torch.unique(indices).tolist()]
    if len(slots) == 1:
        return [] if slots[0] < 0 else [(slots[0], None)]
    return [(slot, torch.nonzero(indices == slot).squeeze(1)) for slot in slots if slot >= 0]


@dataclass(frozen=True)
class Batch:
    """Every slot's rows in one padded batch, so a layer's LoRA is one `bmm` whatever the number of slots.

    On a CPU the per-slot products are tiny (rank 8: 32 rows x 576 x 8); what costs is the number of torch
    calls, ~10 per slot per slice (q, k, v, o, gate, up, down) per layer: with 8 adapters in a batch that
    was ~17,000 calls per step, doubling the step of the demo model. Groups are cut into pieces of at most
    `width` rows (the mean group size), so padding never more than doubles the rows multiplied.
    """

    slots: torch.Tensor
    """Slot of each piece."""
    piece_slots: list[int]
    """Slot of each piece, as ints."""
    gather: torch.Tensor
    """Batch row of each padded position (padding repeats row 0; its results are never read)."""
    valid: torch.Tensor
    """Padded positions that hold a real row, in the order of `rows`."""
    rows: torch.Tensor
    """Batch row of each valid position."""
    width: int


def batch_of(groups: Groups, n_rows: int) -> Batch | None:
    """The padded layout of `groups` (None when no row has an adapter)."""
    if not groups:
        return None
    members_of = [(slot, torch.arange(n_rows) if rows is None else rows) for slot, rows in groups]
    width = max(1, -(-sum(int(rows.numel()) for _, rows in members_of) // len(members_of)))
    slots: list[int] = []
    gather: list[torch.Tensor] = []
    valid: list[torch.Tensor] = []
    rows: list[torch.Tensor] = []
    for slot, members in members_of:
        for start in range(0, int(members.numel()), width):
            piece = members[start : start + width]
            base = len(slots) * width
            slots.append(slot)
            gather.append(torch.nn.functional.pad(piece, (0, width - piece.numel())))
            valid.append(torch.arange(base, base + piece.numel()))
            rows.append(piece)
    return Batch(
        slots=torch.tensor(slots), piece_slots=slots, gather=torch.cat(gather), valid=torch.cat(valid),
        rows=torch.cat(rows), width=width,
    )  # fmt: skip


def adapter_rank(model: Any) -> int | None:
    """The widest rank any layer of vLLM's LoRAModel `model` writes into a slot, read from its weights' shapes; None
    when a layer's weights are not matrices (a 3-D MoE layer), so the slot's whole buffer is used.

    Not vLLM's `rank` attributes: with PEFT's rank_pattern the modules of one adapter have different ranks, and
    a packed layer (q, k, v; gate, up) takes its first slice's (`PackedLoRALayerWeights.pack`), so an adapter whose
    v_proj has a higher rank than its q_proj would be cut short."""
    ranks = [written_rank(layer.lora_a, layer.lora_b) for layer in model.loras.values()]
    return None if None in ranks else max((rank for rank in ranks if rank is not None), default=0)


def record_slot_rank(manager: Any, lora_id: int) -> None:
    """Called after vLLM's LoRAModelManager put adapter `lora_id` in a slot: remember that slot's rank."""
    slot = manager.lora_index_to_id.index(lora_id)
    rank = adapter_rank(manager._registered_adapters[lora_id])
    wrappers = list(getattr(manager, "punica_wrapper_mapping", {}).values())
    wrappers.append(getattr(manager, "punica_wrapper", None))
    for wrapper in wrappers:
        if isinstance(wrapper, GroupedPunicaWrapperCPU):
            if rank is None:
                wrapper.slot_ranks.pop(slot, None)
            else:
                wrapper.slot_ranks[slot] = rank
            wrapper.forget_weights()  # the slot's buffers now hold another adapter


class GroupedPunicaWrapperCPU(PunicaWrapperCPU):
    """vLLM's CPU punica wrapper with its LoRA products done per slot (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.slot_ranks: dict[int, int] = {}
        self._token_groups: Groups = []
        self._sampler_groups: Groups = []
        self._token_batch: Batch | None = None
        self._sampler_batch: Batch | None = None
        self._weights: dict[tuple[int, int], tuple[tuple[int, ...], int, torch.Tensor]] = {}
        self._weights_bytes = 0
        logger.info(INSTALLED_MESSAGE)

    def forget_weights(self) -> None:
        self._weights.clear()
        self._weights_bytes = 0

    def _slot_weights(self, w: torch.Tensor, batch: Batch, rank: int, size: int | None = None) -> torch.Tensor:
        """The batch's pieces' weights from `w`, contiguous, cut to `rank` (and to `size` outputs for a B):
        A as (pieces, rank, in), B as (pieces, size, rank). Kept while the pieces' slots stay the same (decode
        steps in a row), within `WEIGHTS_CACHE_BYTES`, until an adapter is put in a slot."""
        key = (w.data_ptr(), -1 if size is None else size)
        layout = tuple(batch.piece_slots)
        kept = self._weights.get(key)
        if kept is not None and kept[0] == layout and kept[1] == rank:
            return kept[2]
        w3 = w.reshape(w.shape[0], w.shape[-2], w.shape[-1])
        cut = w3[:, :rank] if size is None else w3[:, :size, :rank]
        gathered = cut.index_select(0, batch.slots).to(torch.float32)
        if kept is not None:
            self._weights_bytes -= kept[2].nbytes
            del self._weights[key]
        if self._weights_bytes + gathered.nbytes <= WEIGHTS_CACHE_BYTES:
            self._weights[key] = (layout, rank, gathered)
            self._weights_bytes += gathered.nbytes
        return gathered

    def add_lora_linear(
        self, y: torch.Tensor, x: torch.Tensor, lora_a_stacked: tuple[torch.Tensor, ...],
        lora_b_stacked: tuple[torch.Tensor, ...], scale: float, output_slices: tuple[int, ...], *,
        buffer: tuple[torch.Tensor, ...] | None = None, **kwargs: Any,
    ) -> None:  # fmt: skip
        """A packed layer (q, k, v; gate, up) with several slots in the batch: the rows gathered once, each
        slice's two products batched over the slots, one scatter into `y` for every slice."""
        batch = self._token_batch
        if batch is None or self.no_lora:
            super().add_lora_linear(y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, buffer=buffer, **kwargs)
            return
        pieces, width = len(batch.piece_slots), batch.width
        x2 = x.view(-1, x.shape[-1])
        xs = x2.index_select(0, batch.gather).to(torch.float32).view(pieces, width, x2.shape[-1])
        outs = []
        for a_all, b_all, size in zip(lora_a_stacked, lora_b_stacked, output_slices, strict=True):
            rank = self._batch_rank(batch, a_all.shape[-2])
            h = torch.bmm(xs, self._slot_weights(a_all, batch, rank).transpose(1, 2))
            if scale != 1.0:
                h.mul_(scale)
            outs.append(torch.bmm(h, self._slot_weights(b_all, batch, rank, size).transpose(1, 2)))
        out = (torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]).view(pieces * width, -1)
        y2 = y.view(-1, y.shape[-1])
        y2[:, : out.shape[1]].index_add_(0, batch.rows, out.index_select(0, batch.valid).to(y.dtype))

    def update_metadata(self, *args: Any, **kwargs: Any) -> None:
        super().update_metadata(*args, **kwargs)
        self.use_indices(self.token_lora_indices, self.sampler_indices)

    def use_indices(self, tokens: torch.Tensor, sampler: torch.Tensor) -> None:
        """The slot of each token row and of each sampled row, for this step's products."""
        self._token_groups = slot_groups(tokens)
        self._sampler_groups = slot_groups(sampler)
        self._token_batch = batch_of(self._token_groups, tokens.numel())
        self._sampler_batch = batch_of(self._sampler_groups, sampler.numel())

    def _rank(self, slot: int, bound: int) -> int:
        return min(self.slot_ranks.get(slot, bound), bound)

    def _batch_rank(self, batch: Batch, bound: int) -> int:
        return max(self._rank(slot, bound) for slot in batch.piece_slots)

    def _shrink(self, y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, scale: float, groups: Groups) -> None:
        """y[rows] = scale * x[rows] @ w[slot, :rank].T per slot; other rows 0 (vLLM's op overwrites y)."""
        y.zero_()
        x = x.to(y.dtype)
        batch = self._batch_for(groups)
        if batch is not None:
            rank = self._batch_rank(batch, w.shape[-2])
            a = self._slot_weights(w, batch, rank)  # (pieces, rank, in)
            xs = x.index_select(0, batch.gather).to(torch.float32).view(len(batch.piece_slots), batch.width, -1)
            out = torch.bmm(xs, a.transpose(1, 2)).view(-1, rank).index_select(0, batch.valid)
            y[:, :rank].index_copy_(0, batch.rows, out.mul_(scale).to(y.dtype))
            return
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
        batch = self._batch_for(groups)
        if batch is not None:
            rank = self._batch_rank(batch, w.shape[-1])
            b = self._slot_weights(w, batch, rank, size)  # (pieces, size, rank)
            xs = x[:, :rank].index_select(0, batch.gather).to(torch.float32)
            xs = xs.view(len(batch.piece_slots), batch.width, rank)
            out = torch.bmm(xs, b.transpose(1, 2)).view(-1, size).index_select(0, batch.valid)
            target.index_add_(0, batch.rows, out.to(y.dtype))
            return
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

    def _batch_for(self, groups: Groups) -> Batch | None:
        if groups is self._token_groups:
            return self._token_batch
        return self._sampler_batch if groups is self._sampler_groups else None

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
