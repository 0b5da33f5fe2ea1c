"""Fair share of the engines when they are backlogged: an admission gate ordered by virtual token counters.

Each router replica lets at most `max_inflight` sequences reach the engines at once (a request takes one slot
per sequence it generates, prompts x n, at most `max_inflight`, so a batch of 64 prompts counts as the work
of 64 requests, not one). Below
that, requests pass straight through. Above it they wait in one queue per tenant (API key), and when
a slot frees the gate admits the head request of the waiting tenant that has received the least
weighted service so far — the Virtual Token Counter of Sheng et al., "Fairness in Serving Large
Language Models" (OSDI'24). A tenant's counter grows by the tokens it is served divided by its
weight: the prompt (estimated) when a request is admitted, the rest once its real usage is known.
A tenant that becomes backlogged is lifted to the lowest counter among those waiting, so credit
cannot be banked while idle; a heavy tenant with many queued requests cannot starve a light one.

Ordering the queue is not enough for a light tenant's latency: if a heavy tenant holds every slot,
the light tenant's request still waits for one to free. So the gate also keeps a few slots
(`reserve`) for tenants using less than their fair share of the gate (`max_inflight` split by the
weights of the tenants with requests in flight or waiting): a tenant at or above its share may only
fill the gate up to `max_inflight - reserve`; one below its share may use every slot. A tenant alone
is below its share until it holds them all, so nothing is held back when only one tenant is busy.

The waiting room (`max_waiting`) is shared, but a full one does not turn a light tenant away: the newest
waiting request of the most backlogged tenant (waiting requests per unit of weight) is shed with 503
to make room, as long as that tenant would still have more waiting than the newcomer's. A tenant that
floods the queue only ever sheds its own requests.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter, deque
from collections.abc import Callable, Iterator
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

    def __contains__(self, tenant: str) -> bool:
        return tenant in self._queues

    def waiting_of(self, tenant: str) -> int:
        return len(self._queues.get(tenant, ()))

    def pop_newest(self, tenant: str) -> T:
        """Takes the tenant's most recent waiting request out (to shed it)."""
        _, item = self._queues[tenant].pop()
        self._leave_if_idle(tenant)
        return item

    def tenants(self) -> Iterator[str]:
        return iter(self._queues)

    def peek(self, eligible: Callable[[str], bool] | None = None) -> tuple[str, T] | None:
        """What `pop` would return, left in place."""
        candidates = [t for t in self._queues if eligible is None or eligible(t)]
        if not candidates:
            return None
        tenant = min(candidates, key=lambda t: (self.counters[t], self._queues[t][0][0]))
        return tenant, self._queues[tenant][0][1]

    def pop(self, eligible: Callable[[str], bool] | None = None) -> tuple[str, T] | None:
        """The next request to admit: smallest counter first, earliest arrival among equals.

        With `eligible`, only tenants it accepts are considered.
        """
        if (head := self.peek(eligible)) is None:
            return None
        return head[0], self.pop_oldest(head[0])

    def pop_oldest(self, tenant: str) -> T:
        """Takes the tenant's oldest waiting request out (to admit it)."""
        _, item = self._queues[tenant].popleft()
        self._leave_if_idle(tenant)
        return item

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
    slots: int
    granted: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class FairGate:
    """Bounds a router replica's requests in flight to the engines; queued ones are released by VTC."""

    def __init__(self, max_inflight: int, max_waiting: int, reserve: int | None = None) -> None:
        self.max_inflight = max_inflight
        self.max_waiting = max_waiting
        self.reserve = min(max(1, max_inflight // 8) if reserve is None else reserve, max_inflight - 1)
        self.inflight = 0
        self.running: Counter[str] = Counter()
        self.weights: dict[str, float] = {}
        self.queue: VirtualTokenCounters[_Waiter] = VirtualTokenCounters()

    @property
    def waiting(self) -> int:
        return len(self.queue)

    def share(self, tenant: str) -> float:
        """The tenant's fair share of the gate's slots among the tenants with requests in flight or waiting."""
        active = set(self.running) | set(self.queue.tenants()) | {tenant}
        total = sum(self.weights.get(t, 1.0) for t in active)
        return self.max_inflight * self.weights.get(tenant, 1.0) / total

    def slots_for(self, sequences: int) -> int:
        """The slots a request generating `sequences` sequences holds: one each, at most the whole gate."""
        return max(1, min(sequences, self.max_inflight))

    def may_start(self, tenant: str, slots: int = 1) -> bool:
        """Whether a request of `tenant` may take `slots` slots now (the reserve is for tenants below their share)."""
        if self.running[tenant] < self.share(tenant):
            return self.inflight + slots <= self.max_inflight
        return self.inflight + slots <= self.max_inflight - self.reserve

    async def acquire(self, tenant: str, weight: float, cost: int, slots: int = 1) -> None:
        """Returns once the request may go to the engines; `cost` is its estimated prompt tokens, `slots` what
        `slots_for` gave for its sequences.

        Raises `Overloaded` (503) when the wait queue is full. Every successful acquire must be
        followed by exactly one `release` with the same `slots`.
        """
        self.weights[tenant] = weight
        if not self.queue and self.may_start(tenant, slots):
            self._start(tenant, weight, cost, slots)
            return
        if len(self.queue) >= self.max_waiting and not self._shed_for(tenant, weight):
            self._forget_if_idle(tenant)
            raise Overloaded("the router's queue is full; retry shortly", retry_after=1)
        waiter = _Waiter(weight, cost, slots)
        self.queue.push(tenant, waiter)
        self._admit_waiting()  # others wait (for a request of many sequences, say): this one may still go first
        try:
            await waiter.granted
        except Overloaded:  # shed for a lighter tenant's request
            self._forget_if_idle(tenant)
            raise
        except asyncio.CancelledError:  # the client went away while waiting
            if waiter.granted.cancelled():
                self.queue.remove(tenant, waiter)
                self._forget_if_idle(tenant)
                self._admit_waiting()  # with one tenant fewer, the others' shares grew
            else:  # granted its slots in the same instant: hand them on
                self.release(tenant, weight, -cost, slots)
            raise

    def release(self, tenant: str, weight: float, correction: int = 0, slots: int = 1) -> None:
        """Frees a request's slots; `correction` is its real tokens minus the cost charged at admission."""
        self.inflight -= slots
        self.running[tenant] -= slots
        if self.running[tenant] <= 0:
            del self.running[tenant]
        self.queue.charge(tenant, correction / weight)
        self._forget_if_idle(tenant)
        self._admit_waiting()

    def _shed_for(self, tenant: str, weight: float) -> bool:
        """Makes room for `tenant`'s request by shedding the most backlogged tenant's newest one, if it has more."""
        backlog = {t: self.queue.waiting_of(t) / self.weights.get(t, 1.0) for t in self.queue.tenants()}
        heavy = max(backlog, key=backlog.__getitem__, default=None)
        if heavy is None or heavy == tenant or backlog[heavy] <= (self.queue.waiting_of(tenant) + 1) / weight:
            return False
        shed = self.queue.pop_newest(heavy)
        if not shed.granted.done():
            shed.granted.set_exception(Overloaded("the router's queue is full; retry shortly", retry_after=1))
        return True

    def _admit_waiting(self) -> None:
        """Starts waiting requests in VTC order while they fit. A request of many sequences that is next but
        does not fit yet stops the others behind it until enough slots free, so it is never starved."""
        while (head := self.queue.peek(self.may_start)) is not None:
            tenant, waiter = head
            if not waiter.granted.done() and not self.may_start(tenant, waiter.slots):
                return
            self.queue.pop_oldest(tenant)
            if waiter.granted.done():
                continue
            self._start(tenant, waiter.weight, waiter.cost, waiter.slots)
            waiter.granted.set_result(None)

    def _start(self, tenant: str, weight: float, cost: int, slots: int = 1) -> None:
        self.inflight += slots
        self.running[tenant] += slots
        self.queue.charge(tenant, cost / weight)

    def _forget_if_idle(self, tenant: str) -> None:
        if tenant not in self.running and tenant not in self.queue:
            self.weights.pop(tenant, None)
