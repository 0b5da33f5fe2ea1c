"""The serving path's own cost, apart from the model: `python -m loadtests.path_bench` (part of `make bench`).

1. **CPU per streamed token** with the real engine: the same streamed workload against vLLM's own API
   server, loraplex and Ray Serve LLM, one after the other; CPU seconds of every process the server
   started, except vLLM's EngineCore and model worker (the engine itself, the same in all three), from
   /proc, divided by the output tokens.
2. **Serving-path capacity** with the simulated engine (no model): delivered tok/s and inter-token
   latency as concurrent streams grow, for loraplex (`engine.kind: simulated`) and for a bare
   FastAPI/uvicorn app streaming the same simulated engine in-process (loadtests/bare_app.py), the
   ceiling of a Python HTTP stack on this machine. loraplex behind Ray Serve's HTTP proxy is measured
   too (`router.ingress: serve-proxy`), to show what the direct ingress buys.

Writes docs/benchmarks/serving-path.json and .md; prints `path_cpu_per_token_vs_vllm=<r> sim_vs_bare=<r>`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import yaml

from loadtests.bench import SESSIONS, Setup, free_port, machine, process, start_loraplex, start_rayserve_llm, start_vllm
from loadtests.loadgen import Workload, run
from loadtests.profile import label
from loadtests.sse_client import run_streams
from serve.config import EngineConfig
from serve.demo.assets import DEFAULT_MODEL_NAME, build_default_model

TICKS = os.sysconf("SC_CLK_TCK")
NOT_SERVING = ("raylet", "gcs_server", "DashboardAgent", "RuntimeEnvAgent", "dashboard", "log_monitor",
               "autoscaler_monitor", "moto")  # fmt: skip
"""Ray's node daemons, which a Ray cluster runs whatever it serves, and moto (Ray Serve LLM's adapter store here)."""
ENGINE_PROCESSES = ("VLLM::EngineCore", "VLLM::Worker", "EngineCore_", "VLLM::")
"""Process titles of vLLM's engine core and model worker: the engine, not the serving path."""
SIM_STEP_MS = 20.0
IDLE_SETTLE_S = 3.0
IDLE_S = 20.0
"""The idle window measured before each system's workload: its serving path's CPU when nothing is asked."""
SIM_MAX_TOKENS = 64
Starter = Callable[[Setup], AbstractContextManager[str]]


def session_cpu(session: int) -> dict[int, tuple[str, float]]:
    """pid → (title, CPU seconds) of every live process in `session`."""
    found: dict[int, tuple[str, float]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getsid(int(entry.name)) != session:
                continue
            stat = (entry / "stat").read_text()
            title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, ProcessLookupError):
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        found[int(entry.name)] = (title, (int(fields[11]) + int(fields[12])) / TICKS)
    return found


def path_cpu(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds spent between two samples, by process, leaving out vLLM's engine core and worker."""
    spent: dict[str, float] = {}
    for pid, (title, seconds) in after.items():
        if not any(name in title for name in ENGINE_PROCESSES):
            name = label(title)
            spent[name] = spent.get(name, 0.0) + seconds - before.get(pid, (title, 0.0))[1]
    return {name: round(seconds, 2) for name, seconds in sorted(spent.items(), key=lambda kv: -kv[1]) if seconds > 0}


def serving_path(spent: dict[str, float]) -> float:
    """The serving path's share: every process but `NOT_SERVING`."""
    return sum(seconds for name, seconds in spent.items() if name not in NOT_SERVING)


def cpu_per_token(system: str, starter: Starter, setup: Setup, workload: Workload) -> dict[str, Any]:
    """CPU per output token of `workload`: gross, and at the margin (less what the idle server spends meanwhile)."""
    with starter(setup) as url:
        asyncio.run(run(url, Workload("warm", (setup.engine.model_id,), num_requests=4, max_tokens=8)))
        session = SESSIONS[url]
        time.sleep(IDLE_SETTLE_S)
        idle_start = session_cpu(session)
        time.sleep(IDLE_S)
        before = session_cpu(session)
        started = time.monotonic()
        report = asyncio.run(run(url, workload))
        after = session_cpu(session)
        seconds = time.monotonic() - started
    idle_cores = serving_path(path_cpu(idle_start, before)) / IDLE_S
    spent = path_cpu(before, after)
    cpu_s = serving_path(spent)
    tokens = max(1, report.output_tokens)
    figures = {"system": system, "cpu_s": round(cpu_s, 2), "tokens": report.output_tokens, "seconds": round(seconds, 1),
               "us_per_token": round(1e6 * cpu_s / tokens, 1),
               "idle_cores": round(idle_cores, 4),
               "us_per_token_marginal": round(1e6 * max(0.0, cpu_s - idle_cores * seconds) / tokens, 1),
               "us_per_token_all_processes": round(1e6 * sum(spent.values()) / tokens, 1),
               "tokens_per_s": round(report.tokens_per_s, 1), "errors": report.errors, "by_process": spent,
               "idle_by_process": path_cpu(idle_start, before)}  # fmt: skip
    print("cpu-per-token", json.dumps(figures), flush=True)
    return figures


@contextmanager
def start_bare(setup: Setup) -> Iterator[str]:
    port = free_port()
    command = [sys.executable, "-m", "loadtests.bare_app", "--port", str(port), "--step-ms", str(SIM_STEP_MS)]
    with process(command, dict(os.environ), setup.work / "bare.log", f"http://127.0.0.1:{port}/health") as pid:
        SESSIONS[f"http://127.0.0.1:{port}"] = pid
        yield f"http://127.0.0.1:{port}"


def start_simulated(ingress: str) -> Starter:
    @contextmanager
    def start(setup: Setup) -> Iterator[str]:
        port = free_port()
        config_file = setup.work / f"sim-{ingress}.yaml"
        config = {
            "engine": {"kind": "simulated", "model": "sim", "max_num_seqs": 1024,
                       "simulated": {"step_ms": SIM_STEP_MS}},
            "engine_deployment": {"max_ongoing_requests": 1024, "max_queued_requests": 2048},
            "router": {"ingress": ingress, "max_ongoing_requests": 4096, "max_inflight": 1024, "max_waiting": 2048},
            "registry": {"state_file": str(setup.work / "sim-registry.json"), "cache_dir": str(setup.work / "cache")},
        }  # fmt: skip
        config_file.write_text(yaml.safe_dump(config))
        command = [str(Path(sys.executable).parent / "loraplex"), "serve", "--config", str(config_file),
                   "--port", str(port)]  # fmt: skip
        log = setup.work / f"sim-{ingress}.log"
        with process(command, dict(os.environ), log, f"http://127.0.0.1:{port}/health") as pid:
            SESSIONS[f"http://127.0.0.1:{port}"] = pid
            yield f"http://127.0.0.1:{port}"

    return start


def capacity(system: str, starter: Starter, setup: Setup, levels: list[int], seconds: float) -> list[dict[str, Any]]:
    rows = []
    with starter(setup) as url:
        asyncio.run(run_streams(f"{url}/v1/completions", "sim", 4, 1.0, 8))  # warm
        session = SESSIONS[url]
        for level in levels:
            before = session_cpu(session)
            stats = asyncio.run(run_streams(f"{url}/v1/completions", "sim", level, seconds, SIM_MAX_TOKENS))
            cpu_s = serving_path(path_cpu(before, session_cpu(session)))
            per_token = round(1e6 * cpu_s / max(1, stats.tokens), 1)
            row = {"system": system, "concurrency": level, **stats.summary(), "server_cpu_s": round(cpu_s, 2),
                   "us_per_token": per_token}  # fmt: skip
            print("capacity", json.dumps(row), flush=True)
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--assets", type=Path, default=Path(".loraplex"))
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    parser.add_argument("--levels", type=int, nargs="+", default=[16, 64, 256, 512])
    parser.add_argument("--seconds", type=float, default=15.0, help="per concurrency level")
    parser.add_argument("--skip-engine", action="store_true", help="only the simulated-engine capacity part")
    parser.add_argument("--dtype", default="float32", help="engine dtype for the CPU-per-token part (all systems)")
    parser.add_argument("--engine-systems", nargs="+", default=["vllm", "loraplex", "rayserve-llm"],
                        help="systems of the CPU-per-token part")  # fmt: skip
    parser.add_argument("--skip-capacity", action="store_true", help="only the CPU-per-token part")
    args = parser.parse_args(argv)

    results: dict[str, Any] = {
        "machine": machine(),
        "command": "python -m loadtests.path_bench " + " ".join(argv or []),
    }
    with tempfile.TemporaryDirectory(prefix="loraplex-path-") as tmp:
        work = Path(tmp)
        if not args.skip_engine:
            model_dir = build_default_model(args.assets / "models" / DEFAULT_MODEL_NAME)
            engine = EngineConfig(model=str(model_dir.resolve()), dtype=args.dtype)
            setup = Setup(engine=engine, adapters=[], work=work)
            workload = Workload("base", (engine.model_id,), popularity="single", num_requests=64, concurrency=32)
            starters: dict[str, Starter] = {"vllm": start_vllm, "loraplex": start_loraplex,
                                            "rayserve-llm": start_rayserve_llm}  # fmt: skip
            results["cpu_per_token"] = [cpu_per_token(name, starters[name], setup, workload)
                                        for name in args.engine_systems]  # fmt: skip
        sim_setup = Setup(engine=EngineConfig(model="sim"), adapters=[], work=work)
        systems: dict[str, Starter] = {"bare": start_bare, "loraplex": start_simulated("direct"),
                                       "loraplex-serve-proxy": start_simulated("serve-proxy")}  # fmt: skip
        results["capacity"] = [row for name, s in systems.items() if not args.skip_capacity
                               for row in capacity(name, s, sim_setup, args.levels, args.seconds)]  # fmt: skip

    summary = summarize(results)
    results["summary"] = summary
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serving-path.json").write_text(json.dumps(results, indent=2) + "\n")
    line = " ".join(f"{key}={value}" for key, value in summary.items())
    print(line)
    return line


def summarize(results: dict[str, Any]) -> dict[str, float | str]:
    summary: dict[str, float | str] = {}
    per_token = {row["system"]: row["us_per_token"] for row in results.get("cpu_per_token", [])}
    if per_token.get("vllm") and "loraplex" in per_token:
        summary["path_cpu_per_token_vs_vllm"] = round(per_token["loraplex"] / per_token["vllm"], 2)

    bare = {row["concurrency"]: row["tokens_per_s"] for row in results["capacity"] if row["system"] == "bare"}
    ours = {row["concurrency"]: row["tokens_per_s"] for row in results["capacity"] if row["system"] == "loraplex"}
    if bare and ours:
        summary["sim_vs_bare"] = round(min(ours[c] / bare[c] for c in bare if bare[c]), 2)
    marginal = {row["system"]: row["us_per_token_marginal"] for row in results.get("cpu_per_token", [])}
    if marginal.get("vllm") and "loraplex" in marginal:  # after the two the issue asks for, in that order
        summary["marginal_vs_vllm"] = round(marginal["loraplex"] / marginal["vllm"], 2)
    return summary


if __name__ == "__main__":
    main()
