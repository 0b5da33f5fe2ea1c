"""Stopping `loraplex serve` however it is stopped leaves nothing running: the real stack (Ray Serve, the vLLM
engine on CPU), each signal pattern a supervisor or a user produces, then every process of the server's
session counted (none may be left, engines above all: each holds gigabytes).

systemd's default stop (`KillMode=control-group`) and many supervisors signal the whole process group; a
supervisor whose grace period ends sends SIGKILL to it; a stop can come while the server is still starting;
Ray's own processes can die under the CLI. (SIGTERM to the CLI alone is how every other test stops its server.)
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from serve.demo.assets import prepare
from tests.integration.conftest import (
    ASSETS,
    assert_nothing_left_behind,
    command_line,
    free_port,
    session_processes,
    tail,
    wait_until_ready,
)

pytestmark = pytest.mark.own_server
GRACE_S = 5
STOPPED_WITHIN_S = GRACE_S + 60
"""The drain's grace, Serve's and Ray's shutdown, the sweep, on a loaded 2-core machine."""


STARTED: list[subprocess.Popen[bytes]] = []
"""The servers this module's tests started; `nothing_left_after_a_failure` ends any a failed test left running."""


@pytest.fixture(autouse=True)
def nothing_left_after_a_failure() -> Iterator[None]:
    """A test that fails before it stops its server (an assertion before the signal) must not leave the server
    running for the modules after it (which find its processes: a second engine)."""
    yield
    while STARTED:
        process = STARTED.pop()
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        for pid in session_processes(process.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def start(work: Path, grace_s: float = GRACE_S) -> tuple[subprocess.Popen[bytes], str, Path]:
    """`loraplex serve` with the demo model in a session of its own: (process, base URL, log)."""
    model, _ = prepare(ASSETS)
    config = work / "loraplex.yaml"
    config.write_text(
        json.dumps(
            {
                "engine": {"model": str(model), "max_model_len": 512},
                "engine_deployment": {"graceful_shutdown_timeout_s": grace_s},
                "router": {"graceful_shutdown_timeout_s": grace_s},
                "registry": {"state_file": str(work / "registry.json"), "cache_dir": str(work / "cache")},
            }
        )
    )
    port = free_port()
    log = work / "server.log"
    command = [str(Path(sys.executable).parent / "loraplex"), "serve", "--config", str(config), "--port", str(port)]
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    with log.open("wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    STARTED.append(process)
    return process, f"http://127.0.0.1:{port}", log


def is_gcs(pid: int) -> bool:
    """Whether `pid` is Ray's GCS (its whole command line: a checkout's path can be long)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].endswith(b"gcs_server")
    except OSError:
        return False


def engine_processes(session: int) -> list[str]:
    return [name for pid in session_processes(session) if "VLLM" in (name := command_line(pid))]


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout_s}s: {what}")
        time.sleep(0.5)


def stopped_with_nothing_left(process: subprocess.Popen[bytes], log: Path, within_s: float = STOPPED_WITHIN_S) -> None:
    try:
        process.wait(timeout=within_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        pytest.fail(f"loraplex serve still running {within_s}s after the stop:\n{tail(log)}")
    assert_nothing_left_behind(process.pid)


DRAIN_GRACE_S = 60
STREAMED_TOKENS = 60


def test_sigterm_to_the_whole_process_group_drains_like_a_single_one(tmp_path: Path) -> None:
    """What systemd does on stop (`KillMode=control-group`), and `kill -- -PGID`: the signal reaches the CLI's
    supervisor alone (the server and Ray's daemons are in a group of their own), which passes it on, and the server
    drains: a stream in flight ends whole, then everything stops."""
    process, url, log = start(tmp_path, grace_s=DRAIN_GRACE_S)
    wait_until_ready(process, url, log)
    assert engine_processes(process.pid), "the engine's processes run before the stop"
    gcs = [pid for pid in session_processes(process.pid) if is_gcs(pid)]
    assert gcs and all(os.getpgid(pid) != process.pid for pid in gcs), "Ray's GCS is outside the caller's group"
    body = {"model": "SmolLM2-135M-Instruct", "prompt": "Tell me a story.", "max_tokens": STREAMED_TOKENS,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    events: list[str] = []
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as response:
        lines = response.iter_lines()
        events += [line for line in itertools.islice(lines, 4) if line.startswith("data: ")]
        os.killpg(process.pid, signal.SIGTERM)
        events += [line for line in lines if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]", events[-3:]
    assert json.loads(events[-2][6:])["usage"]["completion_tokens"] == STREAMED_TOKENS, "the stream was cut"
    stopped_with_nothing_left(process, log, within_s=DRAIN_GRACE_S + 60)
    assert "draining" in log.read_text()


def test_sigkill_to_the_whole_process_group_leaves_no_engine(tmp_path: Path) -> None:
    """A supervisor's last resort: the CLI cannot clean up, so every process below it must die with its parent
    (the server and Ray's daemons, in a group of their own, kill that group when the CLI's supervisor dies)."""
    process, url, log = start(tmp_path)
    wait_until_ready(process, url, log)
    assert engine_processes(process.pid)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert_nothing_left_behind(process.pid)


def test_sigterm_while_the_engine_starts_stops_everything(tmp_path: Path) -> None:
    process, _, log = start(tmp_path)
    wait_for(lambda: bool(engine_processes(process.pid)), 120, "the engine's processes being spawned")
    os.killpg(process.pid, signal.SIGTERM)
    stopped_with_nothing_left(process, log)


def test_sigterm_while_ray_starts_stops_everything(tmp_path: Path) -> None:
    """A stop that lands in `ray.init` meets Ray's own SIGTERM handler: Ray's half-started processes must go too,
    and no second Ray may be started by the clean-up (Serve's and Ray's shutdown calls start one if none is
    connected)."""
    process, _, log = start(tmp_path)
    wait_for(lambda: any(is_gcs(pid) for pid in session_processes(process.pid)), 60, "Ray")
    os.killpg(process.pid, signal.SIGTERM)
    stopped_with_nothing_left(process, log)
    assert log.read_text().count("Started a local Ray instance") <= 1


def test_the_cli_stops_everything_when_rays_processes_die_under_it(tmp_path: Path) -> None:
    process, url, log = start(tmp_path)
    wait_until_ready(process, url, log)
    ray_daemons = [pid for pid in session_processes(process.pid) if is_gcs(pid)]
    assert ray_daemons, "the GCS runs"
    for pid in ray_daemons:
        os.kill(pid, signal.SIGKILL)
    stopped_with_nothing_left(process, log)
    assert "Ray's node processes died" in log.read_text()


def test_the_cli_stops_everything_when_rays_processes_die_while_it_starts(tmp_path: Path) -> None:
    """Serve's deploy call blocks for good once the GCS is gone; the CLI must notice and sweep before Ray's
    driver aborts it (60 s without its GCS)."""
    process, _, log = start(tmp_path)
    wait_for(lambda: bool(engine_processes(process.pid)), 120, "the engine's processes being spawned")
    for pid in [pid for pid in session_processes(process.pid) if is_gcs(pid)]:
        os.kill(pid, signal.SIGKILL)
    stopped_with_nothing_left(process, log)
    assert "Ray's node processes died" in log.read_text()
