"""Fair share of the engines when they are backlogged: an admission gate ordered by virtual token counters.

Each router replica lets at most `max_inflight` generation requests reach the engines at once. Below
that, requests pass straight through. Above it they wait in one queue per tenant (API key), and when
a slot frees the gate admits the head request of the waiting tenant that has received the least
weighted service so far — the Virtual Token Counter of Sheng et al., "Fairness in Serving Large
Language Models" (OSDI'24). A tenant's counter grows by the tokens it is served divided by its
weight: the prompt (estimated) when a request is admitted, the rest once its real usage is known.
A tenant that becomes backlogged is lifted to the lowest counter among those waiting, so credit
cannot be banked while idle; a heavy tenant with many queued requests cannot starve a light one.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from routing.errors import Overloaded

T = TypeVar("T")


class VirtualTokenCounters(Generic[T]):
    """Per-tenant FIFO queues and counters; `pop` returns the head of the least-served waiting tenant."""

    def __init__(self) -> None:
        self.counters: dict[str, float] = {}
        self._queues: dict[str, deque[tuple[int, T]]] = {}
        self._arrivals = itertools.count()
        self._last_left = 0.0

    def __len__(self) -> int:
        return sum(len(queue) for queue in self._queues.values())

    def push(self, tenant: str, item: T) -> None:
        if tenant not in self._queues:  # newly backlogged: no credit for the time it was idle
            floor = min((self.counters[t] for t in self._queues), default=self._last_left)
            self.counters[tenant] = max(self.counters.get(tenant, 0.0), floor)
            self._queues[tenant] = deque()
        self._queues[tenant].append((next(self._arrivals), item))

    def pop(self) -> tuple[str, T] | None:
        """The next request to admit: smallest counter first, earliest arrival among equals."""
        if not self._queues:
            return None
        tenant = min(self._queues, key=lambda t: (self.counters[t], self._queues[t][0][0]))
        _, item = self._queues[tenant].popleft()
        self._leave_if_idle(tenant)
        return tenant, item

    def remove(self, tenant: str, item: T) -> None:
        """Withdraws a request that gave up waiting."""
        queue = self._queues.get(tenant)
        if queue is None:
            return
        for entry in queue:
            if entry[1] is item:
                queue.remove(entry)
                break
        self._leave_if_idle(tenant)

    def charge(self, tenant: str, service: float) -> None:
        """Adds weighted service (tokens / weight; negative corrects an over-estimate)."""
        self.counters[tenant] = self.counters.get(tenant, 0.0) + service

    def _leave_if_idle(self, tenant: str) -> None:
        if not self._queues[tenant]:
            del self._queues[tenant]
            self._last_left = self.counters[tenant]


@dataclass(eq=False)
class _Waiter:
    """A queued request: its key's weight, its admission cost, and the future that grants its slot."""

    weight: float
    cost: int
    granted: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class FairGate:
    """Bounds a router replica's requests in flight to the engines; queued ones are released by VTC."""

    def __init__(self, max_inflight: int, max_waiting: int) -> None:
        self.max_inflight = max_inflight
        self.max_waiting = max_waiting
        self.inflight = 0
        self.queue: VirtualTokenCounters[_Waiter] = VirtualTokenCounters()

    @property
    def waiting(self) -> int:
        return len(self.queue)

    async def acquire(self, tenant: str, weight: float, cost: int) -> None:
        """Returns once the request may go to the engines; `cost` is its estimated prompt tokens.

        Raises `Overloaded` (503) when the wait queue is full. Every successful acquire must be
        followed by exactly one `release`.
        """
        if self.inflight < self.max_inflight and not self.queue:
            self._start(tenant, weight, cost)
            return
        if len(self.queue) >= self.max_waiting:
            raise Overloaded("the router's queue is full; retry shortly", retry_after=1)
        waiter = _Waiter(weight, cost)
        self.queue.push(tenant, waiter)
        try:
            await waiter.granted
        except asyncio.CancelledError:  # the client went away while waiting
            if waiter.granted.cancelled():
                self.queue.remove(tenant, waiter)
            else:  # granted a slot in the same instant: hand it on
                self.release(tenant, weight, -cost)
            raise

    def release(self, tenant: str, weight: float, correction: int = 0) -> None:
        """Frees a slot; `correction` is the request's real tokens minus the cost charged at admission."""
        self.inflight -= 1
        self.queue.charge(tenant, correction / weight)
        while self.inflight < self.max_inflight and (popped := self.queue.pop()) is not None:
            next_tenant, waiter = popped
            if waiter.granted.done():
                continue
            self._start(next_tenant, waiter.weight, waiter.cost)
            waiter.granted.set_result(None)

    def _start(self, tenant: str, weight: float, cost: int) -> None:
        self.inflight += 1
        self.queue.charge(tenant, cost / weight)
