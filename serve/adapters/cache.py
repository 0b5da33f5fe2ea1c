"""The node's adapter cache: one folder per content hash under `registry.cache_dir`, shared by the engine
replicas of a node, bounded in size.

- **Held while installed.** vLLM re-reads an adapter's folder whenever its LRU evicted it, so a folder an
  engine has installed must not disappear. Each replica holds a shared `flock` on `<folder>/.inuse` for
  every version it has installed; the pruner deletes only folders it can lock exclusively (no replica on the
  node holds them; a replica that dies lets go of its locks with its process), and only folders unused for
  `PRUNE_GRACE_S` (a replaced version's requests still running read the old folder).
- **Bounded.** After each new copy, the least recently used unheld folders go until the cache is within
  `registry.cache_max_bytes`.
- **Sizes first.** Sources refuse an adapter larger than `registry.max_adapter_bytes` from their listing,
  before downloading it.
- **Failures remembered.** A copy that failed (missing object, too large, bad hash, full disk) answers the
  same error for `FAILURE_TTL_S` without fetching again: a huge or broken object is not downloaded on every
  request.
- **Fetched ahead.** Engine replicas fetch registered adapters before any request asks for them (`stage`), the
  newest first, while the cache is under `registry.cache_stage_bytes` and half its bound: a first request then
  finds its copy checked and waiting, and staging never makes the pruner delete anything.
- **Disk trouble is an answer, not a 500.** An `OSError` while copying (no space, read-only, quota) becomes
  `CacheUnavailable` (503, the error's reason without any path), counted in `CacheStats` and reported, so
  `/metrics` and `/health` show it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from serve.adapters.safetensors_files import content_hash
from serve.adapters.sources import SourceResolver
from serve.adapters.validation import AdapterInvalid
from serve.wire import AdapterRecord

logger = logging.getLogger("loraplex.adapters")
INUSE = ".inuse"
FAILURE_TTL_S = 30.0
PRUNE_GRACE_S = 600.0
STAGING_PREFIX = ".fetch-"
TRASH_PREFIX = ".trash-"


Staged = Literal["fetched", "here", "full"]
"""What `NodeCache.stage` did: fetched the adapter, found it here, or left it (the cache holds its budget)."""


class CacheUnavailable(Exception):
    """The node's cache cannot take an adapter now (disk full, read-only, ...): a 503, retried later."""


@dataclass
class CacheStats:
    """What the cache did, for the replica's report."""

    bytes: int = 0
    errors: int = 0
    last_error: str | None = None
    last_error_at: float | None = None
    """Wall-clock time of `last_error`."""
    pruned: int = 0


class Hold:
    """A shared lock on a cache folder: while any process holds one, the pruner leaves the folder alone."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None


class NodeCache:
    """Copies of registered adapters on this node; `acquire` gives a record's folder, held."""

    def __init__(
        self,
        root: Path,
        resolver: SourceResolver,
        *,
        max_bytes: int | None,
        max_adapter_bytes: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.root = root
        self._resolver = resolver
        self._max_bytes = max_bytes
        self._max_adapter_bytes = max_adapter_bytes
        self._clock = clock
        self._failures: dict[str, tuple[float, Exception]] = {}
        self.stats = CacheStats()

    def acquire(self, record: AdapterRecord) -> tuple[Path, Hold]:
        """The folder holding `record`'s files (fetched once, hash-checked) and a hold on it.

        Raises `AdapterInvalid` (the source's fault) or `CacheUnavailable` (this node's disk); either is
        remembered for `FAILURE_TTL_S`. Blocking: call it off the event loop.
        """
        key = record.content_hash
        remembered = self._failures.get(key)
        if remembered is not None:
            if self._clock() < remembered[0]:
                raise remembered[1]
            del self._failures[key]
        try:
            for _ in range(3):  # a folder pruned between our look and our lock is fetched again
                folder = self.root / key
                if not folder.is_dir():
                    self._fetch(record, folder)
                hold = _hold(folder)
                if hold is not None:
                    with contextlib.suppress(OSError):
                        os.utime(folder)  # most recently used
                    return folder, hold
            raise CacheUnavailable("the adapter cache kept losing this adapter's folder; retry")
        except AdapterInvalid as exc:
            self._failures[key] = (self._clock() + FAILURE_TTL_S, exc)
            raise
        except OSError as exc:
            failure = CacheUnavailable(f"this node's adapter cache cannot store adapters now: {_reason(exc)}")
            self._failed(failure)
            self._failures[key] = (self._clock() + FAILURE_TTL_S, failure)
            raise failure from None
        except CacheUnavailable as exc:
            self._failed(exc)
            raise

    def acquire_here(self, record: AdapterRecord) -> tuple[Path, Hold] | None:
        """`acquire` when `record`'s folder is here already (staged, or fetched by an earlier request): no copy, only a
        lock on a file, so callers may take it on the event loop; None when it must be fetched (call `acquire`)."""
        folder = self.root / record.content_hash
        if record.content_hash in self._failures or not folder.is_dir() or (hold := _hold(folder)) is None:
            return None
        with contextlib.suppress(OSError):
            os.utime(folder)  # most recently used
        return folder, hold

    def stage(self, record: AdapterRecord, budget: int) -> Staged:
        """Fetches `record` into the cache ahead of use unless it is here already or the cache holds `budget` bytes
        (counting `record`); errors are remembered as `acquire` remembers them. Blocking: call it off the event loop.
        """
        if self.stats.bytes == 0:
            self.prune()  # measures what earlier runs left here
        if (self.root / record.content_hash).is_dir():
            return "here"
        if self._max_bytes is not None:
            budget = min(budget, self._max_bytes // 2)
        if self.stats.bytes + record.size_bytes > budget:
            return "full"
        _, hold = self.acquire(record)
        hold.release()
        return "fetched"

    def _failed(self, exc: Exception) -> None:
        self.stats.errors += 1
        self.stats.last_error = str(exc)
        self.stats.last_error_at = time.time()
        logger.error("adapter cache: %s", exc)

    def _fetch(self, record: AdapterRecord, folder: Path) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self.root))
        try:
            self._resolver.fetch(record.source, staging, self._max_adapter_bytes)
            if content_hash(staging) != record.content_hash:
                raise AdapterInvalid(f"{record.source} changed since it was registered; register it again")
            (staging / INUSE).touch()
            try:
                staging.rename(folder)
            except OSError:
                # Another replica on this node, or another adapter with the same files, got there first.
                if not folder.is_dir():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self.prune(keep=folder)

    def prune(self, keep: Path | None = None) -> int:
        """Deletes least recently used folders no process holds until the cache fits `max_bytes`; returns the
        bytes it freed. Folders used within `PRUNE_GRACE_S` and `keep` stay."""
        entries: list[tuple[float, int, Path]] = []
        for folder in self.root.iterdir() if self.root.is_dir() else ():
            if folder.name.startswith(TRASH_PREFIX):
                shutil.rmtree(folder, ignore_errors=True)  # left by a pruner that died mid-way
                continue
            if folder.name.startswith(".") or not folder.is_dir():
                continue
            with contextlib.suppress(OSError):
                entries.append((folder.stat().st_mtime, _size(folder), folder))
        total = sum(size for _, size, _ in entries)
        self.stats.bytes = total
        if self._max_bytes is None or total <= self._max_bytes:
            return 0
        freed = 0
        now = time.time()
        for mtime, size, folder in sorted(entries, key=lambda entry: entry[0]):
            if total - freed <= self._max_bytes:
                break
            if folder == keep or now - mtime < PRUNE_GRACE_S:
                continue
            if _delete_unless_held(folder):
                freed += size
                self.stats.pruned += 1
        self.stats.bytes = total - freed
        if total - freed > self._max_bytes:
            logger.warning(
                "adapter cache holds %d bytes, over its bound of %d: the rest is in use or used recently",
                total - freed, self._max_bytes,
            )  # fmt: skip
        return freed


def _hold(folder: Path) -> Hold | None:
    """A shared lock on `folder`'s `.inuse`, or None when the folder went away meanwhile."""
    path = folder / INUSE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        # The pruner renames a folder away while it holds the lock: what we locked must still be here.
        if os.fstat(fd).st_ino != os.stat(path).st_ino:
            raise FileNotFoundError(path)
    except FileNotFoundError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return Hold(fd)


def _delete_unless_held(folder: Path) -> bool:
    try:
        fd = os.open(folder / INUSE, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # a replica on this node has it installed
        trash = folder.with_name(f"{TRASH_PREFIX}{folder.name}-{os.getpid()}-{time.monotonic_ns()}")
        try:
            folder.rename(trash)  # atomic: no one finds a half-deleted folder
        except OSError:
            return False
    finally:
        os.close(fd)
    shutil.rmtree(trash, ignore_errors=True)
    return True


def _size(folder: Path) -> int:
    return sum(file.stat().st_size for file in folder.iterdir() if file.is_file())


def _reason(exc: OSError) -> str:
    """An OSError's reason without the path it names (internal to this node)."""
    return exc.strerror or type(exc).__name__
