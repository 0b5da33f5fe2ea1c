"""When an inline composite is collected: a request's `compose` leaves a composite in the composite store
(`CompositeStore`) that no record names, so without collection a tenant could fill the store without bound.

An inline composite no one used for `ttl_s` (`registry.inline_composite_ttl_s`) is collected. Its last use is the later
of the store's own timestamp for it (`CompositeStore.stored`: a folder's mtime, an S3 composite's newest LastModified;
at first, when it was built) and the uses this registry saw since it started: a build, a router asking for it, an
engine replica reporting requests for it. Each pass writes the uses it saw back to the store's timestamps
(`CompositeStore.touch`), so a restarted registry's floor for a composite in use is at most one pass old. What no pass
may collect, whatever its age (a composite a registered record names, one being built), the caller says: `held`.
`CompositeAdapters.collect` runs the passes; this is the bookkeeping and the rule.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Set
from dataclasses import dataclass

from serve.wire import INLINE_COMPOSITE_PREFIX

PASSES_PER_TTL = 4
LONGEST_PERIOD_S = 3600.0


def inline_name(key: str) -> str:
    """The name of the inline composite of store key `key` (`serve.wire.composition_key`): engines and replica reports
    know it by this."""
    return INLINE_COMPOSITE_PREFIX + key[:24]


@dataclass(frozen=True)
class Sweep:
    """One pass's outcome: the composites to delete, and the timestamps to move to their last use."""

    forgotten: tuple[str, ...]
    touched: tuple[tuple[str, float], ...]


class InlineCollection:
    """The inline composites' last uses this registry saw, by name, and which composites a pass collects."""

    def __init__(self, ttl_s: float, clock: Callable[[], float] = time.time) -> None:
        self.ttl_s = ttl_s
        self._clock = clock
        """Wall-clock seconds, as the store's timestamps are."""
        self._used: dict[str, float] = {}

    @property
    def period_s(self) -> float:
        """How often a pass runs: a composite outlives its TTL by at most this, and its floor after a restart is at
        most this old."""
        return min(self.ttl_s / PASSES_PER_TTL, LONGEST_PERIOD_S)

    def used(self, key: str) -> None:
        """Composite `key` was used now (built, or asked for)."""
        self._used[inline_name(key)] = self._clock()

    def used_names(self, names: Iterable[str]) -> None:
        """The adapters of an engine replica's report were used now; the inline composites among them count."""
        now = self._clock()
        for name in names:
            if name.startswith(INLINE_COMPOSITE_PREFIX):
                self._used[name] = now

    def sweep(self, stored: Mapping[str, float], held: Set[str]) -> Sweep:
        """Of the composites `stored` (key: the store's timestamp), those unused for `ttl_s` and not `held`; and the
        kept ones this registry saw used after their timestamp. Forgets uses older than the TTL: they keep nothing."""
        now = self._clock()
        forgotten: list[str] = []
        touched: list[tuple[str, float]] = []
        for key, stamped in stored.items():
            used = self._used.get(inline_name(key), stamped)
            if key not in held and max(used, stamped) < now - self.ttl_s:
                forgotten.append(key)
            elif used > stamped:
                touched.append((key, used))
        self._used = {name: at for name, at in self._used.items() if at >= now - self.ttl_s}
        return Sweep(tuple(forgotten), tuple(touched))
