"""`make bench-autoscaling`: the engine deployment scales from 1 to 2 replicas under load and back, without a failure.

`scale_cycle` drives the load and records the timeline; tests/integration/test_autoscaling.py runs it against a
server and asserts on it, and `make bench-autoscaling` writes it to docs/benchmarks/autoscaling.{md,json,png}.

- busy: `BUSY_STREAMS` streamed completions at a time (closed loop) over the hot adapters and the base, until a
  second engine replica reports and has served for `settle_s`;
- light: one stream at a time, long ones, so a stream is in flight when Serve removes a replica, until one engine
  replica is left and `settle_s` more.

Each second it samples the engine replicas alive (the server's processes Ray titles `ServeReplica:...:LoraplexEngine`;
a stopping replica keeps its process until its streams end), those reporting to the registry (`/metrics`), and the
router's requests in flight and waiting; every request's start, time to first token and outcome is recorded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from loadtests.loadgen import Result, one_request

BUSY_STREAMS = 6
HOT_ADAPTERS = 12
BUSY_TOKENS = 16
LIGHT_TOKENS = 96
ENGINE_TITLE = "LoraplexEngine"
SERVER_SETTINGS: dict[str, Any] = {
    "autoscaling": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2,
                    "upscale_delay_s": 2, "downscale_delay_s": 5, "look_back_period_s": 10},
    "max_ongoing_requests": 4,
    "graceful_shutdown_timeout_s": 120,
}  # fmt: skip
"""The engine deployment's settings (`engine_deployment`) for the cycle: small limits, so a few streams scale it."""
ENGINE_SETTINGS: dict[str, Any] = {"cpu_threads_bind": "0"}
"""Each engine's worker on core 0, leaving the other core of this 2-core machine to Ray, the router and the start of
the second replica (with both cores shared, its start under this load took 240 s in one run; 182 s with this)."""


@dataclass
class Sample:
    t: float
    processes: int
    """Engine replica processes alive (starting, serving or stopping)."""
    reporting: list[str]
    """Replicas whose report the router's /metrics shows (their engine is up; a gone one lingers up to 30 s)."""
    inflight: float
    waiting: float
    warmed: dict[str, float] = field(default_factory=dict)
    """Adapters each reporting replica warmed when it joined."""


@dataclass
class Request:
    t: float
    phase: str
    model: str
    status: int
    ttft_s: float | None
    latency_s: float
    tokens: int
    error: str | None


@dataclass
class Timeline:
    samples: list[Sample] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)
    """When each phase began, and `end`."""
    metrics: str = ""
    """The router's /metrics at the end."""

    @property
    def failed(self) -> list[Request]:
        return [r for r in self.requests if r.status != 200 or r.error is not None]

    def warmed(self) -> dict[str, float]:
        """Adapters each replica warmed, as last reported (a removed replica's report ages out of /metrics)."""
        counts: dict[str, float] = {}
        for sample in self.samples:
            counts.update(sample.warmed)
        return counts

    def most_processes(self) -> int:
        return max((s.processes for s in self.samples), default=0)


def engine_processes(server_pid: int) -> int:
    """Engine replica processes among the server's descendants (Ray titles a Serve replica by its deployment)."""
    count = 0
    for child in psutil.Process(server_pid).children(recursive=True):
        try:
            title = " ".join(child.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        count += "ServeReplica" in title and ENGINE_TITLE in title
    return count


def series(text: str, name: str) -> dict[str, float]:
    """Value per replica of a replica-labelled series in /metrics text."""
    values = {}
    for line in text.splitlines():
        if line.startswith(name + "{") and 'replica="' in line:
            labels, value = line.rsplit(" ", 1)
            values[labels.split('replica="', 1)[1].split('"', 1)[0]] = float(value)
    return values


def gauge(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " "))


async def scale_cycle(
    url: str, server_pid: int, models: list[str], settle_s: float = 20.0, up_timeout_s: float = 600.0,
    down_timeout_s: float = 300.0, headers: dict[str, str] | None = None,
) -> Timeline:  # fmt: skip
    """Runs the busy then the light phase against the server at `url` (process `server_pid`); see the module."""
    timeline = Timeline()
    started = time.monotonic()
    phase = "busy"
    stop = asyncio.Event()

    def now() -> float:
        return round(time.monotonic() - started, 2)

    async with httpx.AsyncClient(base_url=url, timeout=600, headers=headers or {}) as client:

        async def sample() -> None:
            while not stop.is_set():
                text = (await client.get("/metrics")).text
                timeline.samples.append(Sample(
                    t=now(), processes=engine_processes(server_pid),
                    reporting=sorted(series(text, "loraplex_replica_running_requests")),
                    inflight=gauge(text, "loraplex_router_inflight"), waiting=gauge(text, "loraplex_router_waiting"),
                    warmed=series(text, "loraplex_adapter_warmed_total"),
                ))  # fmt: skip
                await asyncio.sleep(1)

        async def stream(worker: int, wanted: str) -> None:
            turn = worker
            while phase == wanted and not stop.is_set():
                model = models[turn % len(models)]
                turn += BUSY_STREAMS
                tokens = BUSY_TOKENS if wanted == "busy" else LIGHT_TOKENS
                t = now()
                result: Result = await one_request(client, model, f"Request {turn} says", tokens)
                timeline.requests.append(Request(
                    t=t, phase=wanted, model=model, status=result.status, ttft_s=result.ttft,
                    latency_s=result.latency, tokens=result.completion_tokens, error=result.error,
                ))  # fmt: skip

        sampler = asyncio.create_task(sample())
        timeline.phases["busy"] = now()
        busy = [asyncio.create_task(stream(i, "busy")) for i in range(BUSY_STREAMS)]
        await until(lambda: len(last(timeline).reporting) >= 2, up_timeout_s, "no second engine replica", timeline)
        await asyncio.sleep(settle_s)
        phase = "light"
        timeline.phases["light"] = now()
        light = asyncio.create_task(stream(0, "light"))
        await asyncio.gather(*busy)
        await until(lambda: last(timeline).processes == 1, down_timeout_s, "not back to one replica", timeline)
        await asyncio.sleep(settle_s)
        phase = "end"
        await light
        timeline.phases["end"] = now()
        stop.set()
        await sampler
        timeline.metrics = (await client.get("/metrics")).text
    return timeline


def last(timeline: Timeline) -> Sample:
    return timeline.samples[-1] if timeline.samples else Sample(0, 0, [], 0, 0)


async def until(condition: Any, timeout_s: float, what: str, timeline: Timeline) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {timeout_s:.0f} s; last sample {last(timeline)}")
        await asyncio.sleep(0.5)


def plot(timeline: Timeline, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (replicas, load, ttft) = plt.subplots(3, 1, figsize=(10, 7.5), sharex=True)
    t = [s.t for s in timeline.samples]
    replicas.step(t, [s.processes for s in timeline.samples], where="post", label="engine replica processes")
    replicas.step(t, [len(s.reporting) for s in timeline.samples], where="post", label="reporting (serving)",
                  linestyle="--")  # fmt: skip
    replicas.set(ylabel="replicas", ylim=(0, 3))
    replicas.legend(loc="upper right")
    load.plot(t, [s.inflight for s in timeline.samples], label="router: in flight at engines")
    load.plot(t, [s.waiting for s in timeline.samples], label="router: waiting (fair-share queue)")
    load.set(ylabel="requests")
    load.legend(loc="upper right")
    for phase in ("busy", "light"):
        done = [r for r in timeline.requests if r.phase == phase and r.ttft_s is not None]
        ttft.scatter([r.t + r.ttft_s for r in done], [1000 * r.ttft_s for r in done], s=6, label=f"{phase} phase")  # type: ignore[operator]
    failed = timeline.failed
    if failed:
        ttft.scatter([r.t for r in failed], [0] * len(failed), marker="x", color="red", label="failed")
    ttft.set(ylabel="time to first token (ms)", xlabel="seconds since the load began", yscale="log")
    ttft.legend(loc="upper right")
    for axis in (replicas, load, ttft):
        axis.axvline(timeline.phases["light"], color="grey", linewidth=0.8)
    fig.tight_layout()
    fig.savefig(out / "autoscaling.png", dpi=110)


def write(timeline: Timeline, out: Path, machine: str, command: str) -> str:
    out.mkdir(parents=True, exist_ok=True)
    data = {
        "machine": machine,
        "command": command,
        "settings": SERVER_SETTINGS,
        "engine": ENGINE_SETTINGS,
        "phases": timeline.phases,
        "samples": [asdict(s) for s in timeline.samples],
        "requests": [asdict(r) for r in timeline.requests],
    }
    (out / "autoscaling.json").write_text(json.dumps(data, indent=1))
    plot(timeline, out)
    up = next(s.t for s in timeline.samples if len(s.reporting) >= 2)
    spawned = next(s.t for s in timeline.samples if s.processes >= 2)
    down = next(s.t for s in timeline.samples if s.t > timeline.phases["light"] and s.processes == 1)
    warmed = timeline.warmed()
    busy = [r for r in timeline.requests if r.phase == "busy"]
    summary = (f"autoscaling requests={len(timeline.requests)} failed={len(timeline.failed)} "
               f"second_replica_spawned_s={spawned:.0f} serving_s={up:.0f} back_to_one_s={down:.0f}")  # fmt: skip
    lines = [
        "# Autoscaling: 1 → 2 → 1 engine replicas under load, the demo model",
        "",
        f"Machine: {machine}. Command: `{command}` (about 5 minutes).",
        "",
        f"Engine deployment: `{json.dumps(SERVER_SETTINGS)}`; engine: `{json.dumps(ENGINE_SETTINGS)}` (each engine's "
        "worker on core 0, the other core left to Ray, the router and the second replica's start). "
        f"Load: {BUSY_STREAMS} streamed completions at a time "
        f"({BUSY_TOKENS} tokens, over the base and {len({r.model for r in busy}) - 1} adapters) until the second "
        f"replica has served for a while, then one {LIGHT_TOKENS}-token stream at a time until Serve is back to one "
        "replica (a stream is in flight whenever it removes one).",
        "",
        "![timeline](autoscaling.png)",
        "",
        "| | seconds since the load began |",
        "|---|---|",
        f"| second engine replica's process started | {spawned:.0f} |",
        f"| second replica serving (reports to the registry) | {up:.0f} |",
        f"| light load from | {timeline.phases['light']:.0f} |",
        f"| back to one replica process | {down:.0f} |",
        "",
        f"Requests: {len(timeline.requests)}, failed: **{len(timeline.failed)}**. Adapters warmed by each replica "
        f"when it joined (`loraplex_adapter_warmed_total`): {json.dumps(warmed)} — the first replica had no "
        "traffic to learn from; the second warmed the hot adapters whose rendezvous home it became.",
        "",
        "The second replica takes minutes to start here: importing vLLM and torch three times (replica, engine "
        "core, worker) and loading the model on one core shared with Ray and the router relaying the load (idle, "
        "a replica starts in about 75 s). On a GPU node the model load dominates. The first-token times of the "
        "busy phase are queueing: 6 streams for 4 slots on one core.",
        "",
        summary,
    ]
    (out / "autoscaling.md").write_text("\n".join(lines) + "\n")
    return summary


def main(argv: list[str] | None = None) -> None:
    from loadtests.adapters_bench import register, start
    from loadtests.bench import machine
    from serve.config import EngineConfig
    from serve.demo.assets import DEFAULT_MODEL_NAME, bench_adapters, build_adapters, build_default_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--assets", type=Path, default=Path(".loraplex"))
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    args = parser.parse_args(argv)
    model = build_default_model(args.assets / "models" / DEFAULT_MODEL_NAME).resolve()
    folders = build_adapters(model, bench_adapters(HOT_ADAPTERS), args.assets / "bench-adapters")
    roots = [(args.assets / "bench-adapters").resolve()]
    with (
        tempfile.TemporaryDirectory(prefix="loraplex-autoscaling-") as tmp,
        start(model, Path(tmp), roots, ENGINE_SETTINGS, engine_deployment=SERVER_SETTINGS) as server,
    ):
        for name, folder in folders.items():
            register(server.url, name, str(folder.resolve()))
        timeline = asyncio.run(scale_cycle(server.url, server.pid, [EngineConfig(model=str(model)).model_id, *folders]))
    print(write(timeline, args.out, machine(), "make bench-autoscaling"))
    sys.exit(1 if timeline.failed else 0)


if __name__ == "__main__":
    main()
