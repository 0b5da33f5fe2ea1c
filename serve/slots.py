"""Which adapter gets an engine LoRA slot: first come, first served, with a bound on how long any adapter waits.

An engine step serves requests of at most `max_loras` adapters, and a running request keeps its adapter's slot
until it finishes (vLLM's and SGLang's rule). Popular adapters nearly always have a running request, so under
load a rare adapter's request waits until a gap happens to open: tens of seconds, the length of a whole
generation. This policy bounds that wait, in two moves made before each step:

- **Aging.** Requests of an adapter that has waited for a slot past its bound go to the front of the waiting
  queue, ahead of newer requests of other adapters, so the next slot that opens is theirs. The bound is `wait_s`
  (short) for an adapter with a request waiting for its first token, counted from its oldest request's arrival,
  and `pause_s` (longer) for one whose requests were paused, counted from when it lost its slot: those have
  streamed already, a pause delays their next token, not their first, and a longer pause means fewer slot
  switches. The first-token adapters go first, then the paused ones, the longest-waiting first in each.
- **Pausing.** If no slot is free, a holder gives its slot up: the one with the fewest running requests
  (the fewest streams paused), the longest-held on a tie. Its running requests pause: they keep their KV cache
  and their place, and are left out of the engine's steps until the adapter has a slot again (into a slot that
  comes free, or when it is overdue in turn), so they resume where they stopped with nothing computed twice. An adapter
  keeps a slot it gained for at least `hold_s`, so slots are not handed back and forth every step; and a
  holder with more streams than the waiting adapter brings is passed over while one with no more will be
  free to go within `hold_s`, so a swap does not shrink the batch when it need not.

So a request waits for its first slot at most `wait_s + hold_s` (plus a step) while fewer adapters are overdue
than there are slots; with more, overdue adapters take slots oldest first. What a popular adapter gives up:
nothing while rare adapters can take slots from each other; otherwise a pause of about `pause_s` for its fewest
streams.

The same code decides in vLLM's scheduler (`serve.vllm_patches`) and in the simulated engine
(`serve.engines.sim_scheduler`), which the slot simulator (`loadtests/slot_sim.py`) runs on a virtual clock.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

R = TypeVar("R")


@dataclass(frozen=True)
class Holder:
    """An adapter holding a slot: since when, and how many of its requests run."""

    adapter: Hashable
    since: float
    running: int


@dataclass(frozen=True)
class Waiter:
    """An adapter without a slot whose requests wait: since when, how many of them, and whether one of them waits
    for its first token (`fresh`: queued, not yet run) rather than to go on (paused)."""

    adapter: Hashable
    since: float
    waiting: int = 1
    fresh: bool = True


@dataclass(frozen=True)
class Plan:
    """What to do before a step: which adapters' requests go first (in order), and which holders give up slots."""

    first: tuple[Hashable, ...] = ()
    evict: tuple[Hashable, ...] = ()


@dataclass(frozen=True)
class SlotPolicy:
    """A bound of `wait_s` on an adapter's wait for a slot for a first token and of `pause_s` for paused requests to
    go on; `hold_s`, the least time a gained slot is kept."""

    wait_s: float = 0.25
    hold_s: float = 1.0
    pause_s: float | None = 2.0
    """The bound for an adapter whose requests were paused (they have answered already); None: `wait_s`."""

    @property
    def pause_bound_s(self) -> float:
        """The bound for paused requests: `pause_s`, or `wait_s` when it is None."""
        return self.wait_s if self.pause_s is None else self.pause_s

    def overdue(self, waiters: Sequence[Waiter], now: float) -> list[Waiter]:
        """Waiting adapters past their bound (`wait_s` for a first token, `pause_s` to go on): those with a request
        waiting for its first token first, then those whose requests were paused; the longest-waiting first in each."""
        due = (w for w in waiters if now - w.since >= (self.wait_s if w.fresh else self.pause_bound_s))
        return sorted(due, key=lambda w: (not w.fresh, w.since))

    def plan(self, holders: Sequence[Holder], waiters: Sequence[Waiter], slots: int, now: float) -> Plan:
        """The plan for the next step of an engine with `slots` LoRA slots."""
        overdue = self.overdue(waiters, now)
        if not overdue:
            return Plan()
        by_cost = sorted(holders, key=lambda h: (h.running, h.since))
        evict: list[Hashable] = []
        for waiter in overdue[max(0, slots - len(holders)) :]:
            victim = self._victim(by_cost, waiter, now)
            if victim is not None:
                by_cost.remove(victim)
                evict.append(victim.adapter)
        return Plan(first=tuple(w.adapter for w in overdue), evict=tuple(evict))

    def _victim(self, by_cost: list[Holder], waiter: Waiter, now: float) -> Holder | None:
        """The holder to give `waiter` its slot: the cheapest that has held its slot `hold_s`, but not one that
        pauses more streams than `waiter` brings while a holder that pauses no more will be free to go soon."""
        free = [h for h in by_cost if now - h.since >= self.hold_s]
        if not free:
            return None
        if free[0].running <= waiter.waiting or not any(h.running <= waiter.waiting for h in by_cost):
            return free[0]
        return None


class SlotKeeper(Generic[R]):
    """One engine's slot bookkeeping for the policy: when each adapter gained its slot and when each lost one.

    Engines hand it their own request objects; `adapter_of` gives a request's adapter (None: the base model) and
    `arrived_of` its arrival time, on the clock `plan` is given.
    """

    def __init__(
        self,
        policy: SlotPolicy,
        slots: int,
        adapter_of: Callable[[R], Hashable | None],
        arrived_of: Callable[[R], float],
    ) -> None:
        self.policy = policy
        self.slots = slots
        self.adapter_of = adapter_of
        self._arrived_of = arrived_of
        self._held_since: dict[Hashable, float] = {}
        self._last_plan: float | None = None
        """When the last plan was made: an adapter first seen running now gained its slot in the step made then."""
        self._lost_at: dict[Hashable, float] = {}
        self.paused = 0
        """Running requests paused so far to free their adapter's slot (the engines count them as they pause)."""

    def plan(self, running: Iterable[R], waiting: Iterable[R], now: float, paused: Iterable[R] = ()) -> Plan:
        """The plan for the next step, given the engine's running requests (not paused ones), its queued requests
        (`waiting`: none has run yet) and its paused ones."""
        counts: dict[Hashable, int] = {}
        for request in running:
            if (adapter := self.adapter_of(request)) is not None:
                counts[adapter] = counts.get(adapter, 0) + 1
        gained = now if self._last_plan is None else self._last_plan
        self._last_plan = now
        self._held_since = {a: self._held_since.get(a, gained) for a in counts}
        holders = [Holder(a, self._held_since[a], n) for a, n in counts.items()]
        waiting_since: dict[Hashable, float] = {}
        waiting_count: dict[Hashable, int] = {}
        fresh: set[Hashable] = set()
        for request, queued in [*((r, False) for r in paused), *((r, True) for r in waiting)]:
            adapter = self.adapter_of(request)
            if adapter is None or adapter in counts:
                continue
            since = max(self._arrived_of(request), self._lost_at.get(adapter, float("-inf")))
            waiting_since[adapter] = min(since, waiting_since.get(adapter, since))
            waiting_count[adapter] = waiting_count.get(adapter, 0) + 1
            if queued:
                fresh.add(adapter)
        # Forgotten once it has its slot back or nothing of it waits any more.
        self._lost_at = {a: t for a, t in self._lost_at.items() if a in waiting_since}
        waiters = [Waiter(a, t, waiting_count[a], a in fresh) for a, t in waiting_since.items()]
        plan = self.policy.plan(holders, waiters, self.slots, now)
        for adapter in plan.evict:
            self._lost_at[adapter] = now
            del self._held_since[adapter]
        return plan

    def ordered(self, plan: Plan, waiting: Iterable[R]) -> list[R]:
        """The waiting requests of the plan's `first` adapters, in the order they are to go to the front."""
        rank = {adapter: place for place, adapter in enumerate(plan.first)}
        ahead = [r for r in waiting if self.adapter_of(r) in rank]
        return sorted(ahead, key=lambda r: rank[self.adapter_of(r)])  # stable: each adapter's in queue order

    def resume(self, plan: Plan, running: Iterable[R], paused: Iterable[R], queued: Iterable[R]) -> set[Hashable]:
        """The paused adapters whose requests run again this step: those with a slot anyway (a request of theirs
        runs), then, into the slots free once the plan's holders gave theirs up, the plan's overdue adapters in its
        order (a queued one takes its slot through the engine's own admission, being first in the queue), then
        the other paused adapters, the longest-paused first."""
        evicted = set(plan.evict)
        holding = {a for r in running if (a := self.adapter_of(r)) is not None} - evicted
        waiting = {a for r in paused if (a := self.adapter_of(r)) is not None}
        resume = waiting & holding
        queued_adapters = {self.adapter_of(r) for r in queued}
        free = self.slots - len(holding)
        for adapter in plan.first:
            if free <= 0:
                break
            if adapter in waiting and adapter not in resume:
                resume.add(adapter)
                free -= 1
            elif adapter in queued_adapters:
                free -= 1
        for adapter in sorted(waiting - resume - evicted, key=lambda a: self._lost_at.get(a, float("-inf"))):
            if free <= 0:
                break
            resume.add(adapter)
            free -= 1
        return resume
