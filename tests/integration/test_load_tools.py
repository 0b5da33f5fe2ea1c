"""The load tools against the real stack: Locust's soak users (headless) and the load generator's CLI."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx

from tests.integration.conftest import Stack


def test_locust_users_stream_completions_and_report_ttft(stack: Stack, tmp_path: Path) -> None:
    locust = Path(sys.executable).parent / "locust"
    models = f"{stack.model_id},{stack.model_id}:alpha"
    for model in models.split(","):  # warm, as before any load run: first requests compile and load adapters
        httpx.post(f"{stack.base_url}/v1/completions", json={"model": model, "prompt": "Hi", "max_tokens": 1},
                   timeout=300).raise_for_status()  # fmt: skip
    env = {**os.environ, "LORAPLEX_MODELS": models, "LORAPLEX_POPULARITY": "uniform",
           "LORAPLEX_MIN_TOKENS": "4", "LORAPLEX_MAX_TOKENS": "8"}  # fmt: skip
    command = [str(locust), "-f", "loadtests/locustfile.py", "--headless", "-u", "4", "-r", "4", "-t", "25s",
               "--host", stack.base_url, "--csv", str(tmp_path / "soak"), "--only-summary",
               "--stop-timeout", "60"]  # fmt: skip
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180, check=False)
    assert run.returncode == 0, run.stderr[-3000:]  # Locust exits 1 when any request failed
    with (tmp_path / "soak_stats.csv").open() as stats:
        rows = {(row["Type"], row["Name"]): row for row in csv.DictReader(stats)}
    for kind in ("base", "adapter"):
        assert ("POST", f"completions {kind}") in rows, (list(rows), run.stderr[-3000:])
        done = rows[("POST", f"completions {kind}")]
        assert int(done["Request Count"]) > 0 and int(done["Failure Count"]) == 0
        ttft = rows[("TTFT", f"completions {kind}")]
        assert 0 < int(ttft["Request Count"]) <= int(done["Request Count"])
        # (Locust times a streamed request to its headers, so TTFT is not compared with its response time.)
        assert float(ttft["Max Response Time"]) > 0


def test_loadgen_cli_drives_base_and_adapter_with_length_ranges(stack: Stack) -> None:
    command = [sys.executable, "-m", "loadtests.loadgen", stack.base_url, "--model", stack.model_id,
               "--model", f"{stack.model_id}:alpha", "--requests", "6", "--concurrency", "3",
               "--output-tokens", "2:6", "--prompt-repeat", "1:3"]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, check=True)
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert summary["requests"] == 6 and summary["errors"] == 0 and summary["tok_per_s"] > 0
