"""The registry at 100,000 adapters, on both stores: how long a restart takes to read them back, and what a router
or replica following it receives per change.

SQLite in a file here; S3 on moto's S3 server on loopback (a real S3 endpoint, in its own process). Records are
written through each store's own `put` (one transaction / one conditional PUT each), 16 at a time for S3. Measured:
the writes, a restart's `load` (S3: the first without a snapshot, which then writes one, and the next from it), and,
through an `AdapterRegistry` on the loaded store, what `changes(since)` returns to a follower one write behind
against one that needs everything. Usage: `python -m loadtests.registry_bench [--adapters N] [--out docs/benchmarks]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from loadtests.bench import machine
from serve.adapters.registry import AdapterRegistry
from serve.adapters.sources import LocalSource, S3Source, SourceResolver
from serve.adapters.store import BaseIdentity, RegistryStore, S3Store, SqliteStore
from serve.demo.assets import DEFAULT_MODEL_NAME, build_default_model
from serve.wire import AdapterRecord

KEYS = {"access_key_id": "testing", "secret_access_key": "testing"}


def record(i: int) -> AdapterRecord:
    name = f"tenant-{i:06d}"
    return AdapterRecord(name=name, source=f"s3://adapters/{name}", version=1, content_hash=f"{i:064x}", rank=8,
                         alpha=16.0, target_modules=("q_proj", "v_proj"), size_bytes=1_200_000, pinned=False,
                         created=1_700_000_000)  # fmt: skip


def moto_server() -> tuple[str, subprocess.Popen[bytes]]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            httpx.get(f"{url}/moto-api/", timeout=2)
            return url, process
        except httpx.TransportError:
            time.sleep(0.5)
    raise RuntimeError("moto did not start")


def timed(action: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = action()
    return result, round(time.perf_counter() - start, 2)


def measure(name: str, open_store: Callable[[], RegistryStore], n: int, base: Path, parallel: int) -> dict[str, Any]:
    records = [record(i) for i in range(n)]
    writer = open_store()
    writer.set_base(BaseIdentity.of(base.name, base))
    _, wrote_s = timed(lambda: list(ThreadPoolExecutor(parallel).map(lambda r: writer.put(r, None), records)))
    row: dict[str, Any] = {"store": name, "adapters": n, "write_s": wrote_s, "writes_per_s": round(n / wrote_s)}
    first = open_store()
    state, row["restart_load_s"] = timed(first.load)
    assert len(state.records) == n
    if isinstance(first, S3Store):
        row["restart_fetched"] = first.stats["fetched"]
        second = open_store()
        state, row["restart_from_snapshot_s"] = timed(second.load)
        row["snapshot_fetched"] = second.stats["fetched"]
        assert len(state.records) == n
    resolver = SourceResolver(local=LocalSource(()))
    registry, row["registry_start_s"] = timed(
        lambda: AdapterRegistry(open_store(), base, resolver, max_rank=64, max_bytes=10**9, base_id=base.name)
    )
    current = asyncio.run(registry.generation())
    asyncio.run(registry.unregister(records[0].name))
    behind, _ = timed(lambda: asyncio.run(registry.changes(current)))
    full, row["changes_full_s"] = timed(lambda: asyncio.run(registry.changes(0)))
    row["change_bytes_one_behind"] = len(pickle.dumps(behind))
    row["change_bytes_full"] = len(pickle.dumps(full))
    print("registry", json.dumps(row), flush=True)
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--adapters", type=int, default=100_000)
    parser.add_argument("--s3-adapters", type=int, default=None, help="for the S3 store (default: --adapters)")
    parser.add_argument("--stores", nargs="+", default=["sqlite", "s3"], choices=["sqlite", "s3"])
    parser.add_argument("--assets", type=Path, default=Path(".loraplex"))
    parser.add_argument("--out", type=Path, default=None, help="write registry-100k.json here")
    args = parser.parse_args(argv)
    base = build_default_model(args.assets / "models" / DEFAULT_MODEL_NAME)
    rows = []
    with tempfile.TemporaryDirectory(prefix="loraplex-registry-") as tmp:
        if "sqlite" in args.stores:
            rows.append(measure("sqlite", lambda: SqliteStore(Path(tmp) / "registry.db"), args.adapters, base, 1))
        if "s3" in args.stores:
            url, process = moto_server()
            try:
                connection = S3Source(endpoint_url=url, **KEYS)
                connection.client().create_bucket(Bucket="registry")
                opener = lambda: S3Store(bucket="registry", prefix="base", connection=connection)  # noqa: E731
                rows.append(measure("s3", opener, args.s3_adapters or args.adapters, base, 16))
            finally:
                os.killpg(process.pid, signal.SIGTERM)
    if args.out is not None:
        command = "python -m loadtests.registry_bench " + " ".join(argv or sys.argv[1:])
        result = {"machine": machine(), "command": command, "rows": rows}
        (args.out / "registry-100k.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
