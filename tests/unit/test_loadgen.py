"""The load generator's schedule and statistics, and the benchmark report."""

from __future__ import annotations

import collections
from pathlib import Path

from loadtests.loadgen import Report, Result, Workload, quantile
from loadtests.report import write_report
from serve.config import EngineConfig


def test_zipf_schedule_is_reproducible_and_skewed() -> None:
    workload = Workload("z", tuple(f"m{i}" for i in range(64)), popularity="zipf", num_requests=2000, seed=3)
    schedule = workload.schedule()
    assert schedule == workload.schedule()
    counts = collections.Counter(model for model, _ in schedule)
    assert counts["m0"] > 5 * counts.get("m20", 0) > 0


def test_single_and_uniform_popularity() -> None:
    models = ("a", "b", "c", "d")
    assert {m for m, _ in Workload("s", models, popularity="single").schedule()} == {"a"}
    uniform = collections.Counter(m for m, _ in Workload("u", models, num_requests=4000).schedule())
    assert min(uniform.values()) > 800


def test_report_statistics() -> None:
    results = [Result("m", 200, ttft=0.1 * i, latency=1.0 + 0.1 * i, completion_tokens=11) for i in range(1, 11)]
    results.append(Result("m", 503, error="overloaded"))
    report = Report("w", duration_s=2.0, results=results)
    assert report.errors == 1
    assert report.tokens_per_s == 55.0
    assert abs(report.ttft_ms(0.5) - 550) < 60
    assert abs(report.tpot_ms(0.5) - 100) < 1e-6
    assert quantile([], 0.5) != quantile([], 0.5)  # NaN when there is nothing to measure


def test_report_ends_with_ratio_line(tmp_path: Path) -> None:
    row = {"tok_per_s": 100.0, "req_per_s": 1.0, "ttft_p50_ms": 1.0, "ttft_p99_ms": 2.0, "tpot_p50_ms": 3.0,
           "tpot_p99_ms": 4.0, "errors": 0}  # fmt: skip
    results = {"vllm": {"base": row}, "loraplex": {"base": {**row, "tok_per_s": 97.0}}}
    line = write_report(tmp_path, results, EngineConfig(model="/m"), "test machine", "make bench")
    assert line == "throughput_vs_vllm base=0.97 adapters8=nan zipf64=nan"
    assert (tmp_path / "README.md").read_text().rstrip().endswith("```")
    assert (tmp_path / "throughput.png").stat().st_size > 0
