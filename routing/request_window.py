"""Each model's traffic over the last minutes, for the web console: requests, tokens, errors and latency quantiles.

Fed once per request, when the router records it (`routing.metrics.RequestTimer.finish`), never per token. The
window is cut into `SLICES` slices of time; a slice holds counts and a latency histogram with log-spaced bins
(`GROWTH` wide), so memory is bounded by models x slices x bins whatever the traffic, and a quantile is exact to
within half a bin (about 5 %). At most `max_models` models are kept: the one quiet the longest makes room.
"""

from __future__ import annotations

import math
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

SLICES = 30
GROWTH = 1.1
"""Each latency bin is this much wider than the one before."""
SMALLEST_S = 0.001
"""Latencies up to this fall in bin 0."""
LAST_BIN = 200
"""Latencies beyond `SMALLEST_S * GROWTH**LAST_BIN` (about 2 days) share the last bin."""
MAX_MODELS = 1024


def latency_bin(seconds: float) -> int:
    """The histogram bin of a latency: bin i holds (SMALLEST_S * GROWTH**(i-1), SMALLEST_S * GROWTH**i]."""
    if seconds <= SMALLEST_S:
        return 0
    return min(LAST_BIN, math.ceil(math.log(seconds / SMALLEST_S, GROWTH)))


def bin_value(index: int) -> float:
    """The latency a bin stands for: its geometric middle (bin 0: `SMALLEST_S`)."""
    return SMALLEST_S if index == 0 else SMALLEST_S * GROWTH ** (index - 0.5)


@dataclass
class _Slice:
    """One slice of time of one model's traffic."""

    number: int
    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency: Counter[int] = field(default_factory=Counter)


@dataclass(frozen=True)
class WindowStats:
    """One model's traffic over the window: errors are answers with a 4xx or 5xx status."""

    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    p50_s: float | None = None
    p99_s: float | None = None

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None

    def as_json(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "error_rate": self.error_rate,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "p50_s": self.p50_s,
            "p99_s": self.p99_s,
        }


def quantile(histogram: Counter[int], q: float) -> float | None:
    """The smallest bin value with at least `q` of the latencies at or below it; None for no latencies."""
    total = sum(histogram.values())
    if not total:
        return None
    rank = max(1, math.ceil(q * total))
    seen = 0
    for index in sorted(histogram):
        seen += histogram[index]
        if seen >= rank:
            return bin_value(index)
    return bin_value(max(histogram))  # unreachable: the counts add up to `total`


class RequestWindow:
    """Per-model request statistics over the last `window_s` seconds, in `SLICES` slices."""

    def __init__(
        self, window_s: float = 300.0, max_models: int = MAX_MODELS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if window_s <= 0 or max_models < 1:
            raise ValueError("window_s must be positive and max_models at least 1")
        self.window_s = window_s
        self._width = window_s / SLICES
        self._max_models = max_models
        self._clock = clock
        self._models: dict[str, deque[_Slice]] = {}

    def record(self, model: str, status: int, latency_s: float, prompt_tokens: int, completion_tokens: int) -> None:
        """Counts one answered request of `model`."""
        now = self._now()
        slices = self._models.get(model)
        if slices is None:
            self._make_room(now)
            slices = self._models[model] = deque()
        if not slices or slices[-1].number != now:
            slices.append(_Slice(now))
        self._expire(slices, now)
        current = slices[-1]
        current.requests += 1
        current.errors += status >= 400
        current.prompt_tokens += prompt_tokens
        current.completion_tokens += completion_tokens
        current.latency[latency_bin(latency_s)] += 1

    def stats(self, model: str) -> WindowStats:
        """`model`'s traffic in the window (all zero for a model not seen in it)."""
        now = self._now()
        live = [s for s in self._models.get(model, ()) if s.number > now - SLICES]
        if not live:
            return WindowStats()
        histogram: Counter[int] = Counter()
        for piece in live:
            histogram.update(piece.latency)
        return WindowStats(
            requests=sum(s.requests for s in live),
            errors=sum(s.errors for s in live),
            prompt_tokens=sum(s.prompt_tokens for s in live),
            completion_tokens=sum(s.completion_tokens for s in live),
            p50_s=quantile(histogram, 0.5),
            p99_s=quantile(histogram, 0.99),
        )

    def __len__(self) -> int:
        return len(self._models)

    def _now(self) -> int:
        return int(self._clock() // self._width)

    def _expire(self, slices: deque[_Slice], now: int) -> None:
        while slices and slices[0].number <= now - SLICES:
            slices.popleft()

    def _make_room(self, now: int) -> None:
        """Before a new model is added at the bound: forget models quiet for the whole window, else the quietest."""
        if len(self._models) < self._max_models:
            return
        for name, slices in list(self._models.items()):
            self._expire(slices, now)
            if not slices:
                del self._models[name]
        if len(self._models) >= self._max_models:
            quietest = min(self._models, key=lambda name: self._models[name][-1].number)
            del self._models[quietest]
