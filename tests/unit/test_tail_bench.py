"""`make bench-tail`'s rounds: each figure the median over the rounds, errors summed, a failure kept."""

from __future__ import annotations

from loadtests.report import median_of


def test_figures_are_medians_over_the_rounds_errors_add_up_and_a_failure_is_kept() -> None:
    first = {"a": {"zipf64": {"workload": "zipf64", "tok_per_s": 80.0, "ttft_p99_ms": 4000.0, "errors": 1}},
             "b": {"failure": {"error": "no engine"}}}  # fmt: skip
    second = {"a": {"zipf64": {"workload": "zipf64", "tok_per_s": 100.0, "ttft_p99_ms": 3000.0, "errors": 0}},
              "b": {"base": {"workload": "base", "tok_per_s": 10.0, "errors": 0}}}  # fmt: skip
    merged = median_of([first, second], columns=None, digits=1)  # as make bench-tail merges its rounds
    assert merged["a"]["zipf64"] == {"rounds": 2, "workload": "zipf64", "tok_per_s": 90.0, "ttft_p99_ms": 3500.0,
                                     "errors": 1}  # fmt: skip
    assert merged["b"]["failure"] == {"error": "round 1: no engine"}
    assert merged["b"]["base"]["rounds"] == 1 and merged["b"]["base"]["tok_per_s"] == 10.0
