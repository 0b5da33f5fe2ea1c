"""`make soak`: 10 minutes at ~70 % of capacity with mixed adapters — memory, errors and latency over time.

1. Capacity: a closed loop (32 concurrent streamed completions, base model and 8 adapters) measures
   the requests per second this machine sustains.
2. Soak: an open loop at 70 % of that rate, one-minute windows back to back; after each window the
   server's resident memory (all its processes) and the window's errors and latencies are recorded.

Writes docs/benchmarks/soak.md, soak.json and soak.png; ends with
`soak minutes=<n> errors=<n> rss_growth_mib=<first to last window>`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx

from loadtests.adapters_bench import register, server_rss_bytes, start
from loadtests.bench import machine
from loadtests.loadgen import Workload, run
from serve.config import EngineConfig
from serve.demo.assets import DEFAULT_MODEL_NAME, bench_adapters, build_adapters, build_default_model

ADAPTERS = 8
MAX_TOKENS = 32


def window(report: Any, minute: int, rss_mib: float) -> dict[str, Any]:
    summary = report.summary()
    latencies = sorted(r.latency for r in report.ok)
    return {
        "minute": minute,
        "requests": summary["requests"],
        "errors": summary["errors"],
        "req_per_s": summary["req_per_s"],
        "tok_per_s": summary["tok_per_s"],
        "latency_p50_s": latencies[len(latencies) // 2] if latencies else float("nan"),
        "latency_p99_s": latencies[int(0.99 * (len(latencies) - 1))] if latencies else float("nan"),
        "ttft_p50_ms": summary["ttft_p50_ms"],
        "rss_mib": rss_mib,
    }


def plot(rows: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = [r["minute"] for r in rows]
    fig, (memory, latency) = plt.subplots(1, 2, figsize=(11, 3.8))
    memory.plot(minutes, [r["rss_mib"] for r in rows], "o-")
    top = max(r["rss_mib"] for r in rows) * 1.2
    memory.set(xlabel="window (about a minute each)", ylabel="server RSS (MiB)", ylim=(0, top))
    latency.plot(minutes, [r["latency_p50_s"] for r in rows], "o-", label="p50")
    latency.plot(minutes, [r["latency_p99_s"] for r in rows], "o-", label="p99")
    latency.set(xlabel="window (about a minute each)", ylabel="request latency (s)")
    latency.legend()
    fig.tight_layout()
    fig.savefig(out / "soak.png", dpi=110)


def write(out: Path, result: dict[str, Any], command: str) -> str:
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(result, indent=2))
    rows = result["windows"]
    plot(rows, out)
    growth = rows[-1]["rss_mib"] - rows[0]["rss_mib"]
    errors = sum(r["errors"] for r in rows)
    lines = [
        "# Soak: 10 one-minute windows at ~70 % of capacity, mixed adapters",
        "",
        f"Machine: {result['machine']}. Command: `{command}`.",
        f"Capacity (closed loop, 32 concurrent, {MAX_TOKENS}-token streamed completions over the base model and "
        f"{ADAPTERS} rank-8 adapters): {result['capacity_req_per_s']:.2f} req/s; soak rate "
        f"{result['rate_req_per_s']:.2f} req/s (open loop, Poisson arrivals).",
        "",
        "Each window sends one minute's worth of Poisson arrivals, then waits for its last request to finish;",
        "its length (first send to last answer) is shown.",
        "",
        "| window | length | requests | errors | req/s | tok/s | latency p50 | latency p99 | TTFT p50 | server RSS |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *[
            f"| {r['minute']} | {r['requests'] / r['req_per_s'] if r['req_per_s'] else float('nan'):.0f} s | "
            f"{r['requests']} | {r['errors']} | {r['req_per_s']:.2f} | {r['tok_per_s']:.1f} | "
            f"{r['latency_p50_s']:.2f} s | {r['latency_p99_s']:.2f} s | {r['ttft_p50_ms']:.0f} ms | "
            f"{r['rss_mib']:.0f} MiB |"
            for r in rows
        ],
        "",
        f"Memory from the first to the last window: {growth:+.0f} MiB; errors: {errors}.",
        "",
        "![memory and latency per minute](soak.png)",
        "",
    ]
    (out / "soak.md").write_text("\n".join(lines))
    return f"soak minutes={len(rows)} errors={errors} rss_growth_mib={growth:.0f}"


async def soak(url: str, pid: int, models: tuple[str, ...], minutes: int) -> dict[str, Any]:
    probe = Workload("capacity", models, popularity="uniform", num_requests=64, concurrency=32, max_tokens=MAX_TOKENS)
    capacity = (await run(url, probe)).requests_per_s
    rate = 0.7 * capacity
    rows = []
    for minute in range(1, minutes + 1):
        load = Workload(f"minute-{minute}", models, popularity="uniform", num_requests=max(1, round(rate * 60)),
                        rate=rate, max_tokens=MAX_TOKENS, seed=minute)  # fmt: skip
        report = await run(url, load)
        rows.append(window(report, minute, server_rss_bytes(pid) / 2**20))
        print(json.dumps(rows[-1]), flush=True)
    return {"capacity_req_per_s": capacity, "rate_req_per_s": rate, "windows": rows}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--assets", type=Path, default=Path(".loraplex"))
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    parser.add_argument("--minutes", type=int, default=10)
    args = parser.parse_args(argv)

    model = build_default_model(args.assets / "models" / DEFAULT_MODEL_NAME).resolve()
    folders = build_adapters(model, bench_adapters(ADAPTERS), args.assets / "bench-adapters")
    tmp = tempfile.TemporaryDirectory(prefix="loraplex-soak-")
    roots = [(args.assets / "bench-adapters").resolve()]
    with tmp, start(model, Path(tmp.name), roots, {}) as server:
        for name, folder in folders.items():
            register(server.url, name, str(folder.resolve()))
        base = EngineConfig(model=str(model)).model_id
        httpx.post(f"{server.url}/v1/completions", json={"model": base, "prompt": "Hi", "max_tokens": 2}, timeout=300)
        result = asyncio.run(soak(server.url, server.pid, (base, *folders), args.minutes))
    result["machine"] = machine()
    arguments = " ".join(sys.argv[1:] if argv is None else argv)
    command = f"python -m loadtests.soak {arguments}" if arguments else "make soak"
    print(write(args.out, result, command))


if __name__ == "__main__":
    main()
