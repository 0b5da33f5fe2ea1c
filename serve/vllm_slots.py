"""The slot policy (`serve.slots`) inside vLLM 0.32's scheduler: each step applies the policy's plan first.

vLLM's `Scheduler.schedule` schedules every running request, then admits waiting ones in queue order, skipping
those whose adapter would exceed `max_loras` (`vllm/v1/core/sched/scheduler.py`). Before it runs, the plan's
holders are preempted as vLLM preempts on a full KV cache (`_preempt_request`: blocks freed, the request back at
the front of the waiting queue, resumed later from the prefix cache), and the overdue adapters' requests are put
in front of them. The scheduler runs in vLLM's engine core on every device: a GPU server gets the same policy.

On only when the engine was started with `additional_config={"loraplex_slots": {"wait_s": .., "hold_s": ..}}`
(`EngineConfig.slot_policy_config`) and vLLM's first-come-first-served policy: a priority queue has its own order.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Hashable
from typing import Any

from serve.slots import SlotKeeper, SlotPolicy

logger = logging.getLogger("loraplex.slots")
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
    policy = SlotPolicy(wait_s=float(settings["wait_s"]), hold_s=float(settings["hold_s"]))
    logger.info("loraplex: adapter slot waits bounded (wait %.2f s, hold %.2f s)", policy.wait_s, policy.hold_s)
    # Arrival times are wall-clock times taken in the API process (vLLM's Request.arrival_time).
    return SlotKeeper(policy, int(lora.max_loras), adapter_of=_adapter, arrived_of=lambda r: r.arrival_time)


def before_step(keeper: SlotKeeper[Any], scheduler: Any) -> None:
    """Applies the keeper's plan to `scheduler`: preempts the evicted holders' requests, reorders waiting."""
    waiting = scheduler.waiting
    plan = keeper.plan(scheduler.running, waiting, time.time())
    if not plan.first:
        return
    if plan.evict:
        evicted = set(plan.evict)
        victims = [r for r in scheduler.running if _adapter(r) in evicted]
        scheduler.running = [r for r in scheduler.running if _adapter(r) not in evicted]
        now = time.monotonic()
        for request in reversed(victims):  # each is prepended: they keep their order
            # As `reset_prefix_cache` does: a request preempted and resumed in one step is new to the worker, and
            # output still in flight (async scheduling) is dropped, not delivered out of order.
            scheduler._preempt_request(request, now, drop_stale_output=True)
            scheduler.prev_step_scheduled_req_ids.discard(request.request_id)
        keeper.preempted += len(victims)
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
