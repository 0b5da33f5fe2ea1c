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
