"""The adapter slot policy on a virtual clock: the bench's workloads against one engine, in seconds of CPU.

It runs the simulated engine's scheduler (`serve.engines.sim_scheduler`, the same `serve.slots` policy vLLM's
scheduler gets) step by step, with a step's duration taken from a cost model instead of a model's forward pass:
a fixed part, a part per running sequence and per adapter in the step, prompt processing (a request resumed
after its slot was taken processes its prompt and output again), and a load for an adapter the engine's LRU
adapter cache (`max_cpu_loras`) does not hold. `cpu` is fitted to this project's 2-core VM running the demo
model (docs/benchmarks/same-ops); `gpu` is a 20 ms step. Fast enough to sweep the policy's settings:

    python -m loadtests.slot_sim --sweep            # docs/sim/slots.md
    python -m loadtests.slot_sim --costs gpu --adapters 10000
"""

from __future__ import annotations

import argparse
import statistics
from collections import OrderedDict, deque
from dataclasses import dataclass, field
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
    prompt_tokens: int = 16
    block_tokens: int | None = 16
    """The KV cache's block size when prefix caching is on (vLLM's default): a resumed request then processes only
    the tokens past its last full block again, since its full blocks are still cached. None: all of them."""

    def prompt_work(self, produced: int, resumed: bool) -> int:
        """Tokens a request admitted this step processes before its next token."""
        if not resumed:
            return self.prompt_tokens
        tokens = self.prompt_tokens + produced
        return tokens if self.block_tokens is None else tokens % self.block_tokens + 1


COSTS = {
    # Fitted to docs/benchmarks/same-ops (AMD EPYC, 2 cores): 127 ms per token alone, 370 ms at 32 base streams,
    # 450 ms at 32 streams over 8 adapters; a rank-8 adapter's load ~80 ms (docs/benchmarks/adapters.md).
    "cpu": Costs(step_s=0.12, per_seq_s=0.0078, per_adapter_s=0.01, per_prompt_token_s=0.002, load_s=0.08),
    "gpu": Costs(step_s=0.02, per_seq_s=0.0001, per_adapter_s=0.0005, per_prompt_token_s=0.00002, load_s=0.05),
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
    preempted: int = 0

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
            "preempted": self.preempted,
        }


def simulate(workload: Workload, engine: Engine, costs: Costs, base: str = "base") -> Outcome:
    """Runs `workload` as loadtests/loadgen.py sends it: closed loop at its concurrency, and its rare models."""
    scheduler = SimScheduler(engine.max_num_seqs, engine.max_loras, engine.policy)
    closed = deque(planned.model for planned in workload.schedule())
    timed = deque(((i + 1) * workload.rare_every_s, model) for i, model in enumerate(workload.rare))
    cache: OrderedDict[str, None] = OrderedDict()
    outcome = Outcome()
    now, free_clients = 0.0, workload.concurrency

    def submit(model: str, closed_loop: bool) -> None:
        job = Job(None if model == base else model, 1, now, model=model, max_tokens=workload.max_tokens,
                  closed_loop=closed_loop)  # fmt: skip
        outcome.jobs.append(job)
        scheduler.add(job)

    while closed or timed or scheduler.running or scheduler.waiting:
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
        prompt_work = sum(costs.prompt_work(j.produced, j.preemptions > 0) for j in running if j.admitted_at == now)
        loads = 0
        for adapter in adapters:
            if str(adapter) in cache:
                cache.move_to_end(str(adapter))
            else:
                loads += 1
                cache[str(adapter)] = None
                while len(cache) > engine.max_cpu_loras:
                    cache.popitem(last=False)
        now += (costs.step_s + costs.per_seq_s * len(running) + costs.per_adapter_s * len(adapters)
                + costs.per_prompt_token_s * prompt_work + costs.load_s * loads)  # fmt: skip
        for job in running:
            job.produced += 1
            if job.ttft is None:
                job.ttft = now - job.arrived
            if job.produced >= job.max_tokens:
                job.finished = now
                scheduler.remove(job)
                free_clients += job.closed_loop
    outcome.duration_s = now
    outcome.preempted = scheduler.keeper.preempted if scheduler.keeper is not None else 0
    return outcome


def workloads(adapters: int) -> list[Workload]:
    """The real bench's workloads (loadtests/tail_bench.py), the Zipf ones over `adapters` adapters at the most."""
    names = [f"a{i:03d}" for i in range(adapters)] + [f"r{i:02d}" for i in range(RARE_ADAPTERS)]
    return tail_workloads("base", {name: name for name in names}, zipf_adapters=adapters)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--costs", choices=sorted(COSTS), default="cpu")
    parser.add_argument("--adapters", type=int, default=512, help="adapters the Zipf workloads draw from")
    parser.add_argument("--sweep", action="store_true", help="sweep wait_s and hold_s; write docs/sim/slots.md")
    parser.add_argument("--out", type=Path, default=Path("docs/sim/slots.md"))
    args = parser.parse_args(argv)
    costs = COSTS[args.costs]
    policies: list[SlotPolicy | None] = [None, SlotPolicy()]
    if args.sweep:
        policies += [SlotPolicy(w, h) for w in (0.5, 1.0, 2.0, 4.0) for h in (0.5, 1.0, 2.0) if (w, h) != (2.0, 1.0)]
    rows = []
    for workload in workloads(args.adapters):
        for policy in policies:
            summary = simulate(workload, Engine(policy=policy), costs).summary()
            label = "fcfs" if policy is None else f"wait {policy.wait_s:g} s, hold {policy.hold_s:g} s"
            rows.append((workload.name, label, summary))
            print(workload.name, label, summary, flush=True)
    if args.sweep:
        write_table(args.out, args.costs, rows)


def write_table(out: Path, costs: str, rows: list[tuple[str, str, dict[str, float]]]) -> None:
    base_p99 = statistics.median(s["ttft_p99_ms"] for n, _, s in rows if n == "base")
    lines = [
        f"# Adapter slot policy on the simulated engine ({costs} costs)\n",
        f"`python -m loadtests.slot_sim --sweep --costs {costs}`: virtual time, deterministic; base-only TTFT p99 "
        f"{base_p99:.0f} ms. Engine: 16 slots, 64 cached adapters, 64 sequences; 64-token requests, 32 streams.\n",
        "| workload | policy | tok/s | TTFT p50 ms | TTFT p99 ms | p99 / base p99 | worst TTFT ms | preempted |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, label, s in rows:
        lines.append(f"| {name} | {label} | {s['tok_per_s']} | {s['ttft_p50_ms']} | {s['ttft_p99_ms']} | "
                     f"{s['ttft_p99_ms'] / base_p99:.2f} | {s['ttft_max_ms']} | {s['preempted']} |")  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
