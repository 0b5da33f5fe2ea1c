"""Bounds on the inline composites the registry makes for requests: in total, per key, and per key per minute.

A request's `compose` field can ask for a composite no one asked for before; each new one costs a PEFT build
(seconds of CPU, one at a time in the registry's build pool) and a folder in the composite store and in every
node's cache, and its request holds one of the registry's request slots while it waits. `BuildBudget` refuses one
past the bounds at once, with a `Retry-After`: 503 past the total, 429 past the key's share. So waiting builds
never take the slots routers' reads and health checks need, and no key crowds out the others' builds.
"""

from __future__ import annotations

import math
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass

from serve.wire import WireError

WINDOW_S = 60.0
BUILD_RETRY_S = 5
"""`Retry-After` of a build refused for builds in flight: about one build's time."""


@dataclass(frozen=True)
class BuildLimits:
    """The bounds (`RegistryConfig.max_pending_builds`, `max_pending_builds_per_key`, `builds_per_key_per_minute`)."""

    pending: int = 4
    """New inline composites being made or waiting to be, for every key together."""
    pending_per_key: int = 1
    """New inline composites one key may have being made or waiting at once."""
    per_key_per_minute: int | None = 10
    """New inline composites one key may ask for in any minute; None: no bound."""


class BuildBudget:
    """Counts the new inline composites each key has in flight and asked for within the last minute."""

    def __init__(self, limits: BuildLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self._clock = clock
        self._pending: Counter[str] = Counter()
        self._asked: dict[str, deque[float]] = {}

    def take(self, owner: str) -> WireError | None:
        """Counts one new composite for key `owner`, or refuses it (nothing counted) with the error to answer: the
        key's own bounds first (429, its doing), then the total (503)."""
        if self._pending[owner] >= self.limits.pending_per_key:
            return _too_many(f"key `{owner}` has {self._pending[owner]} composites being made already "
                             "(registry.max_pending_builds_per_key)", BUILD_RETRY_S)  # fmt: skip
        now = self._clock()
        asked = self._asked.setdefault(owner, deque())
        while asked and asked[0] <= now - WINDOW_S:
            asked.popleft()
        if (per_minute := self.limits.per_key_per_minute) is not None and len(asked) >= per_minute:
            wait = max(1, math.ceil(asked[0] + WINDOW_S - now))
            return _too_many(f"key `{owner}` asked for {per_minute} new composites within a minute "
                             "(registry.builds_per_key_per_minute)", wait)  # fmt: skip
        if self._pending.total() >= self.limits.pending:
            return WireError(503, f"the registry is making {self.limits.pending} composites for requests already "
                                  "(registry.max_pending_builds); retry shortly", "compose", type="overloaded_error",
                             code="overloaded", retry_after=BUILD_RETRY_S)  # fmt: skip
        asked.append(now)
        self._pending[owner] += 1
        return None

    def give_back(self, owner: str) -> None:
        """The composite `take` counted for `owner` is made (or failed): it no longer counts as in flight."""
        self._pending[owner] -= 1
        if self._pending[owner] <= 0:
            del self._pending[owner]


def _too_many(why: str, retry_after: int) -> WireError:
    return WireError(429, f"{why}; retry after {retry_after} s", "compose", type="rate_limit_error",
                     code="rate_limit_exceeded", retry_after=retry_after)  # fmt: skip
