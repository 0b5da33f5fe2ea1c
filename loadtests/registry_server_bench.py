"""The registry at scale through the running server (issue 16): registration latency, memory per adapter, list pages,
and how soon a write is seen.

`loraplex serve` with the simulated engine (the registry still checks every adapter against the demo model's
shapes) and two router replicas, on one store (`--store sqlite` or `--store s3`, moto on loopback). Registered
through `POST /v1/adapters`, `CONCURRENCY` at a time, from one small adapter folder (rank 4 on one q_proj: the
content is reused across names, as the issue allows; every registration still fetches, checks and hashes it).
Every `--step` adapters: the resident memory of the registry and router replicas. At the end: `/v1/adapters` page
latency (100 per page, from random points), `/v1/models` latency (the whole list), `SEQUENTIAL_WRITES` registrations
one at a time (latency without queueing), and for `VISIBILITY_WRITES` new adapters, the time from the write's
answer until `VISIBLE_RUN` consecutive list reads through the proxy (which picks a router replica per request)
show it.

Writes docs/benchmarks/registry-server-<store>.json and prints one summary line; docs/benchmarks/registry-100k.md
holds the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import torch
from safetensors.torch import save_file

from loadtests.adapters_bench import start
from loadtests.bench import machine
from serve.demo.assets import DEFAULT_MODEL_NAME, build_default_model

CONCURRENCY = 16
VISIBILITY_WRITES = 20
VISIBLE_RUN = 8
PAGE_READS = 200
SEQUENTIAL_WRITES = 200
SYNC_READS = 16


def tiny_adapter(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    generator = torch.Generator().manual_seed(7)
    layer = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({f"{layer}.lora_A.weight": torch.randn(4, 576, generator=generator),
               f"{layer}.lora_B.weight": torch.randn(576, 4, generator=generator)},
              str(folder / "adapter_model.safetensors"))  # fmt: skip
    return folder


def replica_rss(server_pid: int) -> dict[str, int]:
    """Resident bytes of the registry replica and of each router replica (by Ray's process titles)."""
    sizes: dict[str, int] = {}
    for child in psutil.Process(server_pid).children(recursive=True):
        try:
            title = " ".join(child.cmdline())
            rss = child.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        for role in ("LoraplexRegistry", "LoraplexRouter"):
            if "ServeReplica" in title and role in title:
                sizes[f"{role}-{child.pid}"] = rss
    return sizes


async def sync_routers(url: str) -> None:
    """Brings every router replica up to the registry before its memory is read: a router takes in its own writes
    at once and others' at its next read. Reads on new connections, which the kernel spreads over the replicas
    sharing the port."""
    for _ in range(SYNC_READS):
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            (await client.get("/v1/adapters", params={"limit": 1})).raise_for_status()


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def register_many(url: str, source: str, count: int, step: int, server_pid: int) -> dict[str, Any]:
    latencies: list[float] = []
    failures: list[str] = []
    memory = [{"adapters": 0, **replica_rss(server_pid)}]
    names = iter(range(count))
    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:

        async def worker() -> None:
            for i in names:
                t = time.perf_counter()
                response = await client.post("/v1/adapters", json={"name": f"t{i:06d}", "source": source})
                latencies.append(time.perf_counter() - t)
                if response.status_code != 201:
                    failures.append(f"{response.status_code} {response.text[:120]}")
                if (i + 1) % step == 0:
                    await sync_routers(url)
                    memory.append({"adapters": i + 1, **replica_rss(server_pid)})
                    recent = round(1000 * statistics.median(latencies[-step:]), 1)
                    elapsed = round(time.perf_counter() - started, 1)
                    print(json.dumps({"registered": i + 1, "elapsed_s": elapsed, "p50_ms": recent}), flush=True)

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    elapsed = time.perf_counter() - started
    return {
        "registered": count - len(failures),
        "failures": len(failures),
        "first_failures": failures[:3],
        "seconds": round(elapsed, 1),
        "per_second": round(count / elapsed, 1),
        "latency_p50_ms": round(1000 * statistics.median(latencies), 2),
        "latency_p99_ms": round(1000 * quantile(latencies, 0.99), 2),
        "memory": memory,
    }


async def reads(url: str, count: int) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        pages = []
        for _ in range(PAGE_READS):
            after = f"t{random.randrange(count):06d}"
            t = time.perf_counter()
            response = await client.get("/v1/adapters", params={"limit": 100, "after": after})
            pages.append(time.perf_counter() - t)
            response.raise_for_status()
        models = []
        for _ in range(5):
            t = time.perf_counter()
            response = await client.get("/v1/models")
            models.append(time.perf_counter() - t)
            size = len(response.content)
        sequential = []  # one at a time: the latency of a registration that waits for no other
        for k in range(SEQUENTIAL_WRITES):
            t = time.perf_counter()
            answered = await client.post("/v1/adapters", json={"name": f"zy-one-{k:04d}", "source": SOURCE[0]})
            sequential.append(time.perf_counter() - t)
            answered.raise_for_status()
        visible = []
        for k in range(VISIBILITY_WRITES):
            name = f"zz-visible-{k:03d}"
            previous = f"zz-visible-{k - 1:03d}" if k else f"zy-one-{SEQUENTIAL_WRITES - 1:04d}"  # the name before
            answered = await client.post("/v1/adapters", json={"name": name, "source": SOURCE[0]})
            answered.raise_for_status()
            t = time.perf_counter()
            run = 0
            while run < VISIBLE_RUN:
                if time.perf_counter() - t > 60:
                    raise RuntimeError(f"{name} not listed by every router within 60 s")
                page = (await client.get("/v1/adapters", params={"limit": 1, "after": previous})).json()
                run = run + 1 if page["data"] and page["data"][0]["name"] == name else 0
            visible.append(time.perf_counter() - t)
    return {
        "page_p50_ms": round(1000 * statistics.median(pages), 1),
        "page_p99_ms": round(1000 * quantile(pages, 0.99), 1),
        "models_median_ms": round(1000 * statistics.median(models), 1),
        "models_bytes": size,
        "sequential_register_p50_ms": round(1000 * statistics.median(sequential), 1),
        "sequential_register_p99_ms": round(1000 * quantile(sequential, 0.99), 1),
        "visible_p50_s": round(statistics.median(visible), 2),
        "visible_max_s": round(max(visible), 2),
    }


SOURCE: list[str] = []


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--assets", type=Path, default=Path(".loraplex"))
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    parser.add_argument("--store", choices=["sqlite", "s3"], default="sqlite")
    parser.add_argument("--adapters", type=int, default=100_000)
    parser.add_argument("--step", type=int, default=10_000)
    args = parser.parse_args(argv)
    model = build_default_model(args.assets / "models" / DEFAULT_MODEL_NAME).resolve()
    with tempfile.TemporaryDirectory(prefix="loraplex-registry-server-") as tmp:
        work = Path(tmp)
        SOURCE.append(str(tiny_adapter(work / "tiny")))
        store = {"store": "s3://bench/registry"} if args.store == "s3" else {}
        with start(model, work, [work], {"kind": "simulated"}, router={"num_replicas": 2}, registry=store) as server:
            if args.store == "s3":
                import boto3

                boto3.client("s3", endpoint_url=server.s3_url, region_name="us-east-1", aws_access_key_id="bench",
                             aws_secret_access_key="bench").create_bucket(Bucket="bench")  # fmt: skip
            writes = asyncio.run(register_many(server.url, SOURCE[0], args.adapters, args.step, server.pid))
            result = {"machine": machine(), "store": args.store, "adapters": args.adapters, "writes": writes,
                      **asyncio.run(reads(server.url, args.adapters))}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"registry-server-{args.store}.json").write_text(json.dumps(result, indent=1))
    first, last = writes["memory"][0], writes["memory"][-1]
    growth = {role: round((last[role] - first[role]) / max(1, last["adapters"]), 1) for role in first if role in last
              and role != "adapters"}  # fmt: skip
    print(f"registry_server store={args.store} adapters={writes['registered']} failures={writes['failures']} "
          f"register_p50_ms={writes['latency_p50_ms']} page_p50_ms={result['page_p50_ms']} "
          f"visible_p50_s={result['visible_p50_s']} bytes_per_adapter={json.dumps(growth)}")  # fmt: skip


if __name__ == "__main__":
    main()
