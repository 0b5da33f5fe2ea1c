"""`make bench-fairness`: a heavy tenant sending 10x the load of a light one, with and without fair share.

The router admits at most `max_inflight` requests to the engine at once; beyond that requests wait and
are released by virtual token counters per API key, and a reserve of slots lets a tenant below its fair
share start at once (routing/fairness.py). Three phases on one server:

1. `alone`: the light tenant alone (2 concurrent requests in a closed loop).
2. `shared-key`: heavy (20 concurrent) and light (2) send with the *same* key: one tenant, so the
   gate serves them first come, first served — what a server without tenants does.
3. `fair`: the same load with their own keys of equal weight: fair share.

Reports the light tenant's median and p90 latency in each phase and the ratio to `alone` (goal: fair
<= 1.5x). Writes docs/benchmarks/fairness.md and fairness.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from loadtests.adapters_bench import start
from loadtests.bench import machine
from routing.fairness import FairGate
from routing.keys import hash_api_key, new_api_key
from serve.config import EngineConfig
from serve.demo.assets import DEFAULT_MODEL_NAME, build_default_model

MAX_TOKENS = 32


async def closed_loop(url: str, key: str, model: str, concurrency: int, seconds: float) -> list[float]:
    """Latencies of requests sent back to back by `concurrency` workers for `seconds`."""
    latencies: list[float] = []
    deadline = time.monotonic() + seconds
    body = {"model": model, "prompt": "Tell me a story about a lighthouse.", "max_tokens": MAX_TOKENS,
            "ignore_eos": True}  # fmt: skip
    async with httpx.AsyncClient(base_url=url, timeout=600, headers={"Authorization": f"Bearer {key}"}) as client:

        async def worker() -> None:
            while time.monotonic() < deadline:
                started = time.perf_counter()
                response = await client.post("/v1/completions", json=body)
                response.raise_for_status()
                latencies.append(time.perf_counter() - started)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies


def summary(latencies: list[float]) -> dict[str, float]:
    ordered = sorted(latencies)
    return {"n": len(ordered), "p50_s": statistics.median(ordered), "p90_s": ordered[int(0.9 * (len(ordered) - 1))]}


async def phases(url: str, keys: dict[str, str], model: str, seconds: float) -> dict[str, Any]:
    light_alone = await closed_loop(url, keys["light"], model, 2, seconds)
    results: dict[str, Any] = {"alone": {"light": summary(light_alone)}}
    for phase, heavy_key in (("shared-key", keys["light"]), ("fair", keys["heavy"])):
        heavy, light = await asyncio.gather(
            closed_loop(url, heavy_key, model, 20, seconds), closed_loop(url, keys["light"], model, 2, seconds)
        )
        results[phase] = {"light": summary(light), "heavy": summary(heavy)}
    return results


def write(out: Path, result: dict[str, Any], command: str) -> str:
    out.mkdir(parents=True, exist_ok=True)
    (out / "fairness.json").write_text(json.dumps(result, indent=2))
    alone = result["phases"]["alone"]["light"]["p50_s"]
    lines = [
        "# Fair share: a light tenant next to a heavy one",
        "",
        f"Machine: {result['machine']}. Command: `{command}`. Router `max_inflight` {result['max_inflight']} "
        f"(fair-share reserve {result['reserve']}); "
        f"completions of {MAX_TOKENS} tokens; light tenant 2 concurrent requests, heavy tenant 20 (10x), "
        f"{result['seconds']:.0f} s per phase.",
        "",
        "| phase | light p50 | light p90 | light p50 / alone | light requests | heavy p50 | heavy requests |",
        "|---|---|---|---|---|---|---|",
    ]
    for phase, data in result["phases"].items():
        light, heavy = data["light"], data.get("heavy")
        heavy_p50 = f"{heavy['p50_s']:.2f} s" if heavy else "-"
        heavy_n = str(heavy["n"]) if heavy else "-"
        lines.append(
            f"| {phase} | {light['p50_s']:.2f} s | {light['p90_s']:.2f} s | {light['p50_s'] / alone:.2f} | "
            f"{light['n']} | {heavy_p50} | {heavy_n} |"
        )
    lines += [
        "",
        "`shared-key`: both tenants send with one key, so the gate sees one tenant and serves first come, "
        "first served. `fair`: their own keys, equal weights; the gate admits the waiting tenant with the "
        "least weighted service (virtual token counters) and keeps the reserve for a tenant below its share.",
        "",
    ]
    (out / "fairness.md").write_text("\n".join(lines))
    fair = result["phases"]["fair"]["light"]["p50_s"] / alone
    shared = result["phases"]["shared-key"]["light"]["p50_s"] / alone
    return f"light_p50_vs_alone fair={fair:.2f} shared_key={shared:.2f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--assets", type=Path, default=Path(".loraplex"))
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument(
        "--max-inflight",
        type=int,
        default=4,
        help="router.max_inflight: on this compute-bound CPU, a request's time grows with every sequence "
        "beside it, so latency isolation needs a small gate; 4 gives each of the two tenants a fair share of 2 "
        "slots, the light tenant's whole demand (see docs/benchmarks/fairness.md)",
    )
    args = parser.parse_args(argv)

    model = build_default_model(args.assets / "models" / DEFAULT_MODEL_NAME).resolve()
    keys = {"light": new_api_key(), "heavy": new_api_key()}
    auth = {"keys": [{"name": name, "sha256": hash_api_key(key), "base": True} for name, key in keys.items()]}
    router = {"auth": auth, "max_inflight": args.max_inflight}
    tmp = tempfile.TemporaryDirectory(prefix="loraplex-fairness-")
    with tmp, start(model, Path(tmp.name), [], {}, router=router) as server:
        model_id = EngineConfig(model=str(model)).model_id
        asyncio.run(closed_loop(server.url, keys["light"], model_id, 2, 5))  # warm up
        result = {"machine": machine(), "max_inflight": args.max_inflight, "seconds": args.seconds,
                  "reserve": FairGate(args.max_inflight, 0).reserve,
                  "phases": asyncio.run(phases(server.url, keys, model_id, args.seconds))}  # fmt: skip
    arguments = " ".join(sys.argv[1:] if argv is None else argv)
    command = f"python -m loadtests.fairness_bench {arguments}" if arguments else "make bench-fairness"
    print(write(args.out, result, command))


if __name__ == "__main__":
    main()
