"""loraplex's CPU LoRA wrapper against a per-token reference and against vLLM's own ops."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from serve.cpu_lora import GroupedPunicaWrapperCPU, batch_of, record_slot_rank, slot_groups

SLOTS, BOUND, HIDDEN = 4, 16, 24
OUTPUTS = (24, 8, 8)  # a packed q/k/v-like layer: three slices


def stacked(ranks: dict[int, int], rows: int, cols: int, seed: int, *, b: bool) -> torch.Tensor:
    """vLLM's layout: (slots, 1, rank bound, in) for A, (slots, 1, out, rank bound) for B, zero padded."""
    gen = torch.Generator().manual_seed(seed)
    weights = torch.zeros(SLOTS, 1, rows, cols)
    for slot, rank in ranks.items():
        if b:
            weights[slot, 0, :, :rank] = torch.randn(rows, rank, generator=gen)
        else:
            weights[slot, 0, :rank, :] = torch.randn(rank, cols, generator=gen)
    return weights


def wrapper(indices: torch.Tensor, ranks: dict[int, int]) -> GroupedPunicaWrapperCPU:
    punica = GroupedPunicaWrapperCPU(64, 8, "cpu")
    punica.no_lora = bool((indices < 0).all())
    punica.is_prefill = True
    punica.use_indices(indices, indices)
    punica.slot_ranks.update(ranks)
    return punica


def reference(y: torch.Tensor, x: torch.Tensor, a: list[torch.Tensor], b: list[torch.Tensor], scale: float,
              indices: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """Token by token: y[t, slice i] += x[t] @ A_i[slot].T @ B_i[slot].T * scale; base tokens unchanged."""
    out = y.clone()
    for t, slot in enumerate(indices.tolist()):
        if slot < 0:
            continue
        offset = 0
        for a_i, b_i, size in zip(a, b, OUTPUTS, strict=True):
            out[t, offset : offset + size] += (x[t] @ a_i[slot, 0].t() * scale) @ b_i[slot, 0].t()
            offset += size
    return out


@pytest.mark.parametrize(
    "indices",
    [
        [0, 0, 1, -1, 2, 1, -1, 3, 0],  # mixed, base rows in between
        [2, 2, 2],  # one slot has every row
        [-1, 3, -1],
        [1],
        [0, 0, 0, 0, 0, 0, 0, 1, -1, 2, 3],  # one popular slot: cut into pieces of the mean group size
        [1, 0, 1, 0, 1, 0, -1, -1],  # interleaved rows of two slots
    ],
)
def test_linear_lora_matches_the_per_token_reference(indices: list[int]) -> None:
    ranks = {0: 8, 1: 16, 2: 4, 3: 1}
    index = torch.tensor(indices)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(len(indices), HIDDEN, generator=gen)
    y = torch.randn(len(indices), sum(OUTPUTS), generator=gen)
    a = [stacked(ranks, BOUND, HIDDEN, seed=10 + i, b=False) for i in range(3)]
    b = [stacked(ranks, size, BOUND, seed=20 + i, b=True) for i, size in enumerate(OUTPUTS)]
    want = reference(y, x, a, b, 0.5, index)

    got = y.clone()
    wrapper(index, ranks).add_lora_linear(got, x, tuple(a), tuple(b), 0.5, OUTPUTS)
    assert torch.allclose(got, want, atol=1e-5)


def test_without_recorded_ranks_the_whole_buffer_is_used() -> None:
    ranks = {0: 16, 1: 3}
    index = torch.tensor([1, 0, 1])
    x, y = torch.randn(3, HIDDEN), torch.zeros(3, sum(OUTPUTS))
    a = [stacked(ranks, BOUND, HIDDEN, seed=i, b=False) for i in range(3)]
    b = [stacked(ranks, size, BOUND, seed=5 + i, b=True) for i, size in enumerate(OUTPUTS)]
    got = y.clone()
    wrapper(index, {}).add_lora_linear(got, x, tuple(a), tuple(b), 1.0, OUTPUTS)
    assert torch.allclose(got, reference(y, x, a, b, 1.0, index), atol=1e-5)


def test_a_rank_recorded_too_small_would_show() -> None:
    """The test above can fail: cutting a slot's rank below its adapter's changes the result."""
    ranks = {0: 8}
    index = torch.tensor([0, 0])
    x, y = torch.randn(2, HIDDEN), torch.zeros(2, sum(OUTPUTS))
    a = [stacked(ranks, BOUND, HIDDEN, seed=i, b=False) for i in range(3)]
    b = [stacked(ranks, size, BOUND, seed=5 + i, b=True) for i, size in enumerate(OUTPUTS)]
    got = y.clone()
    wrapper(index, {0: 4}).add_lora_linear(got, x, tuple(a), tuple(b), 1.0, OUTPUTS)
    assert not torch.allclose(got, reference(y, x, a, b, 1.0, index), atol=1e-3)


def test_matches_vllms_own_ops_on_adapter_rows() -> None:
    from serve.cpu_lora import PunicaWrapperCPU  # vLLM's class, bound before serve.vllm_patches replaces it

    assert PunicaWrapperCPU is not GroupedPunicaWrapperCPU
    ranks = {0: 8, 1: 16, 2: 2, 3: 5}
    index = torch.tensor([3, 0, 0, 1, 2, 2, 3])  # no base rows: vLLM's ops are right for these
    x, y = torch.randn(7, HIDDEN), torch.randn(7, sum(OUTPUTS))
    a = tuple(stacked(ranks, BOUND, HIDDEN, seed=30 + i, b=False) for i in range(3))
    b = tuple(stacked(ranks, size, BOUND, seed=40 + i, b=True) for i, size in enumerate(OUTPUTS))
    theirs = PunicaWrapperCPU(64, 8, "cpu")
    unique, counts = torch.unique_consecutive(index, return_counts=True)
    theirs._token_lora_indices[: len(index)] = index
    theirs._seq_lengths[: len(counts)] = counts
    theirs._lora_indices_per_batch[: len(unique)] = unique
    theirs.batch_size, theirs.max_length, theirs.token_nums = len(unique), int(counts.max()), len(index)
    theirs.is_prefill, theirs.no_lora = True, False
    theirs.indices_len[:] = [len(index)] * len(theirs.indices_len)
    want = y.clone()
    theirs.add_lora_linear(want, x, a, b, 2.0, OUTPUTS)
    got = y.clone()
    wrapper(index, ranks).add_lora_linear(got, x, a, b, 2.0, OUTPUTS)
    assert torch.allclose(got, want, atol=1e-4)


def test_logits_get_each_rows_adapter_and_base_rows_nothing() -> None:
    ranks = {1: 4, 2: 8}
    index = torch.tensor([1, -1, 2])
    vocab = 40
    x, y = torch.randn(3, HIDDEN), torch.randn(3, vocab)
    a = stacked(ranks, BOUND, HIDDEN, seed=1, b=False)
    b = stacked(ranks, vocab, BOUND, seed=2, b=True)
    got = y.clone()
    wrapper(index, ranks).add_lora_logits(got, x, a, b, 0.25)
    for row, slot in enumerate(index.tolist()):
        delta = torch.zeros(vocab) if slot < 0 else (x[row] @ a[slot, 0].t() * 0.25) @ b[slot, 0].t()
        assert torch.allclose(got[row], y[row] + delta, atol=1e-5)


def test_slot_ranks_are_recorded_when_an_adapter_is_activated() -> None:
    punica = GroupedPunicaWrapperCPU(64, 8, "cpu")
    layers = {name: SimpleNamespace(lora_a=torch.zeros(rank, HIDDEN), lora_b=torch.zeros(HIDDEN, rank))
              for name, rank in (("q_proj", 8), ("down_proj", 12))}  # a rank_pattern  # fmt: skip
    manager = SimpleNamespace(
        lora_index_to_id=[None, 7, None], _registered_adapters={7: SimpleNamespace(rank=8, loras=layers)},
        punica_wrapper_mapping={"language_model": punica},
    )  # fmt: skip
    record_slot_rank(manager, 7)
    assert punica.slot_ranks == {1: 12}


QKV = ("q_proj", "k_proj", "v_proj")
PACKED_RANKS = [
    # (r, rank_pattern, the widest rank any slice of the packed q/k/v layer holds)
    (8, {}, 8),
    (8, {"v_proj": 16}, 16),  # vLLM's packed layer says rank 8: its first slice's (q_proj)
    (8, {"q_proj": 4, "k_proj": 4}, 8),
    (16, {"q_proj": 2, "k_proj": 4, "v_proj": 6}, 6),  # no module has r itself: cut to 6, not 16
]


@pytest.mark.parametrize(("r", "rank_pattern", "widest"), PACKED_RANKS)
def test_a_slot_is_cut_to_the_widest_rank_of_any_slice_of_its_adapter(
    r: int, rank_pattern: dict[str, int], widest: int
) -> None:
    """With rank_pattern, the slices of one packed layer have different ranks: cutting the slot to vLLM's
    `rank` of the packed layer (the first slice's) would drop the others' extra rank silently."""
    from vllm.lora.lora_weights import LoRALayerWeights, PackedLoRALayerWeights
    from vllm.lora.peft_helper import PEFTHelper

    helper = PEFTHelper.from_dict({"r": r, "lora_alpha": 16, "target_modules": list(QKV), "rank_pattern": rank_pattern})
    slices = []
    for name in QKV:
        layer = LoRALayerWeights.from_config(f"model.layers.0.self_attn.{name}", helper)
        layer.lora_a, layer.lora_b = torch.randn(layer.rank, HIDDEN), torch.randn(8, layer.rank)
        slices.append(layer)
    packed = PackedLoRALayerWeights.pack(slices)  # what vLLM's LoRAModelManager does with q, k and v
    punica = GroupedPunicaWrapperCPU(64, 8, "cpu")
    manager = SimpleNamespace(
        lora_index_to_id=[7], _registered_adapters={7: SimpleNamespace(rank=r, loras={"qkv_proj": packed})},
        punica_wrapper_mapping={"language_model": punica},
    )  # fmt: skip
    record_slot_rank(manager, 7)
    assert punica.slot_ranks == {0: widest}


def test_a_slot_whose_weights_are_not_matrices_uses_its_whole_buffer() -> None:
    punica = GroupedPunicaWrapperCPU(64, 8, "cpu")
    punica.slot_ranks[0] = 4  # an adapter that was there before
    experts = SimpleNamespace(lora_a=torch.zeros(2, 8, HIDDEN), lora_b=torch.zeros(2, 8, 8))  # a 3-D MoE layer
    manager = SimpleNamespace(
        lora_index_to_id=[7], _registered_adapters={7: SimpleNamespace(rank=8, loras={"experts": experts})},
        punica_wrapper_mapping={"language_model": punica},
    )  # fmt: skip
    record_slot_rank(manager, 7)
    assert punica.slot_ranks == {}


def test_slot_groups() -> None:
    assert slot_groups(torch.tensor([-1, -1])) == []
    assert slot_groups(torch.tensor([2, 2])) == [(2, None)]
    groups = slot_groups(torch.tensor([1, -1, 0, 1]))
    assert [(slot, rows.tolist()) for slot, rows in groups] == [(0, [2]), (1, [0, 3])]


def test_a_batch_of_several_slots_is_padded_to_at_most_twice_its_rows() -> None:
    for indices in ([0] * 30 + [1, 2, 3], [0, 1] * 16, [3, 2, 1, 0, -1] * 7, list(range(4)) * 50 + [0] * 300):
        groups = slot_groups(torch.tensor(indices))
        batch = batch_of(groups, len(indices))
        assert batch is not None
        rows = sum(1 for i in indices if i >= 0)
        assert len(batch.piece_slots) * batch.width <= 2 * rows + batch.width, indices
        assert sorted(batch.rows.tolist()) == [t for t, i in enumerate(indices) if i >= 0]
        assert batch.gather.index_select(0, batch.valid).tolist() == batch.rows.tolist()
    assert batch_of(slot_groups(torch.tensor([-1, -1])), 2) is None  # no adapter rows: no LoRA work
    whole = batch_of(slot_groups(torch.tensor([2, 2, 2])), 3)  # one slot has every row
    assert whole is not None and whole.rows.tolist() == [0, 1, 2] and whole.piece_slots == [2]


def test_slot_weights_are_kept_between_steps_until_an_adapter_is_put_in_a_slot() -> None:
    ranks = {0: 8, 1: 16, 2: 4, 3: 1}
    index = torch.tensor([0, 1, 2, 3, 0, 1])
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(len(index), HIDDEN, generator=gen)
    a = [stacked(ranks, BOUND, HIDDEN, seed=10 + i, b=False) for i in range(3)]
    b = [stacked(ranks, size, BOUND, seed=20 + i, b=True) for i, size in enumerate(OUTPUTS)]
    punica = wrapper(index, ranks)
    first = torch.zeros(len(index), sum(OUTPUTS))
    punica.add_lora_linear(first, x, tuple(a), tuple(b), 1.0, OUTPUTS)
    assert punica._weights  # kept for the next step

    for weights in (*a, *b):  # vLLM copies another adapter into slot 1's buffers, in place
        weights[1].mul_(2)
    stale = torch.zeros_like(first)
    punica.add_lora_linear(stale, x, tuple(a), tuple(b), 1.0, OUTPUTS)
    assert torch.equal(stale, first)  # the kept stacks were used (no gather this step)
    punica.forget_weights()  # what record_slot_rank does on every activation
    fresh = torch.zeros_like(first)
    punica.add_lora_linear(fresh, x, tuple(a), tuple(b), 1.0, OUTPUTS)
    assert torch.allclose(fresh, reference(torch.zeros_like(first), x, a, b, 1.0, index), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(fresh, first)
