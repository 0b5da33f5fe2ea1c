"""`make bench-tail`: time to first token with many adapters, vLLM's server and loraplex with and without its slot
policy, in rounds (`--rounds`, 2: every system in each, the order reversed every other round; each figure the
median over the rounds). Writes docs/benchmarks/tail-latency.{md,json,png} and ends with
`tail zipf64_p99_vs_base=<ratio> zipf512_p99_vs_base=<ratio> rare_worst_ms=<ms> zipf64_tok_vs_fcfs=<ratio>`.

Workloads (streamed completions of 64 tokens, `ignore_eos`; loadtests/loadgen.py):
- base: 64 requests to the base model, 32 streams;
- zipf64 / zipf512: 64 requests over 64 adapters (Zipf 1.1) / 512 adapters (Zipf 1.0), 32 streams;
- zipf64-warm: zipf64's requests again, right after it: the same adapters, now on the node and in the engine's
  adapter cache. zipf64 opens with a burst of 32 requests over ~20 adapters none of which is loaded; this pass
  tells the slot waits from that cold start;
- rare: 64 requests over 4 adapters, 32 streams, and one request a second for each of 30 adapters never used before.
Systems: `vllm` (vLLM's OpenAI server: first come, first served within `max_loras`), `loraplex-fcfs` (loraplex
with `slot_wait_s: null`, today's rule), `loraplex` (the slot policy, serve/slots.py) and, with `--replicas` above 1,
`loraplex-slot-unaware` (the slot policy in each engine, but the request router choosing by affinity alone:
`engine_deployment.affinity_slot_aware: false`; vLLM's server has no replicas of its own), all with the same engine
settings and the same ops: vLLM's server loads loraplex's vLLM plugin too (its CPU LoRA ops and base-row fix; the
slot policy is off there, as no `additional_config` asks for it). vLLM's own CPU LoRA ops are several times
slower at rank bound 64 (docs/benchmarks/same-ops), which would compare ops, not scheduling.
The 512 adapters are 64 seeded PEFT adapters, each also served under 7 more names (hard
links): every name is its own adapter to both servers (its own id, load and slot).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from loadtests.bench import LOGS, STARTERS, STOCK_VLLM, Setup, machine, warm_up
from loadtests.loadgen import Report, Workload, run
from loadtests.report import median_of
from serve.config import AdapterConfig, EngineConfig
from serve.demo.assets import DEFAULT_MODEL_NAME, bench_adapters, build_adapters, build_default_model
from serve.wire import adapter_model_id

SYSTEMS = ("vllm", "loraplex-fcfs", "loraplex")
REPLICATED = ("loraplex-fcfs", "loraplex-slot-unaware", "loraplex")
"""The systems of a run with `--replicas` above 1."""
DISTINCT, ZIPF_ADAPTERS, RARE_ADAPTERS = 64, 512, 30
Figures = dict[str, float | int | str]


def adapter_folders(assets: Path, model_dir: Path) -> dict[str, Path]:
    """`a000`..`a511` and `r00`..`r29`: 64 built adapters and hard-linked copies of them under the other names."""
    built = build_adapters(model_dir, bench_adapters(DISTINCT), assets / "bench-adapters")
    sources = [built[spec.name] for spec in bench_adapters(DISTINCT)]
    root = assets / "tail-adapters"
    names = [f"a{i:03d}" for i in range(ZIPF_ADAPTERS)] + [f"r{i:02d}" for i in range(RARE_ADAPTERS)]
    folders = {}
    for index, name in enumerate(names):
        folder = root / name
        if not folder.exists():
            partial = root / f".tmp-{name}"
            partial.mkdir(parents=True, exist_ok=True)
            for file in sources[index % DISTINCT].iterdir():
                if file.is_file() and not (partial / file.name).exists():
                    os.link(file, partial / file.name)
            partial.rename(folder)
        folders[name] = folder
    return folders


def tail_workloads(
    base: str, ids: dict[str, str], zipf_adapters: int = ZIPF_ADAPTERS, requests: int = 64, concurrency: int = 32
) -> list[Workload]:
    """The workloads, with `ids` the model id of each adapter name (`a000`.., `r00`..)."""
    zipf = [ids[f"a{i:03d}"] for i in range(zipf_adapters)]
    rare = tuple(ids[f"r{i:02d}"] for i in range(RARE_ADAPTERS))
    common = {"num_requests": requests, "concurrency": concurrency, "max_tokens": 64}
    return [
        Workload("base", (base,), popularity="single", **common),
        Workload("zipf64", tuple(zipf[:64]), popularity="zipf", **common),
        Workload("zipf64-warm", tuple(zipf[:64]), popularity="zipf", **common),
        Workload(f"zipf{zipf_adapters}", tuple(zipf), popularity="zipf", zipf_s=1.0, **common),
        Workload("rare", tuple(zipf[:4]), popularity="uniform", rare=rare, **common),
    ]


def figures_of(report: Report, workload: Workload) -> Figures:
    figures: Figures = dict(report.summary(workload.rare))
    if workload.popularity == "zipf":
        for band, worst in report.ttft_by_rank(workload.models).items():
            figures[f"ttft_max_ms_rank_{band}"] = worst
    return figures


def measure(system: str, setup: Setup, chosen: list[Workload]) -> dict[str, Figures]:
    """Starts `system`, runs every workload against it, stops it; a failure is recorded, not raised."""
    starter = STARTERS["loraplex" if system.startswith("loraplex") else system]
    if system in ("vllm", "loraplex-fcfs"):  # first come, first served within max_loras
        setup = replace(setup, engine=setup.engine.model_copy(update={"slot_wait_s": None}))
    if system == "loraplex-slot-unaware":
        setup = replace(setup, deployment={**setup.deployment, "affinity_slot_aware": False})
    results: dict[str, Figures] = {}
    try:
        with starter(setup) as url:
            warm_up(url, setup.engine.model_id)
            for workload in chosen:
                results[workload.name] = figures_of(asyncio.run(run(url, workload)), workload)
                print(system, workload.name, json.dumps(results[workload.name]), flush=True)
    except Exception as exc:  # one system failing must not lose the others' figures
        results["failure"] = {"error": f"{type(exc).__name__}: {exc}"}
        log = setup.work / LOGS["loraplex" if system.startswith("loraplex") else system]
        print(f"{system} failed: {exc}; see {log}", flush=True)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets", type=Path, default=Path(".loraplex"))
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    every = list(dict.fromkeys(SYSTEMS + REPLICATED))
    parser.add_argument("--systems", nargs="+", choices=every, help="[every one the run can have]")
    parser.add_argument("--replicas", type=int, default=1, help="loraplex's engine replicas (above 1: no vllm)")
    parser.add_argument("--workloads", nargs="+", default=["base", "zipf64", "zipf64-warm", "zipf512", "rare"])
    parser.add_argument("--engine", action="append", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--requests", type=int, default=64, help="requests of each closed-loop workload")
    parser.add_argument(
        "--rounds", type=int, default=2, help="passes over all systems, the order reversed every other one; medians"
    )
    args = parser.parse_args(argv)
    args.systems = args.systems or list(SYSTEMS if args.replicas == 1 else REPLICATED)
    if args.replicas > 1 and "vllm" in args.systems:
        parser.error("vLLM's server has no replicas of its own: --replicas above 1 runs loraplex's systems only")
    STOCK_VLLM.clear()  # the same ops in every system: see the module's docstring

    model_dir = build_default_model(args.assets / "models" / DEFAULT_MODEL_NAME)
    folders = adapter_folders(args.assets, model_dir)
    settings = dict(item.split("=", 1) for item in args.engine)
    engine = EngineConfig.model_validate({**settings, "model": str(model_dir.resolve())})
    slots = engine.lora_slots(on_cpu=True)
    # Every system gets the CPU adapter cache the slot policy's default asks for, so only the policy differs.
    engine = engine.model_copy(update={"max_cpu_loras": engine.unpinned_cache_entries(slots)})
    adapters = [AdapterConfig(name=name, path=str(path.resolve())) for name, path in folders.items()]
    ids = {a.name: adapter_model_id(engine.model_id, a.name) for a in adapters}
    chosen = [w for w in tail_workloads(engine.model_id, ids, requests=args.requests) if w.name in args.workloads]

    rounds: list[dict[str, dict[str, Figures]]] = []
    with tempfile.TemporaryDirectory(prefix="loraplex-tail-") as tmp:
        deployment = {"num_replicas": args.replicas} if args.replicas > 1 else {}
        setup = Setup(engine=engine, adapters=adapters, work=Path(tmp), deployment=deployment)
        for number in range(args.rounds):  # the VM drifts: no system always runs first or last
            order = args.systems if number % 2 == 0 else list(reversed(args.systems))
            rounds.append({system: measure(system, setup, chosen) for system in order})
    results = median_of(rounds, columns=None, digits=1)  # every figure, the rank bands and rare's too

    from loadtests.tail_report import write

    command = "python -m loadtests.tail_bench " + " ".join(sys.argv[1:] if argv is None else argv)
    print(write(args.out, results, engine, machine(), command.strip()))


if __name__ == "__main__":
    main()
