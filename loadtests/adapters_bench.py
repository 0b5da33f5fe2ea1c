"""`make bench-adapters`: what adapters cost loraplex, on the real stack.

1. Cold load: for fresh rank-8 adapters from a local folder and from S3 (moto on loopback), the
   time to first token of a request that must load its adapter minus that of the next request for
   it (warm). Goal: <= 100 ms for a local source on the reference machine.
2. Scale: 1,000 registered adapters on one replica with a small engine cache (max_cpu_loras=8):
   every adapter used in turn; the server's memory (RSS of all its processes) sampled as more of
   them have been used, and a sample of outputs checked against transformers+PEFT after the churn.

Writes docs/benchmarks/adapters.md and adapters.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import yaml

from loadtests.bench import BUCKET, free_port, machine, process
from serve.config import EngineConfig
from serve.demo.assets import DEFAULT_MODEL_NAME, bench_adapters, build_adapters, build_default_model

S3_KEYS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"}
PROMPT = "Write a haiku about the sea."


@dataclass(frozen=True)
class Server:
    url: str
    pid: int
    s3_url: str
    work: Path


def server_rss_bytes(pid: int) -> int:
    """Resident memory of the server's whole process tree (router, Ray, engine core, workers)."""
    root = psutil.Process(pid)
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total


@contextmanager
def start(
    model: Path,
    work: Path,
    roots: list[Path],
    engine: dict[str, Any],
    router: dict[str, Any] | None = None,
    engine_deployment: dict[str, Any] | None = None,
    registry: dict[str, Any] | None = None,
) -> Iterator[Server]:
    """moto on loopback and `loraplex serve` with `engine`, `router` and `engine_deployment` settings, until the
    block ends."""
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    s3_port = free_port()
    s3_url = f"http://127.0.0.1:{s3_port}"
    moto = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(s3_port)]
    with process(moto, env, work / "moto.log", f"{s3_url}/moto-api/"):
        config = {
            "engine": {"model": str(model), **engine},
            "router": router or {},
            "engine_deployment": engine_deployment or {},
            "registry": {
                "state_file": str(work / "registry.json"), "cache_dir": str(work / "cache"),
                "local_roots": [str(root) for root in roots], "s3_endpoint_url": s3_url,
                "s3_access_key_id": S3_KEYS["AWS_ACCESS_KEY_ID"],
                "s3_secret_access_key": S3_KEYS["AWS_SECRET_ACCESS_KEY"], **(registry or {}),
            },
        }  # fmt: skip
        (work / "loraplex.yaml").write_text(yaml.safe_dump(config))
        port = free_port()
        command = [str(Path(sys.executable).parent / "loraplex"), "serve", "--config", str(work / "loraplex.yaml"),
                   "--port", str(port)]  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        with process(command, env, work / "loraplex.log", f"{url}/health") as pid:
            yield Server(url=url, pid=pid, s3_url=s3_url, work=work)


async def ttft(client: httpx.AsyncClient, model: str) -> float:
    """Seconds from sending a streamed completion to its first token event."""
    body = {"model": model, "prompt": PROMPT, "max_tokens": 4, "temperature": 0, "stream": True}
    started = time.perf_counter()
    first: float | None = None
    async with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if first is None and line.startswith("data: {"):
                first = time.perf_counter() - started
    if first is None:
        raise RuntimeError(f"no token from {model}")
    return first


def register(url: str, name: str, source: str) -> None:
    response = httpx.post(f"{url}/v1/adapters", json={"name": name, "source": source}, timeout=120)
    response.raise_for_status()


def upload(s3_url: str, folder: Path, prefix: str) -> str:
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_url, region_name="us-east-1", aws_access_key_id="bench",
                      aws_secret_access_key="bench")  # fmt: skip
    if BUCKET not in [b["Name"] for b in s3.list_buckets()["Buckets"]]:
        s3.create_bucket(Bucket=BUCKET)
    for file in folder.iterdir():
        s3.upload_file(str(file), BUCKET, f"{prefix}/{file.name}")
    return f"s3://{BUCKET}/{prefix}"


async def cold_loads(server: Server, folders: dict[str, Path], base_id: str) -> dict[str, Any]:
    """Cold minus warm TTFT per adapter, half from the local folder and half through S3."""
    names = sorted(folders)
    half = len(names) // 2
    rows: list[dict[str, Any]] = []
    async with httpx.AsyncClient(base_url=server.url, timeout=300) as client:
        for _ in range(3):
            await ttft(client, base_id)
        base = statistics.median([await ttft(client, base_id) for _ in range(5)])
        for i, name in enumerate(names):
            kind = "local" if i < half else "s3"
            source = str(folders[name]) if kind == "local" else upload(server.s3_url, folders[name], f"cold/{name}")
            register(server.url, f"cold-{name}", source)
            cold = await ttft(client, f"cold-{name}")
            warm = statistics.median([await ttft(client, f"cold-{name}") for _ in range(3)])
            rows.append({"adapter": name, "source": kind, "cold_s": cold, "warm_s": warm, "delta_s": cold - warm})
    summary: dict[str, Any] = {"base_ttft_s": base, "rows": rows}
    for kind in ("local", "s3"):
        deltas = sorted(r["delta_s"] for r in rows if r["source"] == kind)
        summary[kind] = {
            "n": len(deltas), "median_ms": 1000 * statistics.median(deltas),
            "p90_ms": 1000 * deltas[min(len(deltas) - 1, int(0.9 * len(deltas)))], "max_ms": 1000 * deltas[-1],
        }  # fmt: skip
    return summary


def make_many(template: Path, count: int, root: Path) -> dict[str, Path]:
    """`count` distinct rank-8 q/v adapters written straight from numpy (seconds, not PEFT's minutes)."""
    from safetensors.numpy import load_file, save_file

    tensors = {k: v for k, v in load_file(template / "adapter_model.safetensors").items()
               if ".q_proj." in k or ".v_proj." in k}  # fmt: skip
    config = json.loads((template / "adapter_config.json").read_text())
    config["target_modules"] = ["q_proj", "v_proj"]
    folders: dict[str, Path] = {}
    for i in range(count):
        rng = np.random.default_rng(5000 + i)
        folder = root / f"m{i:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        fresh = {
            key: (rng.standard_normal(t.shape) / np.sqrt(t.shape[1]) * (0.5 if "lora_B" in key else 1.0)).astype(
                np.float32
            )
            for key, t in tensors.items()
        }
        save_file(fresh, str(folder / "adapter_model.safetensors"))
        (folder / "adapter_config.json").write_text(json.dumps(config))
        folders[folder.name] = folder
    return folders


async def many_adapters(server: Server, folders: dict[str, Path], model: Path, checks: int) -> dict[str, Any]:
    names = sorted(folders)
    started = time.perf_counter()
    for name in names:
        register(server.url, name, str(folders[name]))
    register_s = time.perf_counter() - started
    samples = [{"used": 0, "rss_mib": server_rss_bytes(server.pid) / 2**20}]
    step = max(1, len(names) // 8)
    failures = 0
    async with httpx.AsyncClient(base_url=server.url, timeout=300) as client:

        async def use(name: str) -> None:
            nonlocal failures
            body = {"model": name, "prompt": "Hi", "max_tokens": 2}
            if (await client.post("/v1/completions", json=body)).status_code != 200:
                failures += 1

        used_started = time.perf_counter()
        for start_at in range(0, len(names), step):
            chunk = names[start_at : start_at + step]
            for i in range(0, len(chunk), 4):
                await asyncio.gather(*(use(n) for n in chunk[i : i + 4]))
            samples.append({"used": start_at + len(chunk), "rss_mib": server_rss_bytes(server.pid) / 2**20})
        use_s = time.perf_counter() - used_started
    correctness = check_sample(server, folders, model, random.Random(0).sample(names, checks))
    metrics = httpx.get(f"{server.url}/metrics").text
    evictions = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                    if line.startswith("loraplex_adapter_evictions_total{"))  # fmt: skip
    return {"registered": len(names), "register_s": register_s, "use_s": use_s, "failures": failures,
            "rss": samples, "correct": correctness, "evictions_reported": evictions}  # fmt: skip


def check_sample(server: Server, folders: dict[str, Path], model: Path, names: list[str]) -> dict[str, bool]:
    """Greedy outputs of a few adapters, long evicted by the churn, against transformers+PEFT."""
    import openai

    from serve.demo.reference import Reference, assert_close, served_greedy

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
    reference = Reference(model, {name: folders[name] for name in names})
    prompt = reference.chat_prompt(PROMPT)
    outcome: dict[str, bool] = {}
    for name in names:
        response = client.completions.create(
            model=name, prompt=prompt, max_tokens=10, temperature=0, logprobs=5,
            extra_body={"return_tokens_as_token_ids": True, "ignore_eos": True},
        )  # fmt: skip
        try:
            assert_close(reference.greedy(name, prompt, 10), served_greedy(response.choices[0]), name)
            outcome[name] = True
        except AssertionError:
            outcome[name] = False
    return outcome


def write(out: Path, result: dict[str, Any], command: str) -> str:
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapters.json").write_text(json.dumps(result, indent=2))
    cold, many = result["cold"], result["many"]
    lines = [
        "# Adapter costs: cold loads and 1,000 adapters on one replica",
        "",
        f"Machine: {result['machine']}. Command: `{command}`. Engine: {result['engine']}.",
        "",
        "## Cold load (first request for an adapter that no replica holds)",
        "",
        f"Extra time to first token of the cold request over a warm one for the same rank-8 all-linear "
        f"adapter (9.4 MB of float32 safetensors), sequential, idle server. Base-model TTFT: "
        f"{1000 * cold['base_ttft_s']:.0f} ms.",
        "",
        "| source | adapters | median | p90 | max |",
        "|---|---|---|---|---|",
    ]
    for kind in ("local", "s3"):
        s = cold[kind]
        lines.append(f"| {kind} | {s['n']} | {s['median_ms']:.0f} ms | {s['p90_ms']:.0f} ms | {s['max_ms']:.0f} ms |")
    lines += [
        "",
        "## 1,000 registered adapters, engine cache of 8",
        "",
        f"{many['registered']} distinct rank-8 q/v adapters registered in {many['register_s']:.0f} s, then each used "
        f"once (4 at a time) in {many['use_s']:.0f} s with {many['failures']} failed requests; the engine evicted "
        f"{many['evictions_reported']:.0f} adapters (as replicas reported them, sampled every 2 s).",
        "",
        "| adapters used so far | server RSS (MiB) |",
        "|---|---|",
        *[f"| {s['used']} | {s['rss_mib']:.0f} |" for s in many["rss"]],
        "",
        "Outputs after the churn vs transformers+PEFT (greedy, vLLM's top-5 rule): "
        + ", ".join(f"{name} {'ok' if ok else 'DIFFERENT'}" for name, ok in many["correct"].items()),
        "",
    ]
    (out / "adapters.md").write_text("\n".join(lines))
    local = cold["local"]["median_ms"]
    return (
        f"cold_load_local_ms={local:.0f} cold_load_s3_ms={cold['s3']['median_ms']:.0f} many_failures={many['failures']}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--assets", type=Path, default=Path(".loraplex"))
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    parser.add_argument("--cold", type=int, default=32, help="adapters for the cold-load figure (half via S3)")
    parser.add_argument("--many", type=int, default=1000)
    parser.add_argument("--checks", type=int, default=4)
    args = parser.parse_args(argv)

    model = build_default_model(args.assets / "models" / DEFAULT_MODEL_NAME).resolve()
    fresh = build_adapters(model, bench_adapters(args.cold), args.assets / "bench-adapters")
    engine = {"max_loras": 4, "max_cpu_loras": 8}
    with tempfile.TemporaryDirectory(prefix="loraplex-adapters-") as tmp:
        work = Path(tmp)
        folders = make_many(next(iter(fresh.values())), args.many, work / "many")
        roots = [work, (args.assets / "bench-adapters").resolve()]
        with start(model, work, roots, engine) as server:
            base_id = EngineConfig(model=str(model)).model_id
            cold = asyncio.run(cold_loads(server, {n: p.resolve() for n, p in fresh.items()}, base_id))
            many = asyncio.run(many_adapters(server, folders, model, args.checks))
    result = {"machine": machine(), "engine": engine, "cold": cold, "many": many}
    command = "make bench-adapters" if argv is None and len(sys.argv) == 1 else "python -m loadtests.adapters_bench"
    print(write(args.out, result, command))


if __name__ == "__main__":
    main()
