"""The adapter slot policy on a virtual clock: the bench's workloads against one engine, in seconds of CPU.

It runs the simulated engine's scheduler (`serve.engines.sim_scheduler`, the same `serve.slots` policy vLLM's
scheduler gets) step by step, with a step's duration taken from a cost model instead of a model's forward pass:
a fixed part, a part per running sequence and per adapter in the step, prompt processing of the requests
admitted (a paused request resumes with its KV cache, nothing recomputed), and a load for an adapter the
engine's LRU adapter cache (`max_cpu_loras`) does not hold. `cpu` is fitted to this project's 2-core VM running the demo
model (docs/benchmarks/same-ops); `gpu` is a 20 ms step. Fast enough to sweep the policy's settings:

    python -m loadtests.slot_sim    # docs/sim/slots.md: a sweep on the CPU model; a GPU at 10,000 adapters
"""

from __future__ import annotations

import argparse
import statistics
from collections import OrderedDict, deque
from dataclasses import dataclass, field, replace
from pathlib import Path

from loadtests.loadgen import Workload, quantile
from loadtests.tail_bench import RARE_ADAPTERS, tail_workloads
from serve.engines.sim_scheduler import Queued, SimScheduler
from serve.slots import SlotPolicy


@dataclass(frozen=True)
class Costs:
    """How long a step takes: `step_s + per_seq_s * sequences + per_adapter_s * adapters + prompt work + loads`."""

    step_s: float
    per_seq_s: float
    per_adapter_s: float
    per_prompt_token_s: float
    load_s: float
    activate_s: float
    """Copying an adapter's weights into a LoRA slot (vLLM's activate_adapter), when the step needs it and no slot
    holds it: the engine's slots are an LRU of `max_loras` adapters."""
    prompt_tokens: int = 16


COSTS = {
    # Fitted to docs/benchmarks/same-ops (AMD EPYC, 2 cores): 127 ms per token alone, 370 ms at 32 base streams,
    # 450 ms at 32 streams over 8 adapters; a rank-8 adapter's load ~80 ms (docs/benchmarks/adapters.md); copying
    # one into a slot (vLLM's activate_adapter, rank bound 64) 5.7 ms, the mean of 72 timed in the engine (AMD EPYC).
    "cpu": Costs(
        step_s=0.12, per_seq_s=0.0078, per_adapter_s=0.01, per_prompt_token_s=0.002, load_s=0.08, activate_s=0.006
    ),
    "gpu": Costs(
        step_s=0.02, per_seq_s=0.0001, per_adapter_s=0.0005, per_prompt_token_s=0.00002, load_s=0.05, activate_s=0.002
    ),
}


@dataclass(frozen=True)
class Engine:
    """The simulated engine's settings (the bench's: 16 slots, 64 cached adapters, 64 sequences)."""

    max_loras: int = 16
    max_cpu_loras: int = 64
    max_num_seqs: int = 64
    policy: SlotPolicy | None = None


@dataclass(eq=False)
class Job(Queued):
    """A request in the simulation: what it asks for, and what it has got."""

    model: str = ""
    max_tokens: int = 0
    closed_loop: bool = True
    """Sent by a closed-loop client, who sends the next one when it ends."""
    produced: int = 0
    ttft: float | None = None
    finished: float | None = None


@dataclass
class Outcome:
    """One simulated run of a workload."""

    jobs: list[Job] = field(default_factory=list)
    duration_s: float = 0.0
    paused: int = 0

    def ttfts(self) -> list[float]:
        return [j.ttft for j in self.jobs if j.ttft is not None]

    def summary(self) -> dict[str, float]:
        ttfts = self.ttfts()
        tokens = sum(j.produced for j in self.jobs)
        return {
            "tok_per_s": round(tokens / self.duration_s, 1) if self.duration_s else 0.0,
            "ttft_p50_ms": round(1000 * quantile(ttfts, 0.5), 1),
            "ttft_p99_ms": round(1000 * quantile(ttfts, 0.99), 1),
            "ttft_max_ms": round(1000 * max(ttfts, default=0.0), 1),
            "paused": self.paused,
        }


def simulate(workload: Workload, engine: Engine, costs: Costs, base: str = "base") -> Outcome:
    """Runs `workload` as loadtests/loadgen.py sends it: closed loop at its concurrency, and its rare models."""
    scheduler = SimScheduler(engine.max_num_seqs, engine.max_loras, engine.policy)
    closed = deque(planned.model for planned in workload.schedule())
    timed = deque(((i + 1) * workload.rare_every_s, model) for i, model in enumerate(workload.rare))
    cache: OrderedDict[str, None] = OrderedDict()
    slotted: OrderedDict[str, None] = OrderedDict()
    outcome = Outcome()
    now, free_clients = 0.0, workload.concurrency

    def submit(model: str, closed_loop: bool) -> None:
        job = Job(None if model == base else model, 1, now, model=model, max_tokens=workload.max_tokens,
                  closed_loop=closed_loop)  # fmt: skip
        outcome.jobs.append(job)
        scheduler.add(job)

    while closed or timed or scheduler.running or scheduler.paused or scheduler.waiting:
        while closed and free_clients:
            submit(closed.popleft(), closed_loop=True)
            free_clients -= 1
        while timed and timed[0][0] <= now:
            submit(timed.popleft()[1], closed_loop=False)
        running: list[Job] = scheduler.schedule(now)  # type: ignore[assignment]  # every request here is a Job
        if not running:
            now = timed[0][0] if timed else now + costs.step_s
            continue
        adapters = {j.adapter for j in running if j.adapter is not None}
        prompt_work = costs.prompt_tokens * sum(1 for j in running if j.admitted_at == now)
        loads = sum(_touch(cache, str(a), engine.max_cpu_loras) for a in adapters)
        activations = sum(_touch(slotted, str(a), engine.max_loras) for a in adapters)
        now += (costs.step_s + costs.per_seq_s * len(running) + costs.per_adapter_s * len(adapters)
                + costs.per_prompt_token_s * prompt_work + costs.load_s * loads
                + costs.activate_s * activations)  # fmt: skip
        for job in running:
            job.produced += 1
            if job.ttft is None:
                job.ttft = now - job.arrived
            if job.produced >= job.max_tokens:
                job.finished = now
                scheduler.remove(job)
                free_clients += job.closed_loop
    outcome.duration_s = now
    outcome.paused = scheduler.keeper.paused if scheduler.keeper is not None else 0
    return outcome


def _touch(lru: OrderedDict[str, None], key: str, size: int) -> bool:
    """Marks `key` used in an LRU of `size`; True when it was not there (it is now, the least recent out)."""
    if key in lru:
        lru.move_to_end(key)
        return False
    lru[key] = None
    while len(lru) > size:
        lru.popitem(last=False)
    return True


def workloads(adapters: int, requests: int = 64, concurrency: int = 32) -> list[Workload]:
    """The real bench's workloads (loadtests/tail_bench.py), the Zipf ones over `adapters` adapters; not its warm
    pass, as every simulated run starts with the engine's adapter cache empty."""
    names = [f"a{i:03d}" for i in range(adapters)] + [f"r{i:02d}" for i in range(RARE_ADAPTERS)]
    every = tail_workloads("base", {n: n for n in names}, zipf_adapters=adapters, requests=requests,
                           concurrency=concurrency)  # fmt: skip
    return [w for w in every if not w.name.endswith("-warm")]


@dataclass(frozen=True)
class Case:
    """A machine to simulate: its costs, its engine, and the size of the load."""

    costs: str
    engine: Engine
    adapters: int
    requests: int
    concurrency: int
    policies: tuple[SlotPolicy, ...]


SWEEP = (
    *(SlotPolicy(w, 1.0, p) for w in (0.25, 0.5, 1.0) for p in (1.0, 2.0, 4.0)),
    *(SlotPolicy(0.25, h, 2.0) for h in (0.5, 2.0)),
)
"""Each bound, the first token's (`wait_s`) and a paused stream's (`pause_s`), at the default hold, then the hold
around the defaults."""
CASES = {
    # This VM: the real bench's engine and load (loadtests/tail_bench.py).
    "cpu": Case("cpu", Engine(), adapters=512, requests=64, concurrency=32, policies=SWEEP),
    # A GPU: 20 ms steps, 16 slots (64 cached adapters), 10,000 adapters, 1,000 requests over 64 streams.
    "gpu": Case(
        "gpu",
        Engine(max_loras=16, max_cpu_loras=64, max_num_seqs=256),
        adapters=10_000,
        requests=1000,
        concurrency=64,
        policies=(
            SlotPolicy(1.0, 1.0, 1.0),
            SlotPolicy(0.25, 1.0, 2.0),
            SlotPolicy(0.5, 0.25, 0.5),
            SlotPolicy(0.25, 0.1, 0.25),
        ),
    ),
}


def run_case(case: Case) -> list[tuple[str, str, dict[str, float]]]:
    rows = []
    for workload in workloads(case.adapters, case.requests, case.concurrency):
        for policy in (None, *case.policies) if workload.name != "base" else (None,):  # base has no adapters
            summary = simulate(workload, replace(case.engine, policy=policy), COSTS[case.costs]).summary()
            label = "fcfs" if policy is None else (
                f"wait {policy.wait_s:g} s, pause {policy.pause_bound_s:g} s, hold {policy.hold_s:g} s")  # fmt: skip
            rows.append((workload.name, label, summary))
            print(case.costs, workload.name, label, summary, flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=sorted(CASES))
    parser.add_argument("--out", type=Path, default=Path("docs/sim/slots.md"))
    args = parser.parse_args(argv)
    sections = [section(CASES[name], run_case(CASES[name])) for name in args.cases]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(HEADER + "\n".join(sections))


HEADER = """# The adapter slot policy on the simulated engine

`python -m loadtests.slot_sim` (a few seconds): the simulated engine's scheduler (vLLM's admission rules and the
slot policy of serve/slots.py, the code vLLM's scheduler runs) on a virtual clock, with a step's duration from a
cost model (loadtests/slot_sim.py: fitted to docs/benchmarks/same-ops for the CPU; a 20 ms step for the GPU).
Deterministic for one PYTHONHASHSEED (ties between adapters go by set order: tok/s moves a few percent between
seeds). `p99/base` is the workload's TTFT p99 over the base-only p99 of the same engine.

"""


def section(case: Case, rows: list[tuple[str, str, dict[str, float]]]) -> str:
    engine = case.engine
    base_p99 = statistics.median(s["ttft_p99_ms"] for n, _, s in rows if n == "base")
    lines = [
        f"## {case.costs}: {case.adapters} adapters, {case.requests} requests of 64 tokens, "
        f"{case.concurrency} streams\n",
        f"Engine: {engine.max_loras} slots, {engine.max_cpu_loras} cached adapters, {engine.max_num_seqs} sequences; "
        f"base-only TTFT p99 {base_p99:.0f} ms.\n",
        "| workload | policy | tok/s | tok/s vs fcfs | TTFT p50 ms | TTFT p99 ms | p99/base | worst TTFT ms | paused |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    fcfs = {n: s["tok_per_s"] for n, label, s in rows if label == "fcfs"}
    for name, label, s in rows:
        versus = s["tok_per_s"] / fcfs[name] if fcfs.get(name) else float("nan")
        lines.append(f"| {name} | {label} | {s['tok_per_s']} | {versus:.2f} | {s['ttft_p50_ms']} | {s['ttft_p99_ms']} "
                     f"| {s['ttft_p99_ms'] / base_p99:.2f} | {s['ttft_max_ms']} | {s['paused']} |")  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
