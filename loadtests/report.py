"""Writes a benchmark run under docs/benchmarks/: results.json, a markdown table, and plots."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from serve.config import EngineConfig
from serve.engines.vllm_engine import serving_dtype

Results = dict[str, dict[str, dict[str, float | int | str]]]
REFERENCE = "vllm"
COLUMNS = ("tok_per_s", "req_per_s", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms", "errors")


def median_of(rounds: list[Results], columns: tuple[str, ...] | None = COLUMNS, digits: int = 2) -> Results:
    """Each figure's median over the rounds that measured it (`columns`; None: every numeric one, and the first value
    of any other), `errors` the sum, `rounds` how many; a failure in any round is kept."""
    merged: Results = {}
    for system in dict.fromkeys(s for one in rounds for s in one):
        merged[system] = {}
        failures = [f"round {i + 1}: {one[system]['failure']['error']}" for i, one in enumerate(rounds)
                    if "failure" in one.get(system, {})]  # fmt: skip
        if failures:
            merged[system]["failure"] = {"error": "; ".join(failures)}
        for workload in dict.fromkeys(w for one in rounds for w in one.get(system, {}) if w != "failure"):
            rows = [one[system][workload] for one in rounds if workload in one.get(system, {})]
            figures: dict[str, float | int | str] = {}
            for column in columns or tuple(dict.fromkeys(c for row in rows for c in row)):
                values = [row[column] for row in rows if column in row]
                if column == "errors":
                    figures[column] = sum(int(v) for v in values)
                elif all(isinstance(v, (int, float)) for v in values):
                    figures[column] = round(statistics.median(float(v) for v in values), digits)
                else:
                    figures[column] = values[0]
            figures["rounds"] = len(rows)
            merged[system][workload] = figures
    return merged


def ratio(results: Results, system: str, workload: str) -> float:
    try:
        ours = float(results[system][workload]["tok_per_s"])
        theirs = float(results[REFERENCE][workload]["tok_per_s"])
    except KeyError:
        return math.nan
    return ours / theirs if theirs else math.nan


def vs_base(results: Results, system: str, workload: str) -> float:
    try:
        base = float(results[system]["base"]["tok_per_s"])
        return float(results[system][workload]["tok_per_s"]) / base if base else math.nan
    except KeyError:
        return math.nan


def ttft_delta(results: Results, system: str, workload: str) -> str:
    """p50 time to first token minus vLLM's, in ms, signed."""
    try:
        delta = float(results[system][workload]["ttft_p50_ms"]) - float(results[REFERENCE][workload]["ttft_p50_ms"])
    except KeyError:
        return "-"
    return f"{delta:+.0f} ms"


PEERS_STOCK = (
    'vLLM\'s server and Ray Serve LLM run vLLM 0.32.0 as shipped (`VLLM_PLUGINS=""`); loraplex runs it with its vLLM '
    "plugin: the base-row fix and its CPU LoRA ops ([serve/cpu_lora.py](../../serve/cpu_lora.py))."
)
PEERS_WITH_PLUGIN = "All three run vLLM 0.32.0 with loraplex's vLLM plugin (`--peers-with-loraplex-plugin`)."


def write_report(
    out: Path, rounds: list[Results], engine: EngineConfig, machine: str, command: str, peers: str = PEERS_STOCK
) -> str:
    """Writes the report of one or more rounds; returns its last line,
    `throughput_vs_vllm base=... adapters8=... zipf64=...` (ratios of the median tok/s over the rounds)."""
    out.mkdir(parents=True, exist_ok=True)
    results = median_of(rounds)
    document = {"machine": machine, "command": command, "results": results, "rounds": rounds}
    (out / "results.json").write_text(json.dumps(document, indent=2) + "\n")
    workloads = sorted({w for per_system in results.values() for w in per_system if w != "failure"},
                       key=["base", "adapters8", "zipf64", "idle"].index)  # fmt: skip
    lines = [
        "# Benchmarks: vLLM's OpenAI server vs loraplex vs Ray Serve LLM",
        "",
        f"Machine: {machine}.  ",
        f"Command: `{command}`.  ",
        f"Engine settings (identical for all three): max_lora_rank={engine.max_lora_rank}, "
        f"max_loras={engine.lora_slots(on_cpu=True)}, "
        f"max_cpu_loras={engine.unpinned_cache_entries(engine.lora_slots(on_cpu=True))}, "
        f"max_num_seqs={engine.max_num_seqs}, max_model_len={engine.max_model_len}, "
        f"dtype={serving_dtype(engine, on_cpu=True)}, "
        f"KV cache {engine.kv_cache_gib:g} GiB, SmolLM2-135M-Instruct, rank-8 adapters.",
        peers,
        "",
        "Each workload: streamed `/v1/completions`, `ignore_eos`, closed loop; see `loadtests/loadgen.py`. "
        f"{len(rounds)} round(s), systems in reverse order every other round; each figure is the median over the "
        "rounds, `errors` the sum of failed requests. Where loraplex's overhead goes: [overhead.md](../overhead.md).",
        "",
        "| system | workload | " + " | ".join(COLUMNS) + " | tok/s vs vLLM | p50 TTFT vs vLLM |",
        "|---|---|" + "---|" * (len(COLUMNS) + 2),
    ]
    for system, per_system in results.items():
        if "failure" in per_system:
            lines.append(f"| {system} | (failed) | {per_system['failure']['error']} |" + " |" * len(COLUMNS))
        for workload in workloads:
            row = per_system.get(workload)
            if row is None:
                continue
            cells = " | ".join(str(row[c]) for c in COLUMNS)
            lines.append(
                f"| {system} | {workload} | {cells} | {ratio(results, system, workload):.2f} | "
                f"{ttft_delta(results, system, workload)} |"
            )
    if {"base", "adapters8"} <= set(workloads):
        lines += [
            "",
            "Mixed adapters vs base only, on the same server (output tok/s of the adapter workload / base):",
            "",
            "| system | adapters8 / base | zipf64 / base |",
            "|---|---|---|",
        ]
    for system in results if {"base", "adapters8"} <= set(workloads) else ():
        cells = " | ".join(f"{vs_base(results, system, w):.2f}" for w in ("adapters8", "zipf64"))
        lines.append(f"| {system} | {cells} |")
    failures = [
        f"- {system} / {workload}, round {i + 1}: `{row['first_error']}`"
        for i, one in enumerate(rounds)
        for system, per_system in one.items()
        for workload, row in per_system.items()
        if "first_error" in row
    ]
    if failures:
        lines += ["", "First failed request of each row with errors:", "", *failures]
    if len(rounds) > 1:
        lines += ["", "Every round (output tok/s, and the ratio to vLLM's server in the same round):", "",
                  "| system | workload | " + " | ".join(f"round {i + 1}" for i in range(len(rounds))) + " |",
                  "|---|---|" + "---|" * len(rounds)]  # fmt: skip
        for system, per_system in results.items():
            for workload in workloads:
                if workload not in per_system:
                    continue
                cells = []
                for one in rounds:
                    row = one.get(system, {}).get(workload)
                    cells.append("-" if row is None else f"{row['tok_per_s']} ({ratio(one, system, workload):.2f})")
                lines.append(f"| {system} | {workload} | " + " | ".join(cells) + " |")
    final = "throughput_vs_vllm " + " ".join(
        f"{w}={ratio(results, 'loraplex', w):.2f}" for w in ("base", "adapters8", "zipf64")
    )
    lines += ["", "![throughput](throughput.png)", "", "```", final, "```", ""]
    (out / "README.md").write_text("\n".join(lines))
    plot(out, results, workloads)
    return final


def plot(out: Path, results: Results, workloads: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = [s for s in results if any(w in results[s] for w in workloads)]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / max(len(systems), 1)
    for i, system in enumerate(systems):
        xs = [j + i * width for j in range(len(workloads))]
        tput = [float(results[system].get(w, {}).get("tok_per_s", 0)) for w in workloads]
        ttft = [float(results[system].get(w, {}).get("ttft_p50_ms", 0)) for w in workloads]
        axes[0].bar(xs, tput, width, label=system)
        axes[1].bar(xs, ttft, width, label=system)
    for axis, title in zip(axes, ("output tokens/s (higher is better)", "p50 TTFT ms (lower is better)"), strict=True):
        axis.set_xticks([j + width * (len(systems) - 1) / 2 for j in range(len(workloads))], workloads)
        axis.set_title(title)
        axis.legend()
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=100)
    plt.close(fig)
