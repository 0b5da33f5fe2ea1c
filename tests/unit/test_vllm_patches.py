"""The CPU LoRA fix: base-model rows (LoRA index -1) get no delta, adapter rows are unchanged."""

from __future__ import annotations

import torch

from serve.vllm_patches import _masked


def reference_shrink(inputs: torch.Tensor, weights: torch.Tensor, output: torch.Tensor, indices: torch.Tensor,
                     scaling: float = 1.0) -> None:  # fmt: skip
    """vLLM 0.32.0's torch bgmv_shrink, as shipped: `weights[-1]` for base rows."""
    selected = weights[indices]
    output[:, : selected.shape[1]] = scaling * torch.einsum("bi, boi -> bo", inputs, selected)


def test_base_rows_get_no_delta_and_adapter_rows_are_unchanged() -> None:
    torch.manual_seed(0)
    inputs = torch.randn(3, 8)
    weights = torch.randn(2, 4, 8)  # two LoRA slots, rank 4
    indices = torch.tensor([-1, 0, 1])

    shipped = torch.zeros(3, 4)
    reference_shrink(inputs, weights, shipped, indices)
    assert shipped[0].abs().sum() > 0  # the defect: the base row picked up slot 1's LoRA

    fixed = torch.zeros(3, 4)
    _masked(reference_shrink)(inputs, weights, fixed, indices)
    assert torch.equal(fixed[0], torch.zeros(4))
    assert torch.allclose(fixed[1:], shipped[1:])


def test_batches_without_base_rows_take_the_original_path() -> None:
    calls = []
    _masked(lambda *args: calls.append(args[3]))(torch.ones(2, 8), torch.ones(1, 4, 8), torch.zeros(2, 4),
                                                 torch.tensor([0, 0]))  # fmt: skip
    assert torch.equal(calls[0], torch.tensor([0, 0]))


def test_the_patch_reaches_the_cpu_punica_wrapper() -> None:
    from vllm.lora.punica_wrapper import punica_cpu

    from serve.vllm_patches import register

    register()
    assert punica_cpu.bgmv_shrink.__code__ is _masked(reference_shrink).__code__


def _layer(cls: type, n_slices: int, slots: int = 2, max_rank: int = 16, dims: tuple[int, int] = (12, 10)) -> object:
    """A LoRA linear layer's buffers and what its `set_lora` reads, without a model around it."""
    layer = object.__new__(cls)
    layer.__dict__.update(
        tp_size=1, n_slices=n_slices,
        lora_a_stacked=tuple(torch.zeros(slots, 1, max_rank, dims[0]) for _ in range(n_slices)),
        lora_b_stacked=tuple(torch.zeros(slots, 1, dims[1], max_rank) for _ in range(n_slices)),
    )  # fmt: skip
    return layer


Buffers = tuple[list[torch.Tensor], list[torch.Tensor]]


def _full_reset_then_write(buffers: Buffers, index: int, a: list, b: list) -> None:
    """vLLM's own behaviour: the whole slot zeroed, then each slice's weights written at its top-left."""
    for stacked in (*buffers[0], *buffers[1]):
        stacked[index] = 0
    for stacked, weights in ((buffers[0], a), (buffers[1], b)):
        for target, w in zip(stacked, weights, strict=True):
            if w is not None:
                target[index, 0, : w.shape[0], : w.shape[1]] = w


def test_set_lora_zeroes_only_what_the_slot_held_and_leaves_the_buffers_as_a_full_reset_does() -> None:
    """A slot's buffers after any sequence of set_lora/reset_lora equal vLLM's (zero everything, then write), for a
    one-slice and a packed layer, ranks growing and shrinking, a slice without weights; and the reset touches no
    row beyond what the slot's previous adapter wrote (that is the saving: max_lora_rank rows are not zeroed)."""
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA
    from vllm.lora.layers.column_parallel_linear import MergedColumnParallelLinearWithLoRA

    from serve.vllm_patches import _reset_only_what_was_written, written_rank

    _reset_only_what_was_written()
    generator = torch.Generator().manual_seed(0)

    def weights(rank: int, n: int, missing: int | None = None) -> tuple[list, list]:
        a = [torch.randn(rank, 12, generator=generator) for _ in range(n)]
        b = [torch.randn(10, rank, generator=generator) for _ in range(n)]
        if missing is not None:
            a[missing] = b[missing] = None
        return a, b

    for cls, n in ((BaseLinearLayerWithLoRA, 1), (MergedColumnParallelLinearWithLoRA, 2)):
        layer = _layer(cls, n)
        expected = ([t.clone() for t in layer.lora_a_stacked], [t.clone() for t in layer.lora_b_stacked])
        steps = [(0, *weights(8, n)), (1, *weights(4, n)), (0, *weights(2, n)), (1, None, None), (0, *weights(16, n))]
        if n == 2:
            steps.append((1, *weights(6, n, missing=1)))
        for index, a, b in steps:
            if a is None:
                layer.reset_lora(index)
                _full_reset_then_write(expected, index, [None] * n, [None] * n)
            else:
                layer.set_lora(index, a if n > 1 else a[0], b if n > 1 else b[0])
                _full_reset_then_write(expected, index, a, b)
            held = (*layer.lora_a_stacked, *layer.lora_b_stacked)
            for got, want in zip(held, (*expected[0], *expected[1]), strict=True):
                assert torch.equal(got, want), (cls.__name__, index)

        layer.set_lora(0, *(w if n > 1 else w[0] for w in weights(4, n)))
        layer.lora_a_stacked[0][0, 0, 8:] = 7.0  # rows no set_lora wrote (never so in use: to see what is touched)
        layer.set_lora(0, *(w if n > 1 else w[0] for w in weights(2, n)))
        slot = layer.lora_a_stacked[0][0, 0]
        assert torch.all(slot[8:] == 7.0) and torch.all(slot[2:4] == 0)

    assert written_rank(torch.zeros(8, 12), [torch.zeros(10, 8), None]) == 8
    assert written_rank("not a tensor", torch.zeros(10, 8)) is None


def test_the_vocabulary_layers_skip_the_reset_of_a_slot_nothing_was_written_to() -> None:
    """Embedding and logits LoRA buffers (vocabulary-sized) are zeroed only when something was written since."""
    from vllm.lora.layers.logits_processor import LogitsProcessorWithLoRA

    from serve.vllm_patches import _reset_only_what_was_written

    _reset_only_what_was_written()
    layer = object.__new__(LogitsProcessorWithLoRA)
    layer.__dict__.update(lora_a_stacked=torch.zeros(2, 1, 8, 12), lora_b_stacked=torch.zeros(2, 1, 50, 8))
    layer.reset_lora(0)  # zero since made: nothing to do
    layer.set_lora(1, torch.ones(4, 12), torch.ones(50, 4))
    assert layer.lora_b_stacked[1].sum() == 200
    layer.reset_lora(1)
    assert not layer.lora_a_stacked.any() and not layer.lora_b_stacked.any()
    layer.lora_b_stacked[1, 0, 0, 0] = 7.0  # not written by set_lora (never so in use: to see what is touched)
    layer.reset_lora(1)
    assert layer.lora_b_stacked[1, 0, 0, 0] == 7.0
