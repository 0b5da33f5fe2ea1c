"""Loads registered adapters into one replica's engine, lazily, once, at the version asked for.

Each adapter version gets its own engine LoRA id and a local copy keyed by content hash, so a new
version never reuses old weights or old prefix-cache blocks (vLLM keys those by name and path),
while requests already running keep the version they started with.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from serve.adapters.records import AdapterRecord, LoaderStats
from serve.adapters.sources import SourceResolver
from serve.adapters.validation import AdapterInvalid, content_hash
from serve.wire import adapter_model_id


class AdapterLoader:
    """Makes `record` usable by the engine under its public id `BASE:NAME`."""

    def __init__(self, engine: Any, models: Any, resolver: SourceResolver, cache_dir: Path, base_id: str) -> None:
        self._engine = engine
        self._models = models
        self._resolver = resolver
        self._cache_dir = cache_dir
        self._base_id = base_id
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._versions: dict[str, str] = {}
        self._resident: set[str] = set()
        self.stats = LoaderStats()

    def public_id(self, name: str) -> str:
        return adapter_model_id(self._base_id, name)

    async def ensure(self, record: AdapterRecord) -> None:
        """Loads `record` unless this replica already serves that exact version."""
        if self._versions.get(record.name) == record.content_hash:
            self.stats.hits += 1
            return
        async with self._locks[record.name]:
            if self._versions.get(record.name) == record.content_hash:
                self.stats.hits += 1  # a concurrent first request loaded it while we waited
                return
            self.stats.misses += 1
            started = time.perf_counter()
            folder = await asyncio.to_thread(self._local_copy, record)
            await self._install(record, folder)
            self.stats.observe_load(time.perf_counter() - started)

    async def forget(self, name: str) -> None:
        """Stops serving `name` here; the engine frees it (running requests hold their own reference)."""
        async with self._locks[name]:
            previous = self._models.lora_requests.pop(self.public_id(name), None)
            self._versions.pop(name, None)
            self._resident.discard(name)
            if previous is not None:
                await self._engine.remove_lora(previous.lora_int_id)
                self.stats.unloads += 1

    def held(self) -> list[str]:
        return sorted(self._versions)

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

    def _local_copy(self, record: AdapterRecord) -> Path:
        """The adapter's files on this node, fetched once and checked against the registered hash."""
        folder = self._cache_dir / record.content_hash
        if folder.is_dir():
            return folder
        self._cache_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".fetch-", dir=self._cache_dir))
        try:
            self._resolver.fetch(record.source, staging)
            if content_hash(staging) != record.content_hash:
                raise AdapterInvalid(f"{record.source} changed since it was registered; register it again")
            try:
                staging.rename(folder)
            except OSError:
                # Another replica on this node, or another adapter with the same files, got there first.
                if not folder.is_dir():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return folder

    async def _install(self, record: AdapterRecord, folder: Path) -> None:
        from vllm.lora.request import LoRARequest

        request = LoRARequest(
            lora_name=self.public_id(record.name),
            lora_int_id=self._models.lora_id_counter.inc(1),
            lora_path=str(folder),
        )
        if record.pinned:
            # Pinned: into the engine now, and kept there.
            await self._engine.add_lora(request)
            await self._engine.pin_lora(request.lora_int_id)
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
