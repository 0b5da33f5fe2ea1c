"""Shared test configuration: integration tests are marked by their folder."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

INTEGRATION = Path(__file__).parent / "integration"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if INTEGRATION in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.integration)
    # Tests that start their own server go first, before the session-wide stack starts: the machine
    # has room for one engine deployment at a time.
    items.sort(key=lambda item: item.get_closest_marker("own_server") is None)


RAY_WORKER_PORTS_END = 20000
"""Ray gives its workers ports 10002-19999 (`max_worker_port`); a test server's port is chosen above them."""
_given: set[int] = set()


def free_port() -> int:
    """A loopback port nobody listens on, for a server a test starts: outside the kernel's ephemeral range.

    A port from bind(0) is free only until the next bind(0): Ray, started after it was chosen, binds dozens of its own
    listeners that way, and once took the port a router was about to bind (CI, 2026-12-07: `Address already in use`
    three times, ten errors). Nothing takes a port below the ephemeral range unless asked for it by number.
    """
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    candidates = [port for port in range(RAY_WORKER_PORTS_END, low) if port not in _given]
    random.shuffle(candidates)
    for port in candidates:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _given.add(port)
        return port
    raise RuntimeError(f"no free port in {RAY_WORKER_PORTS_END}-{low - 1}")


def tail(log: Path, lines: int = 60) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


S3_KEYS = {"AWS_ACCESS_KEY_ID": "loraplex-test", "AWS_SECRET_ACCESS_KEY": "loraplex-test"}


@pytest.fixture(scope="session")
def s3_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """moto's S3 server, a real S3 endpoint, on a free loopback port."""
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with log.open("wb") as sink:
        command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"{url}/moto-api/", timeout=2)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or process.poll() is not None:
                    pytest.fail(f"moto did not start:\n{tail(log)}")
                time.sleep(0.5)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
