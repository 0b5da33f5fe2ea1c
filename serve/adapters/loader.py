"""Loads registered adapters into one replica's engine, lazily, once, at the version asked for.

Each adapter version gets its own engine LoRA id and a local copy keyed by content hash, so a new
version never reuses old weights or old prefix-cache blocks (vLLM keys those by name and path),
while requests already running keep the version they started with.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from serve.adapters.cache import FAILURE_TTL_S, CacheUnavailable, Hold, NodeCache, Staged
from serve.adapters.validation import AdapterInvalid
from serve.tracing import phase
from serve.wire import AdapterRecord, LoaderStats, WireError, adapter_model_id

logger = logging.getLogger(__name__)


class AdapterLoader:
    """Makes `record` usable by the engine under its public id `BASE:NAME`."""

    def __init__(self, engine: Any, models: Any, cache: NodeCache, base_id: str, pin_room: int = 0) -> None:
        self._engine = engine
        self._pin_room = pin_room
        """Engine LoRA ids this replica may pin: the entries its adapter cache holds beside the unpinned ones."""
        self._pinned: set[int] = set()
        self._models = models
        self.cache = cache
        self._holds: dict[str, Hold] = {}
        """The cache folder of each installed version, held so the node's pruner leaves it."""
        self._base_id = base_id
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._versions: dict[str, str] = {}
        self._resident: set[str] = set()
        self.stats = LoaderStats()

    def public_id(self, name: str) -> str:
        return adapter_model_id(self._base_id, name)

    async def ensure(self, record: AdapterRecord, *, ahead: bool = False) -> None:
        """Loads `record` unless this replica already serves that exact version; never one marked unusable.

        `ahead`: no request waits for it (`warm`); its weights go into the engine's memory now, and it counts as
        warmed, not as a cache miss.
        """
        if record.unusable:
            raise AdapterInvalid(f"adapter {record.name!r} cannot be served: it {record.unusable}")
        if self._versions.get(record.name) == record.content_hash:
            if not ahead:
                self.stats.hits += 1
            return
        async with self._locks[record.name]:
            if self._versions.get(record.name) == record.content_hash:
                if not ahead:
                    self.stats.hits += 1  # a concurrent first request loaded it while we waited
                return
            if ahead:
                self.stats.warmed += 1
            else:
                self.stats.misses += 1
            started = time.perf_counter()
            with phase("engine.adapter_load", adapter=record.name, version=record.version):  # for a traced request
                # A folder staged ahead (or fetched before) is taken at once, on the loop: a hop to a thread and back
                # waits for the busy loop too (a zipf64 run's cold loads took 0.37-0.44 s each, against 14 ms to copy
                # and hash one adapter on an idle machine).
                here = self.cache.acquire_here(record)
                folder, hold = here if here is not None else await asyncio.to_thread(self.cache.acquire, record)
                try:
                    await self._install(record, folder, into_engine=ahead)
                except BaseException:
                    hold.release()
                    raise
            previous_hold = self._holds.pop(record.name, None)
            self._holds[record.name] = hold
            if previous_hold is not None:
                # Requests still running on the previous version may read its folder again: the pruner leaves
                # folders used in the last `PRUNE_GRACE_S` alone.
                previous_hold.release()
            self.stats.observe_load(time.perf_counter() - started)

    async def forget(self, name: str) -> None:
        """Stops serving `name` here; the engine frees it (running requests hold their own reference)."""
        async with self._locks[name]:
            previous = self._models.lora_requests.pop(self.public_id(name), None)
            self._versions.pop(name, None)
            self._resident.discard(name)
            if (hold := self._holds.pop(name, None)) is not None:
                hold.release()
            if previous is not None:
                await self._engine.remove_lora(previous.lora_int_id)
                self._pinned.discard(previous.lora_int_id)
                self.stats.unloads += 1

    def held(self) -> list[str]:
        return sorted(self._versions)

    async def prefetch(self, record: AdapterRecord) -> None:
        """Installs `record` and has the engine read its weights into its adapter cache now (vLLM's `add_lora`,
        answered at once when it holds them), for a request that will wait for a slot."""
        await self.ensure(record, ahead=True)  # a hit or miss is counted by the request's own `ensure`
        request = self._models.lora_requests.get(self.public_id(record.name))
        if request is not None:
            await self._engine.add_lora(request)

    async def stage(self, record: AdapterRecord, budget: int) -> Staged:
        """Fetches `record` into the node's cache ahead of any request (`NodeCache.stage`), in a thread of its own,
        one adapter at a time. Not at a lower CPU priority: a thread the OS rarely runs while it holds the GIL
        stops the replica's event loop with it (measured: a replica answered nothing for a minute under load)."""
        staged = await asyncio.get_running_loop().run_in_executor(_stager(), self.cache.stage, record, budget)
        if staged == "fetched":
            self.stats.staged += 1
        return staged

    def observe_engine(self, engine_ids: set[int]) -> list[str]:
        """Names of installed adapters whose weights the engine holds (its `list_loras()`); counts evictions.

        vLLM's LRU drops adapters from memory on its own and reloads them from their folder on the
        next request, so an installed adapter that left the engine since the last look was evicted.
        """
        resident = {
            name
            for name in self._versions
            if (request := self._models.lora_requests.get(self.public_id(name))) is not None
            and request.lora_int_id in engine_ids
        }
        self.stats.evictions += len((self._resident - resident) & set(self._versions))
        self._resident = resident
        return sorted(resident)

    async def _install(self, record: AdapterRecord, folder: Path, into_engine: bool) -> None:
        from vllm.lora.request import LoRARequest

        request = LoRARequest(
            lora_name=self.public_id(record.name),
            lora_int_id=self._models.lora_id_counter.inc(1),
            lora_path=str(folder),
        )
        pin = record.pinned and len(self._pinned) < self._pin_room
        if record.pinned and not pin:
            # The registry refuses pins beyond the engine's room; this is a store written under a larger allowance.
            logger.warning("adapter %r is pinned but the engine's %d pinned entries are taken: served unpinned",
                           record.name, self._pin_room)  # fmt: skip
        if pin or into_engine:
            # Pinned: into the engine now, and kept there. Warmed: into the engine now, for the LRU to keep or drop.
            await self._engine.add_lora(request)
        if pin:
            await self._engine.pin_lora(request.lora_int_id)
            self._pinned.add(request.lora_int_id)
        # Otherwise the engine reads the weights from `folder` in the step that first needs them, as it
        # does after every eviction. Adding them here as well cost a second read whenever the engine's
        # cache was full (the add evicted an adapter a waiting request needed) and held the engine's
        # loop for each first use. What vLLM could refuse in the files was checked at registration.
        previous = self._models.lora_requests.get(request.lora_name)
        self._models.lora_requests[request.lora_name] = request
        self._versions[record.name] = record.content_hash
        if previous is not None:
            # Requests already running hold `previous` and finish on it; new ones get `request`.
            await self._engine.remove_lora(previous.lora_int_id)
            self._pinned.discard(previous.lora_int_id)


@functools.cache
def _stager() -> ThreadPoolExecutor:
    """One thread for the process's staging: never more than one copy and hash at a time beside the requests'."""
    return ThreadPoolExecutor(1, thread_name_prefix="loraplex-stage")


def install_failure(record: AdapterRecord, exc: Exception) -> WireError:
    """What a request for `record` is answered when `ensure` raised `exc`: a message naming only the adapter, the
    reason (it may name a host path, a bucket, the S3 endpoint) in `detail`, for admin keys and the logs."""
    message = f"adapter {record.name!r} is unavailable"
    if isinstance(exc, AdapterInvalid):
        logger.warning("adapter %s cannot be served: %s", record.name, exc)
        return WireError(status=422, message=message, param="model", code="adapter_unavailable", detail=str(exc))
    if isinstance(exc, CacheUnavailable):  # the node's cache logged it
        return WireError(status=503, message=f"{message} on this replica now", code="adapter_unavailable",
                         retry_after=int(FAILURE_TTL_S), detail=str(exc))  # fmt: skip
    logger.error("loading adapter %s failed", record.name, exc_info=exc)
    return WireError(status=500, message=message, code="adapter_unavailable", detail=f"{type(exc).__name__}: {exc}")
