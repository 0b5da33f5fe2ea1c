"""Per-key rate limits: requests per minute and tokens per minute, as token buckets.

Each limit is a bucket holding up to one minute's allowance and refilling continuously (rpm/60 or
tpm/60 per second). A request is admitted when both buckets can pay for it: one request per sequence it
generates (prompts x n: a batch of 8 prompts is the work of 8 requests), and its estimated tokens (prompt +
max_tokens, per sequence). Once the response's real usage is known the difference is
charged or refunded, so a bucket may go into debt and later requests wait it out. Buckets, unlike
fixed or moving windows, take such corrections exactly and give an exact `Retry-After`.

Limits must hold across router replicas, so in an application the buckets live in ONE Serve
deployment (`SharedRateLimiter`, reached through `ServeRateLimiter`); `LocalRateLimiter` keeps them
in the process, for tests and single-replica use.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

logger = logging.getLogger("loraplex.router")
WINDOW_S = 60.0
LIMITER_TIMEOUT_S = 1.0
Limit = Literal["requests", "tokens"]


@dataclass(frozen=True)
class Decision:
    """A rate limiter's answer: admitted (`retry_after` None), or when to retry and which limit refused."""

    retry_after: float | None = None
    limit: Limit | None = None
    too_large: bool = False
    """The request alone needs more (tokens or sequences) than the key's whole per-minute allowance of `limit`."""

    @property
    def admitted(self) -> bool:
        return self.retry_after is None


ADMITTED = Decision()


class RateLimiter(Protocol):
    """Admits requests against a key's limits, then settles their real token usage."""

    unreachable: int
    """Calls that failed or timed out (and were let through)."""

    async def admit(
        self, key_id: str, rpm: int | None, tpm: int | None, estimated_tokens: int, requests: int = 1
    ) -> Decision: ...

    async def charge(self, key_id: str, tokens: int) -> None:
        """Adds `tokens` to the key's token usage (negative: a refund of an over-estimate)."""
        ...


@dataclass
class Bucket:
    """One limit of one key: `level` units available now, at most `capacity`, refilled at capacity per minute."""

    capacity: float
    level: float
    updated: float

    def refill(self, now: float, capacity: float) -> None:
        if capacity != self.capacity:  # the key's limit changed (keys file reloaded)
            self.level = min(self.level, capacity)
            self.capacity = capacity
        self.level = min(self.capacity, self.level + (now - self.updated) * self.capacity / WINDOW_S)
        self.updated = now

    def wait_for(self, amount: float) -> float:
        """Seconds until `amount` is available (0 when it is now)."""
        missing = amount - self.level
        return 0.0 if missing <= 0 else missing * WINDOW_S / self.capacity


class TokenBuckets:
    """Every key's request and token buckets; each call is atomic (no awaits inside)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[tuple[str, Limit], Bucket] = {}

    def admit(
        self, key_id: str, rpm: int | None, tpm: int | None, estimated_tokens: int, requests: int = 1
    ) -> Decision:
        """`requests`: what the request counts for against `rpm` (its sequences)."""
        if rpm is not None and requests > rpm:
            return Decision(retry_after=WINDOW_S, limit="requests", too_large=True)
        if tpm is not None and estimated_tokens > tpm:
            return Decision(retry_after=WINDOW_S, limit="tokens", too_large=True)
        now = self._clock()
        needs: list[tuple[Bucket, float, Limit]] = []
        if rpm is not None:
            needs.append((self._bucket(key_id, "requests", rpm, now), float(requests), "requests"))
        if tpm is not None:
            needs.append((self._bucket(key_id, "tokens", tpm, now), float(estimated_tokens), "tokens"))
        refusal = ADMITTED
        for bucket, amount, limit in needs:
            wait = bucket.wait_for(amount)
            if wait > 0 and wait > (refusal.retry_after or 0.0):
                refusal = Decision(retry_after=wait, limit=limit)
        if not refusal.admitted:
            return refusal
        for bucket, amount, _ in needs:
            bucket.level -= amount
        return ADMITTED

    def charge(self, key_id: str, tokens: int) -> None:
        bucket = self._buckets.get((key_id, "tokens"))
        if bucket is not None:
            bucket.refill(self._clock(), bucket.capacity)
            bucket.level = min(bucket.capacity, bucket.level - tokens)

    def _bucket(self, key_id: str, limit: Limit, capacity: int, now: float) -> Bucket:
        bucket = self._buckets.get((key_id, limit))
        if bucket is None:
            bucket = self._buckets[(key_id, limit)] = Bucket(capacity=capacity, level=capacity, updated=now)
        bucket.refill(now, capacity)
        return bucket


class LocalRateLimiter:
    """A `RateLimiter` over buckets in this process: exact for one router replica, and for tests."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._buckets = TokenBuckets(clock)
        self.unreachable = 0  # in-process: never

    async def admit(
        self, key_id: str, rpm: int | None, tpm: int | None, estimated_tokens: int, requests: int = 1
    ) -> Decision:
        return self._buckets.admit(key_id, rpm, tpm, estimated_tokens, requests)

    async def charge(self, key_id: str, tokens: int) -> None:
        self._buckets.charge(key_id, tokens)


class SharedRateLimiter(LocalRateLimiter):
    """The buckets of every router replica, deployed as ONE Ray Serve replica (`LoraplexLimiter`).

    Its methods never await, so concurrent calls from many routers cannot interleave inside one
    decision. A restart forgets the buckets (they start full again): limits are briefly lenient,
    never wrongly strict.
    """


class ServeRateLimiter:
    """A `RateLimiter` over the `SharedRateLimiter` deployment's handle.

    If the limiter does not answer within `LIMITER_TIMEOUT_S` (or fails) the request is admitted, the
    failure logged and counted (`unreachable`, exported as `loraplex_rate_limiter_unreachable_total`): a
    limiter outage must not take every tenant's traffic down with it, nor make it wait.
    """

    def __init__(self, handle: Any) -> None:
        self._handle = handle
        self.unreachable = 0

    async def admit(
        self, key_id: str, rpm: int | None, tpm: int | None, estimated_tokens: int, requests: int = 1
    ) -> Decision:
        try:
            decision: Decision = await asyncio.wait_for(
                self._handle.admit.remote(key_id, rpm, tpm, estimated_tokens, requests), LIMITER_TIMEOUT_S
            )
        except Exception:
            self.unreachable += 1
            logger.warning("rate limiter unreachable; admitting %s unchecked", key_id, exc_info=True)
            return ADMITTED
        return decision

    async def charge(self, key_id: str, tokens: int) -> None:
        try:
            await asyncio.wait_for(self._handle.charge.remote(key_id, tokens), LIMITER_TIMEOUT_S)
        except Exception:
            self.unreachable += 1
            logger.warning("rate limiter unreachable; %d tokens of %s not charged", tokens, key_id, exc_info=True)
