"""Micro-benchmark of loraplex's CPU LoRA ops on one packed q/k/v layer of the demo model's shape.

`python -m loadtests.lora_ops_bench`: time per `add_lora_linear` call, per slot loop (the ops before issue 14
item 4) and batched (one bmm per product, kept weight stacks), for 8 slots x 32 rows, 1 slot x 32 rows and
8 slots x 256 rows, rank-8 adapters in buffers bounded at rank 64, one torch thread. No model, no engine.
"""

from __future__ import annotations

import time

import torch

from serve.cpu_lora import GroupedPunicaWrapperCPU

SLOTS, BOUND, HIDDEN, RANK = 8, 64, 576, 8
OUTPUTS = (576, 192, 192)  # SmolLM2-135M's q, k, v


def stacked(rows: int, cols: int, *, b: bool) -> torch.Tensor:
    weights = torch.zeros(SLOTS, 1, rows, cols)
    for slot in range(SLOTS):
        if b:
            weights[slot, 0, :, :RANK] = torch.randn(rows, RANK)
        else:
            weights[slot, 0, :RANK, :] = torch.randn(RANK, cols)
    return weights


def time_call(groups: int, rows: int, batched: bool, calls: int = 200) -> float:
    """Microseconds per call."""
    a = tuple(stacked(BOUND, HIDDEN, b=False) for _ in OUTPUTS)
    b = tuple(stacked(size, BOUND, b=True) for size in OUTPUTS)
    indices = torch.arange(rows) % groups
    punica = GroupedPunicaWrapperCPU(4096, SLOTS, "cpu")
    punica.no_lora, punica.is_prefill = False, True
    punica.use_indices(indices, indices)
    if not batched:
        punica._token_batch = None  # the per-slot loop
    punica.slot_ranks.update(dict.fromkeys(range(SLOTS), RANK))
    x, y = torch.randn(rows, HIDDEN), torch.zeros(rows, sum(OUTPUTS))
    for _ in range(20):
        punica.add_lora_linear(y, x, a, b, 1.0, OUTPUTS)
    started = time.perf_counter()
    for _ in range(calls):
        punica.add_lora_linear(y, x, a, b, 1.0, OUTPUTS)
    return (time.perf_counter() - started) / calls * 1e6


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    for groups, rows in ((8, 32), (1, 32), (8, 256)):
        loop, batched = time_call(groups, rows, False), time_call(groups, rows, True)
        print(f"{groups} slots x {rows} rows: per slot {loop:,.0f} us, batched {batched:,.0f} us per q/k/v layer")


if __name__ == "__main__":
    main()
