"""The node's adapter cache (serve.adapters.cache), on real folders and real file locks (issue 15)."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from serve.adapters import cache as cache_module
from serve.adapters.cache import CacheUnavailable, NodeCache
from serve.adapters.safetensors_files import content_hash
from serve.adapters.sources import LocalSource, SourceResolver
from serve.adapters.validation import AdapterInvalid
from serve.wire import AdapterRecord


def adapter_folder(root: Path, name: str, size: int) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{}")
    (folder / "adapter_model.safetensors").write_bytes(os.urandom(size))
    return folder


def record_of(folder: Path) -> AdapterRecord:
    return AdapterRecord(
        name=folder.name, source=str(folder), version=1, content_hash=content_hash(folder), rank=8, alpha=16,
        target_modules=("q_proj",), size_bytes=0, pinned=False, created=0,
    )  # fmt: skip


class CountingResolver:
    def __init__(self, inner: SourceResolver) -> None:
        self.inner = inner
        self.fetches = 0

    def fetch(self, uri: str, dest: Path, max_bytes: int | None = None) -> None:
        self.fetches += 1
        self.inner.fetch(uri, dest, max_bytes)


@pytest.fixture
def sources(tmp_path: Path) -> Path:
    return tmp_path / "sources"


def make_cache(tmp_path: Path, sources: Path, **kwargs: object) -> tuple[NodeCache, CountingResolver]:
    resolver = CountingResolver(SourceResolver(LocalSource((sources,))))
    return NodeCache(tmp_path / "cache", resolver, **kwargs), resolver  # type: ignore[arg-type]


def age(folder: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(folder, (then, then))


def test_the_cache_stays_within_its_bound_deleting_only_folders_no_replica_holds(tmp_path: Path, sources: Path) -> None:
    node, _ = make_cache(tmp_path, sources, max_bytes=2500)
    a, b, c = (record_of(adapter_folder(sources, name, 1000)) for name in "abc")
    folder_a, hold_a = node.acquire(a)
    folder_b, hold_b = node.acquire(b)
    hold_b.release()  # b is no longer installed anywhere; a still is
    age(folder_a, 3600)
    age(folder_b, 3600)
    folder_c, hold_c = node.acquire(c)  # 3,000 bytes > 2,500: the oldest unheld folder goes
    assert folder_a.is_dir(), "held: an engine may re-read it after an eviction"
    assert not folder_b.exists()
    assert folder_c.is_dir()
    assert node.stats.pruned == 1 and node.stats.bytes < 2500
    hold_a.release()
    hold_c.release()


def test_a_folder_used_lately_is_kept_even_when_unheld(tmp_path: Path, sources: Path) -> None:
    """A replaced version's requests may still be running: they read its folder again after an eviction."""
    node, _ = make_cache(tmp_path, sources, max_bytes=1500)
    a, b = (record_of(adapter_folder(sources, name, 1000)) for name in "ab")
    folder_a, hold = node.acquire(a)
    hold.release()
    _, hold = node.acquire(b)
    hold.release()
    assert folder_a.is_dir()


def test_a_hold_of_another_process_protects_the_folder(tmp_path: Path, sources: Path) -> None:
    """Replicas on one node share the cache: a folder another process installed is never deleted under it."""
    node, _ = make_cache(tmp_path, sources, max_bytes=500)
    a = record_of(adapter_folder(sources, "a", 1000))
    folder, hold = node.acquire(a)
    hold.release()
    age(folder, 3600)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1]); fcntl.flock(f, fcntl.LOCK_SH); "
         "print('held', flush=True); time.sleep(60)", str(folder / ".inuse")],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert node.prune() == 0 and folder.is_dir()
    finally:
        holder.kill()
        holder.wait()
    assert node.prune() > 0 and not folder.exists(), "a holder that died lets go of its lock"


def test_an_adapter_larger_than_the_limit_is_refused_before_it_is_copied(tmp_path: Path, sources: Path) -> None:
    node, _ = make_cache(tmp_path, sources, max_bytes=None, max_adapter_bytes=500)
    big = record_of(adapter_folder(sources, "big", 1000))
    with pytest.raises(AdapterInvalid, match="the limit is 500"):
        node.acquire(big)
    assert not any((tmp_path / "cache").iterdir()), "nothing was copied"


def test_a_failed_fetch_is_remembered_and_not_tried_again_at_once(tmp_path: Path, sources: Path) -> None:
    now = [1000.0]
    node, resolver = make_cache(tmp_path, sources, max_bytes=None, clock=lambda: now[0])
    gone = replace(record_of(adapter_folder(sources, "gone", 10)), source=str(sources / "missing"))
    for _ in range(3):
        with pytest.raises(AdapterInvalid):
            node.acquire(gone)
    assert resolver.fetches == 1
    now[0] += cache_module.FAILURE_TTL_S + 1
    with pytest.raises(AdapterInvalid):
        node.acquire(gone)
    assert resolver.fetches == 2


def test_a_full_disk_is_a_503_reason_without_paths_counted_and_remembered(
    tmp_path: Path, sources: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node, resolver = make_cache(tmp_path, sources, max_bytes=None)
    a = record_of(adapter_folder(sources, "a", 10))

    def no_space(uri: str, dest: Path, max_bytes: int | None = None) -> None:
        resolver.fetches += 1
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dest / "adapter_model.safetensors"))

    monkeypatch.setattr(resolver, "fetch", no_space)
    with pytest.raises(CacheUnavailable) as raised:
        node.acquire(a)
    assert "No space left on device" in str(raised.value)
    assert str(tmp_path) not in str(raised.value)
    assert node.stats.errors == 1 and node.stats.last_error_at is not None
    with pytest.raises(CacheUnavailable):
        node.acquire(a)
    assert resolver.fetches == 1


def test_an_s3_adapter_larger_than_the_limit_is_refused_from_its_listing(tmp_path: Path) -> None:
    """The object is never downloaded to find out (moto's S3, in process)."""
    import boto3
    from moto import mock_aws

    from serve.adapters.sources import S3Source

    with mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket="adapters")
        s3.put_object(Bucket="adapters", Key="big/adapter_model.safetensors", Body=b"x" * 1000)
        s3.put_object(Bucket="adapters", Key="big/adapter_config.json", Body=b"{}")
        dest = tmp_path / "dest"
        dest.mkdir()
        with pytest.raises(AdapterInvalid, match="is 1002 bytes; the limit is 500"):
            S3Source().fetch("s3://adapters/big", dest, max_bytes=500)
        assert list(dest.iterdir()) == []
        S3Source().fetch("s3://adapters/big", dest, max_bytes=5000)
        assert sorted(p.name for p in dest.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
