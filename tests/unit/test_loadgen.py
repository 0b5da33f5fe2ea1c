"""The load generator's schedule and statistics, and the benchmark report."""

from __future__ import annotations

import argparse
import collections
import json
import math
from pathlib import Path

import pytest

from loadtests.loadgen import PROMPTS, Report, Result, Workload, _range, quantile
from loadtests.report import write_report
from serve.config import EngineConfig


def test_zipf_schedule_is_reproducible_and_skewed() -> None:
    workload = Workload("z", tuple(f"m{i}" for i in range(64)), popularity="zipf", num_requests=2000, seed=3)
    schedule = workload.schedule()
    assert schedule == workload.schedule()
    counts = collections.Counter(planned.model for planned in schedule)
    assert counts["m0"] > 5 * counts.get("m20", 0) > 0


def test_single_and_uniform_popularity() -> None:
    models = ("a", "b", "c", "d")
    assert {p.model for p in Workload("s", models, popularity="single").schedule()} == {"a"}
    uniform = collections.Counter(p.model for p in Workload("u", models, num_requests=4000).schedule())
    assert min(uniform.values()) > 800


def test_prompt_and_output_length_distributions() -> None:
    fixed = Workload("f", ("m",), num_requests=50, max_tokens=7).schedule()
    assert {p.max_tokens for p in fixed} == {7} and all(p.prompt in PROMPTS for p in fixed)
    varied = Workload("v", ("m",), num_requests=400, output_tokens=(4, 12), prompt_repeat=(1, 3), seed=5)
    planned = varied.schedule()
    assert planned == varied.schedule()
    assert {p.max_tokens for p in planned} == set(range(4, 13))
    repeats = {max(p.prompt.count(prompt) for prompt in PROMPTS) for p in planned}
    assert repeats == {1, 2, 3}


def test_length_ranges_parse_or_are_refused() -> None:
    assert _range("8") == (8, 8) and _range("4:16") == (4, 16)
    for bad in ("0", "9:3", "x"):
        with pytest.raises((argparse.ArgumentTypeError, ValueError)):
            _range(bad)


def test_report_statistics() -> None:
    results = [Result("m", 200, ttft=0.1 * i, latency=1.0 + 0.1 * i, completion_tokens=11) for i in range(1, 11)]
    results.append(Result("m", 503, error="overloaded"))
    report = Report("w", duration_s=2.0, results=results)
    assert report.errors == 1
    assert report.tokens_per_s == 55.0
    assert abs(report.ttft_ms(0.5) - 550) < 60
    assert abs(report.tpot_ms(0.5) - 100) < 1e-6
    assert quantile([], 0.5) != quantile([], 0.5)  # NaN when there is nothing to measure
    assert report.summary()["first_error"] == "HTTP 503: overloaded"
    assert "first_error" not in Report("w", duration_s=1.0, results=results[:3]).summary()


def test_steady_throughput_leaves_out_the_drain_after_the_last_request_is_sent() -> None:
    # Sent at 0 and 1 s, 11 tokens each from 0.5 s after sending, one every 0.1 s; a rare one at 5 s is aside.
    results = [Result("m", 200, ttft=0.5, latency=1.5, completion_tokens=11, sent=100.0 + i) for i in range(2)]
    results.append(Result("rare", 200, ttft=0.1, latency=0.2, completion_tokens=2, sent=105.0))
    report = Report("w", duration_s=2.5, results=results, started=100.0)
    # By the last send (1 s), the first request has streamed its tokens at 0.5-1.0 s (6), the second none yet.
    assert report.steady_tokens_per_s(besides=("rare",)) == 6.0
    assert report.summary(rare=("rare",))["steady_tok_per_s"] == 6.0
    assert report.steady_tokens_per_s() == 22 / 5  # counting the rare one's send, the window runs to 5 s
    alone = Report("w", duration_s=1.5, results=results[:1], started=100.0)
    assert math.isnan(alone.steady_tokens_per_s())  # everything was sent at once: no window to measure


def test_report_ends_with_ratio_line(tmp_path: Path) -> None:
    row = {"tok_per_s": 100.0, "req_per_s": 1.0, "ttft_p50_ms": 1.0, "ttft_p99_ms": 2.0, "tpot_p50_ms": 3.0,
           "tpot_p99_ms": 4.0, "errors": 0}  # fmt: skip
    results = {"vllm": {"base": row}, "loraplex": {"base": {**row, "tok_per_s": 97.0}}}
    line = write_report(tmp_path, [results], EngineConfig(model="/m"), "test machine", "make bench")
    assert line == "throughput_vs_vllm base=0.97 adapters8=nan zipf64=nan"
    assert (tmp_path / "README.md").read_text().rstrip().endswith("```")
    assert (tmp_path / "throughput.png").stat().st_size > 0


def test_report_takes_medians_over_rounds_and_shows_each(tmp_path: Path) -> None:
    def row(tok: float, errors: int = 0) -> dict[str, float | int | str]:
        return {"tok_per_s": tok, "req_per_s": tok / 64, "ttft_p50_ms": 1000 / tok, "ttft_p99_ms": 1.0,
                "tpot_p50_ms": 1.0, "tpot_p99_ms": 1.0, "errors": errors}  # fmt: skip

    rounds = [
        {"vllm": {"base": row(60.0)}, "loraplex": {"base": {**row(50.0, errors=1), "first_error": "HTTP 503: busy"}}},
        {"loraplex": {"base": row(70.0)}, "vllm": {"base": row(66.0)}},
        {"vllm": {"base": row(64.0)}, "loraplex": {"base": row(62.0)}, "rayserve-llm": {"failure": {"error": "x"}}},
    ]
    line = write_report(tmp_path, rounds, EngineConfig(model="/m"), "test machine", "make bench")
    assert line == f"throughput_vs_vllm base={62.0 / 64.0:.2f} adapters8=nan zipf64=nan"  # medians 62 and 64
    document = json.loads((tmp_path / "results.json").read_text())
    assert document["results"]["loraplex"]["base"]["errors"] == 1
    assert document["results"]["loraplex"]["base"]["rounds"] == 3
    assert len(document["rounds"]) == 3
    text = (tmp_path / "README.md").read_text()
    assert "| loraplex | base | 50.0 (0.83) | 70.0 (1.06) | 62.0 (0.97) |" in text
    assert "round 3: x" in text
    assert "- loraplex / base, round 1: `HTTP 503: busy`" in text
