"""The console's per-model window: counts per request, forgets what is older than the window, stays bounded."""

from __future__ import annotations

import pytest

from routing.request_window import GROWTH, SLICES, RequestWindow, WindowStats, bin_value, latency_bin


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_a_model_never_seen_has_empty_stats(clock: Clock) -> None:
    stats = RequestWindow(60, clock=clock).stats("nobody")
    assert stats == WindowStats() and stats.error_rate is None
    assert stats.as_json()["p50_s"] is None


def test_requests_tokens_and_errors_add_up(clock: Clock) -> None:
    window = RequestWindow(60, clock=clock)
    window.record("m", 200, 0.1, 3, 5)
    window.record("m", 200, 0.2, 4, 6)
    window.record("m", 429, 0.01, 0, 0)
    window.record("m", 500, 0.3, 1, 0)
    window.record("other", 200, 9.0, 100, 100)
    stats = window.stats("m")
    assert (stats.requests, stats.errors, stats.prompt_tokens, stats.completion_tokens) == (4, 2, 8, 11)
    assert stats.error_rate == 0.5


@pytest.mark.parametrize("latency", [0.0005, 0.001, 0.0123, 0.5, 1.0, 37.0, 3600.0])
def test_a_latency_is_reported_within_half_a_bin(latency: float) -> None:
    reported = bin_value(latency_bin(latency))
    assert max(latency, 0.001) / GROWTH**0.5 <= reported <= max(latency, 0.001) * GROWTH**0.5 * 1.0001


def test_p50_and_p99_of_a_hundred_requests(clock: Clock) -> None:
    window = RequestWindow(60, clock=clock)
    for i in range(1, 101):
        window.record("m", 200, i / 100, 0, 0)  # 10 ms .. 1 s
    stats = window.stats("m")
    assert stats.p50_s == pytest.approx(0.5, rel=0.06)
    assert stats.p99_s == pytest.approx(0.99, rel=0.06)


def test_what_is_older_than_the_window_is_forgotten(clock: Clock) -> None:
    window = RequestWindow(60, clock=clock)
    window.record("m", 200, 0.1, 1, 1)
    clock.now += 30
    window.record("m", 500, 0.1, 1, 1)
    assert window.stats("m").requests == 2
    clock.now += 31  # the first request is now more than a window old (to the slice)
    assert (window.stats("m").requests, window.stats("m").errors) == (1, 1)
    clock.now += 60
    assert window.stats("m") == WindowStats()


def test_slices_are_bounded_whatever_the_traffic(clock: Clock) -> None:
    window = RequestWindow(60, clock=clock)
    for _ in range(10 * SLICES):
        for latency in (0.01, 0.1, 1.0):
            window.record("m", 200, latency, 1, 1)
        clock.now += 1
    slices = window._models["m"]
    assert len(slices) <= SLICES
    assert all(len(piece.latency) <= 3 for piece in slices)


def test_the_quietest_model_makes_room_at_the_bound(clock: Clock) -> None:
    window = RequestWindow(60, max_models=2, clock=clock)
    window.record("old", 200, 0.1, 0, 0)
    clock.now += 10
    window.record("recent", 200, 0.1, 0, 0)
    window.record("new", 200, 0.1, 0, 0)
    assert len(window) == 2
    assert window.stats("old").requests == 0 and window.stats("new").requests == 1


@pytest.mark.parametrize(("window_s", "max_models"), [(0, 1), (-1, 1), (60, 0)])
def test_nonsense_bounds_are_refused(window_s: float, max_models: int) -> None:
    with pytest.raises(ValueError):
        RequestWindow(window_s, max_models)
