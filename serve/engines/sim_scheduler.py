"""The simulated engine's scheduler: vLLM's admission rules, LoRA slots and the slot policy, on any clock.

Each step every running request keeps going; waiting ones are admitted in queue order while the step has room
for their sequences (`max_num_seqs`), skipping any whose adapter would make more than `max_loras` adapters in
the step (vLLM's rule; None: no slot limit). With a `SlotPolicy` the plan of `serve.slots` is applied first, as
`serve.vllm_slots` applies it in vLLM: the evicted holders' requests pause (kept, not run), the adapters the
keeper resumes run again, and the overdue adapters' queued requests go first. The simulated engine runs it in
real time; the slot simulator
(`loadtests/slot_sim.py`) on a virtual clock.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass

from serve.slots import SlotKeeper, SlotPolicy


@dataclass(eq=False)
class Queued:
    """A request as the scheduler sees it: its adapter, its sequences, and when it arrived and last resumed."""

    adapter: Hashable | None
    choices: int
    arrived: float
    admitted_at: float | None = None
    """When it entered the running set (its prompt is processed from then on); None while it waits."""
    pauses: int = 0


class SimScheduler:
    """Decides each step which requests run; knows nothing of tokens or time beyond the `now` it is given."""

    def __init__(self, max_num_seqs: int, max_loras: int | None, policy: SlotPolicy | None) -> None:
        self.max_num_seqs = max_num_seqs
        self.max_loras = max_loras
        self.running: list[Queued] = []
        self.paused: list[Queued] = []
        """Running requests left out of the steps until their adapter has a slot again."""
        self.waiting: deque[Queued] = deque()
        self.keeper: SlotKeeper[Queued] | None = None
        if policy is not None and max_loras is not None:
            self.keeper = SlotKeeper(policy, max_loras, adapter_of=lambda q: q.adapter, arrived_of=lambda q: q.arrived)

    def add(self, request: Queued) -> None:
        self.waiting.append(request)

    def remove(self, request: Queued) -> None:
        """Drops a finished or aborted request, running or waiting."""
        for place in (self.waiting, self.running, self.paused):
            if request in place:
                place.remove(request)
                return

    def schedule(self, now: float) -> list[Queued]:
        """The running requests of this step, after applying the slot plan and admitting what fits."""
        if self.keeper is not None:
            self._apply_plan(self.keeper, now)
        sequences = sum(r.choices for r in self.running)
        adapters = {r.adapter for r in self.running if r.adapter is not None}
        skipped: list[Queued] = []
        while self.waiting:
            request = self.waiting[0]
            if sequences + request.choices > max(self.max_num_seqs, request.choices):
                break
            self.waiting.popleft()
            full = self.max_loras is not None and len(adapters) >= self.max_loras
            if request.adapter is not None and full and request.adapter not in adapters:
                skipped.append(request)
                continue
            request.admitted_at = now
            self.running.append(request)
            sequences += request.choices
            if request.adapter is not None:
                adapters.add(request.adapter)
        self.waiting.extendleft(reversed(skipped))
        return list(self.running)

    def _apply_plan(self, keeper: SlotKeeper[Queued], now: float) -> None:
        plan = keeper.plan(self.running, self.waiting, now, paused=self.paused)
        resume = keeper.resume(plan, self.running, self.paused, self.waiting)
        evicted = set(plan.evict)
        victims = [r for r in self.running if r.adapter in evicted]
        resumed = [r for r in self.paused if r.adapter in resume]
        self.running = [r for r in self.running if r.adapter not in evicted] + resumed
        self.paused = [r for r in self.paused if r.adapter not in resume] + victims
        for request in victims:
            request.pauses += 1
        keeper.paused += len(victims)
        if plan.first:
            ahead = keeper.ordered(plan, self.waiting)
            first = set(ahead)
            self.waiting = deque([*ahead, *(r for r in self.waiting if r not in first)])
