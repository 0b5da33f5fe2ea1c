"""`make bench`: vLLM's own OpenAI server, loraplex and Ray Serve LLM, same model, adapters, engine
settings and workloads, one after the other in one run. Writes docs/benchmarks/ and ends with
`throughput_vs_vllm base=<ratio> adapters8=<ratio> zipf64=<ratio>`.

This VM's throughput drifts by ±20 % over minutes for every system, so one pass compares systems measured
at different moments. The run is therefore made of `--rounds` passes, the systems' order reversed every
other pass (each system's mean position in time is the same), and the report takes each figure's median
over the rounds and shows every round's ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from loadtests.loadgen import Report, Workload, run
from loadtests.report import Results
from serve.config import AdapterConfig, EngineConfig
from serve.demo.assets import DEFAULT_MODEL_NAME, bench_adapters, build_adapters, build_default_model
from serve.engines.vllm_engine import engine_env, serving_dtype, vllm_cli_args
from serve.wire import adapter_model_id

SYSTEMS = ("vllm", "loraplex", "rayserve-llm")
BUCKET = "loraplex-bench"
STARTUP_TIMEOUT_S = 600
SESSIONS: dict[str, int] = {}
"""Server URL → the session id of the processes serving it (each server runs in a session of its own)."""


@dataclass(frozen=True)
class Setup:
    engine: EngineConfig
    adapters: list[AdapterConfig]
    work: Path
    deployment: dict[str, Any] = field(default_factory=dict)
    """loraplex's `engine_deployment` settings (replicas, routing); its defaults when empty."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def process(command: list[str], env: dict[str, str], log: Path, ready_url: str) -> Iterator[int]:
    """Runs `command` until `ready_url` answers 200, yielding its pid; stops its whole session afterwards."""
    with log.open("wb") as sink:
        child = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if child.poll() is not None:
                raise RuntimeError(f"{command[:3]} exited {child.returncode}; see {log}")
            try:
                if httpx.get(ready_url, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass  # not listening yet
            if time.monotonic() > deadline:
                raise RuntimeError(f"{command[:3]} not ready after {STARTUP_TIMEOUT_S}s; see {log}")
            time.sleep(1)
        yield child.pid
    finally:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
            with suppress(subprocess.TimeoutExpired):
                child.wait(timeout=90)
        with suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        child.wait()


def base_env(setup: Setup) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    env.update(engine_env(setup.engine))
    return env


STOCK_VLLM = {"VLLM_PLUGINS": ""}
"""vLLM's server and Ray Serve LLM run vLLM as shipped: no `vllm.general_plugins` entry point loads, so
loraplex's own (serve/vllm_patches.py: the base-row fix and its CPU LoRA ops) stays out of them."""


@contextmanager
def start_vllm(setup: Setup) -> Iterator[str]:
    port = free_port()
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1", "--port", str(port)]
    command += vllm_cli_args(setup.engine, setup.adapters)
    env = {**base_env(setup), **STOCK_VLLM}
    with process(command, env, setup.work / "vllm.log", f"http://127.0.0.1:{port}/v1/models") as pid:
        SESSIONS[f"http://127.0.0.1:{port}"] = pid
        yield f"http://127.0.0.1:{port}"


@contextmanager
def start_loraplex(setup: Setup) -> Iterator[str]:
    port = free_port()
    config_file = setup.work / "loraplex.yaml"
    config = {
        "engine": setup.engine.model_dump(),
        "adapters": [a.model_dump() for a in setup.adapters],
        "engine_deployment": setup.deployment,
        # Every start a node of its own: a cache left by the system measured before would spare this one its fetches.
        "registry": {"state_file": str(setup.work / "registry.json"), "cache_dir": str(setup.work / f"cache-{port}")},
    }
    config_file.write_text(yaml.safe_dump(config))
    command = [
        str(Path(sys.executable).parent / "loraplex"),
        "serve",
        "--config",
        str(config_file),
        "--port",
        str(port),
    ]
    with process(command, base_env(setup), setup.work / "loraplex.log", f"http://127.0.0.1:{port}/health") as pid:
        SESSIONS[f"http://127.0.0.1:{port}"] = pid
        yield f"http://127.0.0.1:{port}"


@contextmanager
def start_rayserve_llm(setup: Setup) -> Iterator[str]:
    """Ray Serve LLM reads adapters only from object storage: moto serves them as S3 on loopback."""
    s3_port = free_port()
    s3_url = f"http://127.0.0.1:{s3_port}"
    s3_env = {
        "AWS_ENDPOINT_URL_S3": s3_url, "AWS_ENDPOINT_URL": s3_url, "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
    }  # fmt: skip
    moto = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(s3_port)]
    with process(moto, base_env(setup), setup.work / "moto.log", f"{s3_url}/moto-api/"):
        upload_adapters(setup.adapters, s3_url)
        engine = setup.engine
        slots = engine.lora_slots(on_cpu=True)  # this benchmark runs on the CPU
        spec = {
            "model_id": engine.model_id,
            "model": engine.model,
            "engine_kwargs": {
                "enable_lora": True, "max_loras": slots, "max_lora_rank": engine.max_lora_rank,
                "max_cpu_loras": engine.unpinned_cache_entries(slots), "max_model_len": engine.max_model_len,
                "max_num_seqs": engine.max_num_seqs, "dtype": serving_dtype(engine, on_cpu=True),
                "gpu_memory_utilization": engine.gpu_memory_utilization, "enforce_eager": engine.enforce_eager,
                "seed": engine.seed,
            },
            "lora_config": {"dynamic_lora_loading_path": f"s3://{BUCKET}/loras", "max_num_adapters_per_replica": 64},
            "env": {**engine_env(engine), **s3_env, **STOCK_VLLM},
        }  # fmt: skip
        spec_file = setup.work / "rayllm.json"
        spec_file.write_text(json.dumps(spec))
        port = free_port()
        command = [sys.executable, "-m", "loadtests.rayllm_server", str(spec_file), str(port)]
        env = {**base_env(setup), **s3_env, **STOCK_VLLM}
        with process(command, env, setup.work / "rayllm.log", f"http://127.0.0.1:{port}/v1/models") as pid:
            SESSIONS[f"http://127.0.0.1:{port}"] = pid
            yield f"http://127.0.0.1:{port}"


def upload_adapters(adapters: list[AdapterConfig], endpoint: str) -> None:
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                      aws_access_key_id="bench", aws_secret_access_key="bench")  # fmt: skip
    s3.create_bucket(Bucket=BUCKET)
    for adapter in adapters:
        for file in Path(adapter.path).iterdir():
            if file.is_file() and not file.name.startswith("."):
                s3.upload_file(str(file), BUCKET, f"loras/{adapter.name}/{file.name}")


LOGS = {"vllm": "vllm.log", "loraplex": "loraplex.log", "rayserve-llm": "rayllm.log"}
STARTERS = {"vllm": start_vllm, "loraplex": start_loraplex, "rayserve-llm": start_rayserve_llm}


def workloads(base: str, adapters: list[str], requests: int, concurrency: int, max_tokens: int) -> list[Workload]:
    common = {"num_requests": requests, "concurrency": concurrency, "max_tokens": max_tokens}
    return [
        Workload("base", (base,), popularity="single", **common),
        Workload("adapters8", tuple(adapters[:8]), popularity="uniform", **common),
        Workload("zipf64", tuple(adapters[:64]), popularity="zipf", **common),
        # One request at a time, so TTFT is the serving path's own latency, not queueing.
        Workload("idle", (base,), popularity="single", num_requests=32, concurrency=1, max_tokens=8),
    ]


def warm_up(url: str, model: str) -> None:
    body = {"model": model, "prompt": "Hello", "max_tokens": 4}
    httpx.post(f"{url}/v1/completions", json=body, timeout=300).raise_for_status()


def machine() -> str:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {mem_gib:.0f} GiB, no GPU, Python {platform.python_version()}"


def measure(system: str, setup: Setup, chosen: list[Workload]) -> dict[str, dict[str, float | int | str]]:
    """Starts `system`, drives every chosen workload against it and stops it."""
    figures: dict[str, dict[str, float | int | str]] = {}
    try:
        with STARTERS[system](setup) as url:
            warm_up(url, setup.engine.model_id)
            for workload in chosen:
                report: Report = asyncio.run(run(url, workload))
                figures[workload.name] = report.summary()
                print(system, json.dumps(report.summary()), flush=True)
    except Exception as exc:  # one system failing must not lose the others' figures
        figures["failure"] = {"error": f"{type(exc).__name__}: {exc}"}
        log = setup.work / LOGS[system]
        log_tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:]) if log.exists() else ""
        print(f"{system} failed: {exc}\n{log_tail}", flush=True)
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--assets", type=Path, default=Path(".loraplex"))
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    parser.add_argument("--workloads", nargs="+", default=["base", "adapters8", "zipf64", "idle"])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="passes over all systems, order reversed each pass")
    parser.add_argument(
        "--no-path", action="store_true", help="skip the serving-path benchmark (loadtests/path_bench.py)"
    )
    parser.add_argument(
        "--peers-with-loraplex-plugin",
        action="store_true",
        help="load loraplex's vLLM plugin into vLLM's server and Ray Serve LLM too (to measure "
        "its CPU LoRA ops alone; --engine cpu_lora_ops=vllm keeps only its base-row fix)",
    )
    parser.add_argument(
        "--engine", action="append", default=[], metavar="FIELD=VALUE",
        help="an engine setting for every system, e.g. --engine max_loras=8 (default: the shipped defaults)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.peers_with_loraplex_plugin:
        STOCK_VLLM.clear()

    model_dir = build_default_model(args.assets / "models" / DEFAULT_MODEL_NAME)
    adapter_dirs = build_adapters(model_dir, bench_adapters(64), args.assets / "bench-adapters")
    settings = dict(item.split("=", 1) for item in args.engine)
    engine = EngineConfig.model_validate({**settings, "model": str(model_dir.resolve())})
    adapters = [AdapterConfig(name=name, path=str(path.resolve())) for name, path in adapter_dirs.items()]
    ids = [adapter_model_id(engine.model_id, a.name) for a in adapters]
    chosen = [w for w in workloads(engine.model_id, ids, args.requests, args.concurrency, args.max_tokens)
              if w.name in args.workloads]  # fmt: skip

    rounds: list[Results] = []
    with tempfile.TemporaryDirectory(prefix="loraplex-bench-") as tmp:
        setup = Setup(engine=engine, adapters=adapters, work=Path(tmp))
        for number in range(args.rounds):
            order = args.systems if number % 2 == 0 else list(reversed(args.systems))
            rounds.append({system: measure(system, setup, chosen) for system in order})

    from loadtests.report import PEERS_STOCK, PEERS_WITH_PLUGIN, write_report

    command = (
        "make bench"
        if argv is None and len(sys.argv) == 1
        else "python -m loadtests.bench " + " ".join(sys.argv[1:] if argv is None else argv)
    )
    peers = PEERS_WITH_PLUGIN if args.peers_with_loraplex_plugin else PEERS_STOCK
    last_line = write_report(args.out, rounds, engine, machine(), command, peers)
    if not args.no_path:
        from loadtests import path_bench

        path_bench.main(["--assets", str(args.assets), "--out", str(args.out)])  # prints its summary line
    print(last_line)


if __name__ == "__main__":
    main()
