"""The routing policy, alone and in the simulator that runs the same code."""

from __future__ import annotations

from loadtests.simulate import POLICIES, Scenario, simulate
from routing.policy import AffinityPolicy, ReplicaState, rendezvous_order

POLICY = AffinityPolicy(epsilon=0.25)


def replicas(*loads: int, holding: dict[int, str] | None = None) -> list[ReplicaState]:
    holding = holding or {}
    return [
        ReplicaState(f"r{i}", load, frozenset([holding[i]]) if i in holding else frozenset())
        for i, load in enumerate(loads)
    ]


def test_base_requests_go_to_the_least_loaded() -> None:
    assert POLICY.rank(None, replicas(3, 1, 2))[0].replica_id == "r1"


def test_a_replica_holding_the_adapter_wins_while_under_the_bound() -> None:
    assert POLICY.rank("sql", replicas(2, 2, 2, 2, holding={3: "sql"}))[0].replica_id == "r3"


def test_no_replica_exceeds_the_bound_even_if_it_holds_the_adapter() -> None:
    state = replicas(9, 1, 1, 1, holding={0: "sql"})  # bound = ceil(1.25 * 13 / 4) = 5
    choice = POLICY.rank("sql", state)[0]
    assert choice.replica_id != "r0" and choice.ongoing + 1 <= POLICY.bound(state)


def test_each_adapter_has_a_stable_home_and_homes_spread() -> None:
    idle = replicas(0, 0, 0, 0)
    homes = {POLICY.rank(f"a{i}", idle)[0].replica_id for i in range(200)}
    assert homes == {"r0", "r1", "r2", "r3"}
    assert POLICY.rank("a7", idle)[0] == POLICY.rank("a7", list(reversed(idle)))[0]
    ids = tuple(f"r{i}" for i in range(8))
    moved = sum(rendezvous_order(f"a{i}", ids)[0] != rendezvous_order(f"a{i}", ids[:7])[0] for i in range(800))
    assert moved < 800 * 0.25  # removing one of 8 replicas moves only its own adapters (~1/8)


def test_simulator_runs_every_policy_and_affinity_cuts_loads() -> None:
    scenario = Scenario(replicas=8, adapters=200, requests=4000)
    outcomes = {name: simulate(scenario, name, choose) for name, choose in POLICIES.items()}
    assert outcomes["loraplex"].loads_per_1000 < 0.6 * outcomes["pow2"].loads_per_1000
    assert outcomes["loraplex"].max_over_mean < 1.25


def slotted(load: int, held: str = "", active: str = "", free: int | None = None, name: str = "") -> ReplicaState:
    return ReplicaState(name, load, frozenset(held.split()), frozenset(active.split()), free)


def test_within_the_bound_a_replica_where_the_adapter_has_a_slot_comes_first() -> None:
    state = [slotted(1, "sql", free=1, name="idle-holder"), slotted(3, "sql", "sql", free=0, name="running-it")]
    assert [r.replica_id for r in POLICY.rank("sql", state)] == ["running-it", "idle-holder"]


def test_a_free_slot_beats_holding_the_adapter_when_the_holder_s_slots_are_taken() -> None:
    """The holder would make the request wait for a slot (seconds); elsewhere it loads (~0.1 s) and runs."""
    state = [slotted(2, "sql", "a b c d", free=0, name="full-holder"), slotted(2, "", "a", free=3, name="free")]
    assert [r.replica_id for r in POLICY.rank("sql", state)] == ["free", "full-holder"]


def test_slots_never_outweigh_the_load_bound_and_unknown_slots_keep_affinity() -> None:
    over = [slotted(9, "sql", "sql", free=0, name="busy"), slotted(1, free=0, name="a"), slotted(1, name="b")]
    assert POLICY.rank("sql", over)[-1].replica_id == "busy"  # bound = ceil(1.25 * 12 / 3) = 5
    unknown = [slotted(2, name="x"), slotted(2, "sql", name="holder")]
    assert POLICY.rank("sql", unknown)[0].replica_id == "holder"


def test_slot_unaware_affinity_keeps_the_holder_whose_slots_are_taken() -> None:
    """`engine_deployment.affinity_slot_aware: false` (what `make bench-tail --replicas 2` compares against)."""
    state = [slotted(2, "sql", "a b c d", free=0, name="full-holder"), slotted(2, "", "a", free=3, name="free")]
    unaware = AffinityPolicy(epsilon=0.25, slot_aware=False)
    assert [r.replica_id for r in unaware.rank("sql", state)] == ["full-holder", "free"]
