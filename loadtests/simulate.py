"""A discrete-event simulator of request routing over engine replicas that hold adapters in an LRU cache.

It runs the *same* policy code the router uses (`routing.policy.AffinityPolicy`) against baselines:
random, power-of-two least-loaded, and Ray Serve's multiplexed default (prefer replicas that hold the
model id, power-of-two among them). `make sim` writes docs/sim/ and ends with
`loads_vs_pow2=<ratio> max_over_mean=<ratio>` for our policy.
"""

from __future__ import annotations

import argparse
import heapq
import random
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from routing.policy import AffinityPolicy, ReplicaState
from serve.config import EngineDeploymentConfig

Chooser = Callable[[str, Sequence[ReplicaState], random.Random], str]


@dataclass(frozen=True)
class Scenario:
    """The simulated system and its load."""

    replicas: int = 64
    adapters: int = 10_000
    requests: int = 100_000
    zipf_s: float = 1.1
    slots: int = 8
    """Requests a replica runs at once (its batch)."""
    cache: int = 16
    """Adapters a replica keeps loaded (LRU)."""
    service_s: float = 1.0
    load_s: float = 0.5
    """Extra time for a request whose adapter the replica must load first."""
    utilisation: float = 0.7
    seed: int = 0


@dataclass
class Replica:
    id: str
    cache_size: int
    running: int = 0
    queue: deque[tuple[float, str]] = field(default_factory=deque)
    cache: OrderedDict[str, None] = field(default_factory=OrderedDict)
    served: int = 0

    def state(self) -> ReplicaState:
        return ReplicaState(self.id, self.running + len(self.queue), frozenset(self.cache))

    def touch(self, adapter: str) -> bool:
        """Marks `adapter` used; returns True when it had to be loaded (evicting the least recently used)."""
        if adapter in self.cache:
            self.cache.move_to_end(adapter)
            return False
        self.cache[adapter] = None
        if len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
        return True


def choose_random(adapter: str, replicas: Sequence[ReplicaState], rng: random.Random) -> str:
    return rng.choice(replicas).replica_id


def choose_pow2(adapter: str, replicas: Sequence[ReplicaState], rng: random.Random) -> str:
    a, b = rng.sample(list(replicas), 2)
    return (a if a.ongoing <= b.ongoing else b).replica_id


def choose_ray_multiplexed(adapter: str, replicas: Sequence[ReplicaState], rng: random.Random) -> str:
    holders = [r for r in replicas if adapter in r.adapters]
    return choose_pow2(adapter, holders, rng) if len(holders) >= 2 else (
        holders[0].replica_id if holders else choose_pow2(adapter, replicas, rng))  # fmt: skip


def loraplex_chooser(policy: AffinityPolicy) -> Chooser:
    def choose(adapter: str, replicas: Sequence[ReplicaState], rng: random.Random) -> str:
        return policy.rank(adapter, replicas)[0].replica_id

    return choose


@dataclass(frozen=True)
class Outcome:
    policy: str
    loads_per_1000: float
    p50: float
    p99: float
    max_over_mean: float


def simulate(scenario: Scenario, name: str, choose: Chooser) -> Outcome:
    rng = random.Random(scenario.seed)
    replicas = {f"r{i:03d}": Replica(f"r{i:03d}", scenario.cache) for i in range(scenario.replicas)}
    weights = [1 / (rank**scenario.zipf_s) for rank in range(1, scenario.adapters + 1)]
    names = [f"a{i}" for i in range(scenario.adapters)]
    picks = rng.choices(names, weights=weights, k=scenario.requests)
    rate = scenario.utilisation * scenario.replicas * scenario.slots / scenario.service_s
    events: list[tuple[float, int, str, str, float]] = []  # (time, seq, kind, replica, arrival)
    clock, seq, loads = 0.0, 0, 0
    latencies: list[float] = []
    states: dict[str, ReplicaState] = {rid: r.state() for rid, r in replicas.items()}

    def start(replica: Replica, now: float, arrival: float, adapter: str) -> None:
        nonlocal seq, loads
        loaded = replica.touch(adapter)
        loads += loaded
        replica.running += 1
        seq += 1
        duration = scenario.service_s + (scenario.load_s if loaded else 0.0)
        heapq.heappush(events, (now + duration, seq, "done", replica.id, arrival))

    arrivals = iter(picks)
    next_arrival = rng.expovariate(rate)
    pending = scenario.requests
    while pending or events:
        if pending and (not events or next_arrival <= events[0][0]):
            clock = next_arrival
            adapter = next(arrivals)
            pending -= 1
            next_arrival = clock + rng.expovariate(rate)
            replica = replicas[choose(adapter, list(states.values()), rng)]
            if replica.running < scenario.slots:
                start(replica, clock, clock, adapter)
            else:
                replica.queue.append((clock, adapter))
            replica.served += 1
        else:
            clock, _, _, rid, arrival = heapq.heappop(events)
            replica = replicas[rid]
            replica.running -= 1
            latencies.append(clock - arrival)
            if replica.queue:
                queued_at, queued_adapter = replica.queue.popleft()
                start(replica, clock, queued_at, queued_adapter)
        states[replica.id] = replica.state()

    latencies.sort()
    served = [r.served for r in replicas.values()]
    return Outcome(
        policy=name,
        loads_per_1000=1000 * loads / scenario.requests,
        p50=latencies[len(latencies) // 2],
        p99=latencies[int(len(latencies) * 0.99)],
        max_over_mean=max(served) / (sum(served) / len(served)),
    )


_SHIPPED = EngineDeploymentConfig()
POLICIES: dict[str, Chooser] = {
    "random": choose_random,
    "pow2": choose_pow2,
    "ray-multiplexed": choose_ray_multiplexed,
    # The settings loraplex ships (serve/config/deployment.py), so the simulator judges what is deployed.
    "loraplex": loraplex_chooser(
        AffinityPolicy(epsilon=_SHIPPED.affinity_epsilon, min_load=_SHIPPED.affinity_min_load)
    ),
}


def shared_lru_loads(scenario: Scenario) -> float:
    """Loads per 1,000 requests of one LRU cache as large as all replicas' together: what no routing
    over per-replica LRU caches is expected to beat (every adapter held once, nothing duplicated)."""
    rng = random.Random(scenario.seed)
    weights = [1 / (rank**scenario.zipf_s) for rank in range(1, scenario.adapters + 1)]
    picks = rng.choices([f"a{i}" for i in range(scenario.adapters)], weights=weights, k=scenario.requests)
    cache: OrderedDict[str, None] = OrderedDict()
    size, loads = scenario.replicas * scenario.cache, 0
    for adapter in picks:
        if adapter in cache:
            cache.move_to_end(adapter)
            continue
        loads += 1
        cache[adapter] = None
        if len(cache) > size:
            cache.popitem(last=False)
    return 1000 * loads / scenario.requests


def table(scenario: Scenario, outcomes: list[Outcome]) -> list[str]:
    lines = [
        "| policy | adapter loads / 1000 req | p50 latency | p99 latency | max/mean requests per replica |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {o.policy} | {o.loads_per_1000:.1f} | {o.p50:.2f} | {o.p99:.2f} | {o.max_over_mean:.2f} |"
              for o in outcomes]  # fmt: skip
    lines.append(f"| *shared-LRU bound* | {shared_lru_loads(scenario):.1f} | | | |")
    return lines


def plot(sweep: dict[int, list[Outcome]], bounds: dict[int, float], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted(sweep)
    fig, (loads, balance) = plt.subplots(1, 2, figsize=(11, 4))
    for name in POLICIES:
        loads.plot(sizes, [next(o for o in sweep[c] if o.policy == name).loads_per_1000 for c in sizes], "o-",
                   label=name)  # fmt: skip
        balance.plot(sizes, [next(o for o in sweep[c] if o.policy == name).max_over_mean for c in sizes], "o-",
                     label=name)  # fmt: skip
    loads.plot(sizes, [bounds[c] for c in sizes], "k--", label="shared-LRU bound")
    loads.set(xscale="log", xlabel="adapters cached per replica", ylabel="adapter loads / 1000 requests")
    balance.set(xscale="log", yscale="log", xlabel="adapters cached per replica", ylabel="max/mean requests")
    balance.axhline(1.25, color="grey", linestyle=":")
    for axis in (loads, balance):
        axis.minorticks_off()
        axis.set_xticks(sizes, [str(c) for c in sizes])
        axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "routing.png", dpi=110)


NOTE = """\
Each replica runs `slots` requests at once and keeps `cache` adapters loaded (LRU, vLLM's CPU tier
`max_cpu_loras`); a request whose adapter is not loaded costs `load_s` more. Adapter popularity is
Zipf. The *shared-LRU bound* is one LRU cache as large as all replicas' caches together: loads no
routing over per-replica LRU caches is expected to beat, since most remaining loads are adapters
held by no replica at all. The default cache of 64 is a modest CPU tier (64 rank-8 adapters of a
7B model take 1-3 GB of host memory); at 16 the bound itself is above 0.3x power-of-two, so no
policy could meet that goal there (see the sweep)."""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--replicas", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--cache", type=int, default=64, help="adapters each replica keeps loaded (LRU)")
    parser.add_argument("--sweep", type=int, nargs="*", default=[16, 32, 64, 128], help="cache sizes to compare")
    parser.add_argument("--out", type=Path, default=Path("docs/sim"))
    args = parser.parse_args(argv)
    scenario = Scenario(replicas=args.replicas, adapters=args.adapters, requests=args.requests, cache=args.cache)
    outcomes = [simulate(scenario, name, choose) for name, choose in POLICIES.items()]
    pow2 = next(o for o in outcomes if o.policy == "pow2")
    ours = next(o for o in outcomes if o.policy == "loraplex")
    final = f"loads_vs_pow2={ours.loads_per_1000 / pow2.loads_per_1000:.2f} max_over_mean={ours.max_over_mean:.2f}"

    sweep_requests = min(args.requests, 50_000)
    sweep: dict[int, list[Outcome]] = {}
    bounds: dict[int, float] = {}
    for cache in args.sweep:
        variant = Scenario(replicas=args.replicas, adapters=args.adapters, requests=sweep_requests, cache=cache)
        sweep[cache] = [simulate(variant, name, choose) for name, choose in POLICIES.items()]
        bounds[cache] = shared_lru_loads(variant)
    args.out.mkdir(parents=True, exist_ok=True)
    if sweep:
        plot(sweep, bounds, args.out)

    lines = ["# Routing simulator", "", f"Scenario: {scenario}. Command: `make sim`.", "", NOTE, "",
             *table(scenario, outcomes)]  # fmt: skip
    lines += ["", "```", final, "```", ""]
    if sweep:
        lines += [
            f"## Cache size sweep ({sweep_requests:,} requests each)", "",
            "| adapters cached per replica | pow2 loads | ray-multiplexed | loraplex | loraplex / pow2 | "
            "shared-LRU bound / pow2 | loraplex max/mean |",
            "|---|---|---|---|---|---|---|",
        ]  # fmt: skip
        for cache, results in sweep.items():
            by = {o.policy: o for o in results}
            p2 = by["pow2"].loads_per_1000
            lines.append(
                f"| {cache} | {p2:.1f} | {by['ray-multiplexed'].loads_per_1000:.1f} | "
                f"{by['loraplex'].loads_per_1000:.1f} | {by['loraplex'].loads_per_1000 / p2:.2f} | "
                f"{bounds[cache] / p2:.2f} | {by['loraplex'].max_over_mean:.2f} |"
            )
        lines += ["", "![loads and balance by cache size](routing.png)", ""]
    (args.out / "README.md").write_text("\n".join(lines))
    print("\n".join(lines))
    print(final)


if __name__ == "__main__":
    main()
