"""`make bench-warm`: first-request TTFT of hot adapters on a fresh replica, with and without warming (issue 16).

One real vLLM engine (the demo model), in this process, in a real `serve.replica.Replica` that follows a real
registry (SQLite) as a Serve replica does. The registry has heard from a replica "old" that all `ADAPTERS`
were requested; the fresh replica "new" joins with warming on, so it loads the hot adapters whose rendezvous
home it becomes (about half) and not the others. Then, alternating between the two groups, each adapter's
first request on "new" (warmed, or cold: loaded by that request) and its second (warm: the reference), and
the base model's, are timed to their first streamed token.

Writes docs/benchmarks/warming.md and warming.json; ends with
`warming warmed_first_ms=<p50> cold_first_ms=<p50> warm_ms=<p50> ratio=<warmed first / warm>`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from contextlib import aclosing
from pathlib import Path
from typing import Any

from routing.policy import rendezvous_order
from serve.adapters import registry as registry_module
from serve.adapters.registry import AdapterRegistry
from serve.adapters.resolver import make_resolver
from serve.adapters.store import SqliteStore
from serve.config import AppConfig
from serve.demo.assets import DEFAULT_MODEL_NAME, bench_adapters, build_adapters, build_default_model
from serve.engines.vllm_engine import VLLMEngine
from serve.replica import Replica
from serve.wire import AdapterRecord, LoaderStats, ReplicaReport

ADAPTERS = 12
ROUNDS = 3
"""Requests per adapter after its first (the warm reference is their median)."""
PROMPT = "Summarise the following sentence in one word: the quick brown fox jumps over the lazy dog."


async def first_token_s(replica: Replica, model: str, adapter: AdapterRecord | None) -> float:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 4, "temperature": 0, "stream": True}
    started = time.perf_counter()
    # Closed before the engine stops: a stream the replica still ran then would take the engine for dead.
    async with aclosing(replica.generate("completions", body, adapter=adapter)) as items:
        async for item in items:
            if isinstance(item, str) and '"text"' in item:
                return time.perf_counter() - started
            if not isinstance(item, str) and not hasattr(item, "prompt_tokens"):
                raise RuntimeError(f"{model}: {item}")
    raise RuntimeError(f"no token from {model}")


async def measure(app: AppConfig, registry: AdapterRegistry, warm_adapters: int) -> dict[str, Any]:
    names = sorted(registry._records)
    await registry.report(ReplicaReport(replica="old", adapters=tuple(names), engine_loras=len(names),
                                        stats=LoaderStats(), requests=dict.fromkeys(names, 1)))  # fmt: skip
    replica = Replica(VLLMEngine(app), registry, 0.0, warm_adapters=warm_adapters, replica_id="new")
    started = time.perf_counter()
    await replica.start()
    start_s = time.perf_counter() - started
    if replica._warmer is not None:
        await replica._warmer
    warm_s = time.perf_counter() - started - start_s
    warmed = set(replica._engine.held())
    homed = [n for n in names if rendezvous_order(n, ("new", "old"))[0] == "new"]
    base = app.engine.model_id
    await first_token_s(replica, base, None)  # the engine's own first request (its warm-up) is not an adapter's
    cold = [n for n in names if n not in warmed]
    first: dict[str, float] = {}
    for pair in zip(sorted(warmed), cold, strict=False):
        for name in pair:
            first[name] = await first_token_s(replica, f"{base}:{name}", registry._records[name])
    warm: dict[str, float] = {}
    for name in first:
        times = [await first_token_s(replica, f"{base}:{name}", registry._records[name]) for _ in range(ROUNDS)]
        warm[name] = statistics.median(times)
    base_ms = statistics.median([await first_token_s(replica, base, None) for _ in range(ROUNDS)])
    replica.__del__()

    def p50(values: list[float]) -> float:
        return round(1000 * statistics.median(values), 1) if values else float("nan")

    return {
        "engine_start_s": round(start_s, 1),
        "warming_s": round(warm_s, 2),
        "homed_at_new": homed,
        "warmed": sorted(warmed),
        "first_ms": {n: round(1000 * t, 1) for n, t in first.items()},
        "warm_ms": {n: round(1000 * t, 1) for n, t in warm.items()},
        "warmed_first_p50_ms": p50([first[n] for n in first if n in warmed]),
        "cold_first_p50_ms": p50([first[n] for n in first if n not in warmed]),
        "warm_p50_ms": p50(list(warm.values())),
        "base_p50_ms": round(1000 * base_ms, 1),
    }


def write(out: Path, result: dict[str, Any], machine: str, command: str) -> str:
    out.mkdir(parents=True, exist_ok=True)
    result = {"machine": machine, "command": command, **result}
    (out / "warming.json").write_text(json.dumps(result, indent=2))
    ratio = result["warmed_first_p50_ms"] / result["warm_p50_ms"]
    cold_ratio = result["cold_first_p50_ms"] / result["warm_p50_ms"]
    summary = (f"warming warmed_first_ms={result['warmed_first_p50_ms']} cold_first_ms={result['cold_first_p50_ms']} "
               f"warm_ms={result['warm_p50_ms']} ratio={ratio:.2f}")  # fmt: skip
    rows = [
        f"| {name} | {'warmed' if name in result['warmed'] else 'cold'} | {result['first_ms'][name]} | "
        f"{result['warm_ms'][name]} |"
        for name in result["first_ms"]
    ]
    lines = [
        "# Warming: first-request TTFT of hot adapters on a replica that joins",
        "",
        f"Machine: {machine}. Command: `{command}`. Demo model, rank-8 adapters, one real vLLM engine in a real "
        "replica following a real registry (SQLite), in one process (loadtests/warm_bench.py).",
        "",
        f"The registry has heard that all {len(result['first_ms'])} adapters were requested on another replica; "
        f"the new replica warmed the hot ones whose rendezvous home it became ({len(result['warmed'])}, in "
        f"{result['warming_s']} s after its engine started) and not the others. Time to the first streamed token, "
        "first request of each adapter on the new replica against the median of its next "
        f"{ROUNDS} (warm):",
        "",
        "| | first request p50 | warm p50 | first / warm |",
        "|---|---|---|---|",
        f"| warmed when the replica joined | {result['warmed_first_p50_ms']} ms | {result['warm_p50_ms']} ms | "
        f"**{ratio:.2f}×** |",
        f"| not warmed (loaded by its first request) | {result['cold_first_p50_ms']} ms | {result['warm_p50_ms']} ms "
        f"| {cold_ratio:.2f}× |",
        f"| base model (reference) | | {result['base_p50_ms']} ms | |",
        "",
        "Goal (issue 16): hot adapters on a warmed new replica within 1.2× of a warm one.",
        "",
        "| adapter | on joining | first request (ms) | warm (ms) |",
        "|---|---|---|---|",
        *rows,
        "",
        summary,
    ]
    (out / "warming.md").write_text("\n".join(lines) + "\n")
    return summary


def main(argv: list[str] | None = None) -> None:
    from loadtests.bench import machine

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--assets", type=Path, default=Path(".loraplex"))
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    parser.add_argument("--warm-adapters", type=int, default=8)
    args = parser.parse_args(argv)
    model = build_default_model(args.assets / "models" / DEFAULT_MODEL_NAME).resolve()
    root = (args.assets / "bench-adapters").resolve()
    folders = build_adapters(model, bench_adapters(ADAPTERS), root)
    # "old" stands for a replica serving all along: it stays live however long this engine takes to start.
    registry_module.LIVE_S = float("inf")
    with tempfile.TemporaryDirectory(prefix="loraplex-warm-") as tmp:
        app = AppConfig.model_validate({
            "engine": {"model": str(model)},
            "registry": {"cache_dir": f"{tmp}/cache", "local_roots": [str(root)], "state_file": f"{tmp}/r.json"},
        })  # fmt: skip
        registry = AdapterRegistry(SqliteStore(Path(tmp) / "registry.db"), model, make_resolver(app),
                                   max_rank=app.engine.max_lora_rank, max_bytes=10**9)  # fmt: skip
        for name, folder in folders.items():
            if not isinstance(outcome := asyncio.run(registry.register(name, str(folder))), AdapterRecord):
                raise RuntimeError(f"{name}: {outcome}")
        result = asyncio.run(measure(app, registry, args.warm_adapters))
    print(write(args.out, result, machine(), "make bench-warm"))


if __name__ == "__main__":
    main()
