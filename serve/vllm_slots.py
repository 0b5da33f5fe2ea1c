"""The slot policy (`serve.slots`) inside vLLM 0.32's scheduler: each step applies the policy's plan first.

vLLM's `Scheduler.schedule` schedules every running request, then admits waiting ones in queue order, skipping
those whose adapter would exceed `max_loras` (`vllm/v1/core/sched/scheduler.py`). Before it runs:
- the running requests of the holders the plan names are paused: their `next_decode_eligible_step` is set out
  of reach, so the running loop skips them (vLLM's own skip for pipeline cadence) and their adapter is not in the
  step's LoRA set. They keep their KV blocks and their state in the worker (an unscheduled running request is
  kept, as when a step's token budget runs out): resuming recomputes nothing. (Preempting them instead, as vLLM
  does on a full KV cache, recomputes their whole prefix on a CPU, whose KV blocks are 128 tokens.)
- paused adapters the keeper resumes get their requests scheduled again (into a free slot only, so a step never
  holds more than `max_loras` adapters);
- the overdue adapters' queued requests go to the front of the waiting queue.
The scheduler runs in vLLM's engine core on every device: a GPU server gets the same policy, async scheduling too.

On only when the engine was started with `additional_config={"loraplex_slots": {"wait_s": .., "hold_s": ..}}`
(`EngineConfig.slot_policy_config`) and vLLM's first-come-first-served policy: a priority queue has its own order.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Hashable
from typing import Any

from serve.slots import SlotKeeper, SlotPolicy

logger = logging.getLogger("vllm.loraplex.slots")  # under vLLM's logger: printed by its handler in the engine core
CONFIG_KEY = "loraplex_slots"
"""The key of the policy's settings in vLLM's `additional_config`."""


def keeper_for(scheduler: Any) -> SlotKeeper[Any] | None:
    """The keeper `scheduler`'s configuration asks for, or None (policy off, no LoRA, or a priority queue)."""
    from vllm.v1.core.sched.request_queue import FCFSRequestQueue

    settings = (scheduler.vllm_config.additional_config or {}).get(CONFIG_KEY)
    lora = scheduler.lora_config
    if not settings or lora is None:
        return None
    if not isinstance(scheduler.waiting, FCFSRequestQueue):
        logger.warning("loraplex: the adapter slot policy needs vLLM's fcfs scheduling policy; it is off")
        return None
    pause_s = settings.get("pause_s")  # None: the first token's bound
    policy = SlotPolicy(float(settings["wait_s"]), float(settings["hold_s"]), pause_s and float(pause_s))
    logger.info("loraplex: adapter slot waits bounded (wait %.2f s, hold %.2f s, pause %.2f s)", policy.wait_s,
                policy.hold_s, policy.pause_bound_s)  # fmt: skip
    # Arrival times are wall-clock times taken in the API process (vLLM's Request.arrival_time).
    return SlotKeeper(policy, int(lora.max_loras), adapter_of=_adapter, arrived_of=lambda r: r.arrival_time)


PAUSED = 1 << 62
"""`Request.next_decode_eligible_step` of a paused request: a step the scheduler never reaches."""


def before_step(keeper: SlotKeeper[Any], scheduler: Any) -> None:
    """Applies the keeper's plan to `scheduler`: pauses the evicted holders' requests, resumes the adapters the keeper
    resumes, and puts the overdue adapters' queued requests first."""
    waiting = scheduler.waiting
    for request in waiting:
        if request.next_decode_eligible_step == PAUSED:
            request.next_decode_eligible_step = 0  # preempted by vLLM (a full KV cache) while paused: admitted anew
    running = [r for r in scheduler.running if r.next_decode_eligible_step != PAUSED]
    paused = [r for r in scheduler.running if r.next_decode_eligible_step == PAUSED]
    if not paused and not waiting:
        keeper.plan(running, (), time.time())  # tenures only
        return
    plan = keeper.plan(running, waiting, time.time(), paused=paused)
    resume = keeper.resume(plan, running, paused, waiting)
    evicted = set(plan.evict)
    for request in running:
        if _adapter(request) in evicted:
            request.next_decode_eligible_step = PAUSED
            keeper.paused += 1
    for request in paused:
        if _adapter(request) in resume:
            request.next_decode_eligible_step = 0
    if plan.first:
        ahead = keeper.ordered(plan, waiting)
        waiting.remove_requests(ahead)
        waiting.prepend_requests(reversed(ahead))  # extendleft reverses the order it is given


def _adapter(request: Any) -> Hashable | None:
    lora = request.lora_request
    return lora.lora_int_id if lora is not None and lora.lora_int_id > 0 else None


def install() -> None:
    """Wraps `Scheduler.schedule` (vLLM's async scheduler inherits it) to apply the keeper's plan first."""
    from vllm.v1.core.sched.scheduler import Scheduler

    schedule = Scheduler.schedule
    if getattr(schedule, "_loraplex", False):
        return

    def schedule_with_bounded_slot_waits(self: Any, *args: Any, **kwargs: Any) -> Any:
        if "_loraplex_slots" not in self.__dict__:
            self._loraplex_slots = keeper_for(self)
        if self._loraplex_slots is not None:
            before_step(self._loraplex_slots, self)
        return schedule(self, *args, **kwargs)

    schedule_with_bounded_slot_waits._loraplex = True  # type: ignore[attr-defined]
    Scheduler.schedule = schedule_with_bounded_slot_waits  # type: ignore[method-assign]
