"""Writes docs/benchmarks/tail-latency.{json,md,png} from a `loadtests.tail_bench` run."""

from __future__ import annotations

import json
import math
from pathlib import Path

from serve.config import EngineConfig

Figures = dict[str, float | int | str]
Results = dict[str, dict[str, Figures]]


def _get(results: Results, system: str, workload: str, column: str) -> float:
    try:
        return float(results[system][workload][column])
    except (KeyError, TypeError, ValueError):
        return math.nan


def p99_vs_base(results: Results, system: str, workload: str) -> float:
    return _get(results, system, workload, "ttft_p99_ms") / _get(results, system, "base", "ttft_p99_ms")


def tok_vs(results: Results, system: str, other: str, workload: str, column: str = "tok_per_s") -> float:
    return _get(results, system, workload, column) / _get(results, other, workload, column)


def write(out: Path, results: Results, engine: EngineConfig, machine: str, command: str) -> str:
    """Writes the report; returns its summary line."""
    out.mkdir(parents=True, exist_ok=True)
    document = {"machine": machine, "command": command, "results": results}
    (out / "tail-latency.json").write_text(json.dumps(document, indent=2) + "\n")
    slots = engine.lora_slots(on_cpu=True)
    lines = [
        "# Time to first token with many adapters\n",
        f"Machine: {machine}.  ",
        f"Command: `{command}` (every system in each round, the order reversed every other round; each figure the "
        "median over the rounds).  ",
        f"Engine (every system): max_loras={slots}, max_cpu_loras={engine.unpinned_cache_entries(slots)}, "
        f"max_num_seqs={engine.max_num_seqs}, max_lora_rank={engine.max_lora_rank}, SmolLM2-135M-Instruct, rank-8 "
        f"adapters; loraplex's slot policy: slot_wait_s={engine.slot_wait_s}, slot_pause_s={engine.slot_pause_s}, "
        f"slot_hold_s={engine.slot_hold_s}.\n",
        "Workloads and systems: see the docstring of `loadtests/tail_bench.py`. `p99/base` is a workload's TTFT p99 "
        "over the same system's base-only p99; `steady` counts the tokens streamed until the last request was sent "
        "(a closed loop's drain left out); `worst` the longest single TTFT; `rare worst` the longest TTFT of "
        "the never-used adapters of `rare`.\n",
        "| system | workload | tok/s | tok/s vs fcfs | steady tok/s vs fcfs | TTFT p50 ms | TTFT p99 ms | p99/base "
        "| worst ms | rare worst ms | TPOT p99 ms | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for system, per_workload in results.items():
        if "failure" in per_workload:
            lines.append(f"| {system} | failed: {per_workload['failure']['error']} |||||||||")
        for workload, f in per_workload.items():
            if workload == "failure":
                continue
            versus = tok_vs(results, system, "loraplex-fcfs", workload)
            steady = tok_vs(results, system, "loraplex-fcfs", workload, "steady_tok_per_s")
            lines.append(
                f"| {system} | {workload} | {f['tok_per_s']} | {versus:.2f} | {steady:.2f} "
                f"| {f['ttft_p50_ms']} | {f['ttft_p99_ms']} | {p99_vs_base(results, system, workload):.2f} "
                f"| {f['ttft_max_ms']} | {f.get('rare_ttft_max_ms', '-')} | {f['tpot_p99_ms']} | {f['errors']} |"
            )
    lines += ["", "Worst TTFT (ms) by popularity rank of the adapter (rank 1 the most used):", ""]
    bands = sorted({c.removeprefix("ttft_max_ms_rank_") for p in results.values() for w in p.values()
                    for c in w if c.startswith("ttft_max_ms_rank_")}, key=lambda b: int(b.split("-")[0]))  # fmt: skip
    lines += ["| system | workload | " + " | ".join(f"ranks {b}" for b in bands) + " |",
              "|---|---|" + "---|" * len(bands)]  # fmt: skip
    for system, per_workload in results.items():
        for workload, f in per_workload.items():
            if workload.startswith("zipf"):
                cells = " | ".join(str(f.get(f"ttft_max_ms_rank_{b}", "-")) for b in bands)
                lines.append(f"| {system} | {workload} | {cells} |")
    lines += ["", "![TTFT by popularity rank](tail-latency.png)", ""]
    summary = (
        f"tail zipf64_p99_vs_base={p99_vs_base(results, 'loraplex', 'zipf64'):.2f} "
        f"zipf64_warm_p99_vs_base={p99_vs_base(results, 'loraplex', 'zipf64-warm'):.2f} "
        f"zipf512_p99_vs_base={p99_vs_base(results, 'loraplex', 'zipf512'):.2f} "
        f"rare_worst_ms={_get(results, 'loraplex', 'rare', 'rare_ttft_max_ms'):.0f} "
        f"zipf64_tok_vs_fcfs={tok_vs(results, 'loraplex', 'loraplex-fcfs', 'zipf64'):.2f} "
        f"zipf64_steady_tok_vs_fcfs={tok_vs(results, 'loraplex', 'loraplex-fcfs', 'zipf64', 'steady_tok_per_s'):.2f}"
    )
    lines += ["```", summary, "```", ""]
    (out / "tail-latency.md").write_text("\n".join(lines))
    plot(out / "tail-latency.png", results, bands)
    return summary


def plot(file: Path, results: Results, bands: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for axis, workload in zip(axes, ("zipf64", "zipf512"), strict=True):
        for system, per_workload in results.items():
            figures = per_workload.get(workload, {})
            points = [(b, float(figures[f"ttft_max_ms_rank_{b}"]) / 1000) for b in bands
                      if f"ttft_max_ms_rank_{b}" in figures]  # fmt: skip
            if points:
                axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=system)
        axis.set_title(f"{workload}: worst TTFT by adapter popularity rank")
        axis.set_xlabel("popularity rank of the adapter (1 = most used)")
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("worst TTFT (s)")
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(file, dpi=110)
    plt.close(figure)
