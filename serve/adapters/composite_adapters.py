"""The registry's composite adapters: composites registered by name, which follow their components' versions, and
composites asked for inline by one request, built once however many ask at once.

PEFT builds them and the composite store keeps the files (`serve.adapters.peft_compose`); this decides what to build
from which versions, bounds the builds, and records the result through the registry's writer.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from serve.adapters.builds import BuildBudget, BuildLimits
from serve.adapters.composite_collection import InlineCollection, Sweep, inline_name
from serve.adapters.peft_compose import Composer, CompositeStore, check_arguments, composite_rank
from serve.adapters.safetensors_files import content_hash
from serve.adapters.sources import UNREACHABLE, SourceResolver, SourceUnreachable
from serve.adapters.validation import DORA_OPTION, LORA_BIAS_OPTION, AdapterInvalid, AdapterMetadata, validate_adapter
from serve.adapters.writer import RecordWriter, next_record
from serve.wire import (
    ADAPTER_NAME_PATTERN,
    AdapterRecord,
    Composition,
    WireError,
    canonical,
    composition_key,
    is_adapter_name,
)

logger = logging.getLogger("loraplex.registry")
INLINE_KEPT = 4096
"""Inline composites the registry remembers (their files stay in the composite store; one forgotten is re-read)."""


UNCOMBINED = {
    LORA_BIAS_OPTION: "has a bias on LoRA's B (lora_bias), which PEFT does not combine",
    DORA_OPTION: "is a DoRA adapter (use_dora): PEFT's add_weighted_adapter does not combine its magnitudes",
}
"""Options a component may not carry, and why: PEFT's add_weighted_adapter combines LoRA's A and B only."""


class CompositeAdapters:
    """Builds and records composites for the registry, through its `writer`; knows which composites use which
    adapter (`users_of`), so a component's new version rebuilds them; with a `collection`, deletes the inline
    composites no one used for its TTL from the composite store (`collect`)."""

    def __init__(
        self,
        writer: RecordWriter,
        *,
        resolver: SourceResolver,
        max_rank: int,
        max_bytes: int,
        base_shapes: dict[str, list[int]],
        base_model: Path,
        store: CompositeStore | None,
        composer: Composer,
        limits: BuildLimits,
        collection: InlineCollection | None = None,
    ) -> None:
        self._writer = writer
        self._resolver = resolver
        self._max_rank = max_rank
        self._max_bytes = max_bytes
        self._base_shapes = base_shapes
        self._base_model = base_model
        self._store = store
        self._composer = composer
        self._build_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loraplex-compose")
        """One thread: PEFT builds one composite at a time (`Composer`), here rather than in the default pool."""
        self._budget = BuildBudget(limits)
        self.builds = 0
        """Composites PEFT built in this process (the others were found in the composite store)."""
        self._inline: dict[str, AdapterRecord] = {}
        self._building: dict[str, asyncio.Future[tuple[AdapterRecord, bool] | WireError]] = {}
        self._busy: Counter[str] = Counter()
        """Keys of the composites being built (inline or registered): no collection deletes them meanwhile."""
        self._collection = collection
        self._collecting: asyncio.Task[None] | None = None
        self._users: dict[str, set[str]] = {}
        """The registered composites each adapter is a component of."""

    async def compose(
        self, name: str, composition: Composition, pinned: bool = False, tool_call_parser: str | None = None
    ) -> AdapterRecord | WireError:
        """Registers `name` as the composite `composition` (built now with PEFT, unless the same composite of the
        same component versions was built before), or makes a new version of it. It follows its components: a new
        version of one rebuilds it (`register`)."""
        if not is_adapter_name(name):
            return WireError(400, f"adapter name must match {ADAPTER_NAME_PATTERN}", "name")
        if (refused := self._writer.unknown_parser(tool_call_parser)) is not None:
            return refused
        if name in composition.adapters:
            return WireError(400, "a composite cannot be one of its own components", "compose.adapters")
        if users := self.users_of(name):
            return WireError(409, f"adapter {name!r} is a component of {', '.join(users)}; it cannot be a composite")
        if (current := self._writer.records.get(name)) is not None and current.canary is not None:
            return WireError(409, f"v{current.canary.version} of {name!r} is being rolled out: promote it or roll it "
                                  "back first", "name")  # fmt: skip
        built = await self._build(composition)
        if isinstance(built, WireError):
            return built
        source, meta, resolved, _ = built
        async with self._writer.lock:
            return await self._writer.record(
                next_record(self._writer.records.get(name), name, source, pinned, meta, resolved, tool_call_parser)
            )

    async def materialize(self, composition: Composition, owner: str) -> tuple[AdapterRecord, bool] | WireError:
        """The composite a request of key `owner` asked for inline (not registered), and whether this call built it
        with PEFT.

        Built once per canonical (method, components' versions, weights, density, seed): concurrent requests for the
        same one wait for one build; later ones get the record remembered, or re-read from the composite store. A new
        one counts against `owner`'s and everyone's bounds (`serve.adapters.builds`): past them, 429 or 503 at once.
        """
        try:
            resolved = self._resolve(composition)
        except AdapterInvalid as exc:
            return WireError(400, str(exc), exc.param)
        key = composition_key(resolved)
        if (known := self._inline.get(key)) is not None:
            self.used((known.name,))
            return known, False
        if (pending := self._building.get(key)) is not None:
            outcome = await asyncio.shield(pending)
            return outcome if isinstance(outcome, WireError) else (outcome[0], False)
        if (refused := self._budget.take(owner)) is not None:
            return refused
        future: asyncio.Future[tuple[AdapterRecord, bool] | WireError] = asyncio.get_running_loop().create_future()
        self._building[key] = future
        try:
            built = await self._build(resolved)
            if isinstance(built, WireError):
                result: tuple[AdapterRecord, bool] | WireError = built
            else:
                source, meta, _, did_build = built
                record = AdapterRecord(
                    name=inline_name(key), source=source, version=1, content_hash=meta.content_hash,
                    rank=meta.rank, alpha=meta.alpha, target_modules=meta.target_modules, size_bytes=meta.size_bytes,
                    pinned=False, created=int(time.time()), warnings=meta.warnings, composition=resolved,
                    options=meta.options,
                )  # fmt: skip
                if len(self._inline) >= INLINE_KEPT:
                    self._inline.pop(next(iter(self._inline)))
                self._inline[key] = record
                result = (record, did_build)
            future.set_result(result)
            return result
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: no "never retrieved" warning when no one else waited
            raise
        finally:
            del self._building[key]
            self._budget.give_back(owner)

    def users_of(self, name: str) -> list[str]:
        """The registered composites that have `name` as a component."""
        return sorted(self._users.get(name, ()))

    def index(self, previous: AdapterRecord | None, record: AdapterRecord | None) -> None:
        """Follows a write that replaced `previous` by `record` (either None): which composites use which adapter."""
        for old, new in ((previous, False), (record, True)):
            if old is None or old.composition is None:
                continue
            for component in old.composition.adapters:
                users = self._users.setdefault(component, set())
                if new:
                    users.add(old.name)
                else:
                    users.discard(old.name)

    def _resolve(self, composition: Composition) -> Composition:
        """`composition`, canonical, with its components' current versions, or `AdapterInvalid` naming the field at
        fault."""
        composition = canonical(composition)
        check_arguments(composition)
        hashes = []
        for i, component in enumerate(composition.adapters):
            record = self._writer.records.get(component)
            if record is None:
                raise AdapterInvalid(f"component {component!r} is not registered", f"compose.adapters.{i}.name")
            if record.unusable:
                raise AdapterInvalid(f"component {component!r} cannot be served: it {record.unusable}",
                                     f"compose.adapters.{i}.name")  # fmt: skip
            if record.composition is not None:
                raise AdapterInvalid(f"component {component!r} is itself a composite; compose plain adapters",
                                     f"compose.adapters.{i}.name")  # fmt: skip
            for option in record.options:
                if (why := UNCOMBINED.get(option)) is not None:
                    raise AdapterInvalid(f"component {component!r} {why}", f"compose.adapters.{i}.name")
            hashes.append(record.content_hash)
        ranks = {c: self._writer.records[c].rank for c in composition.adapters}
        composite_rank(composition.method, ranks, self._max_rank)
        return replace(composition, built_from=tuple(hashes))

    async def _build(self, composition: Composition) -> tuple[str, AdapterMetadata, Composition, bool] | WireError:
        """(source, metadata, the composition with its components' versions, whether PEFT ran) of a composite."""
        if self._store is None:
            return WireError(400, "this registry has no composite store configured", "compose")
        try:
            resolved = self._resolve(composition)
        except AdapterInvalid as exc:
            return WireError(400, str(exc), exc.param)
        sources = [self._writer.records[c].source for c in resolved.adapters]
        loop = asyncio.get_running_loop()
        key = composition_key(resolved)
        self._busy[key] += 1
        try:  # in the build pool: registrations' downloads (the default pool) never queue behind builds
            return await loop.run_in_executor(self._build_pool, self._build_files, self._store, resolved, sources)
        except SourceUnreachable as exc:
            return WireError(400, f"a component could not be read: {exc}", "compose.adapters", code=UNREACHABLE)
        except AdapterInvalid as exc:
            return WireError(400, str(exc), exc.param if exc.param.startswith("compose") else "compose.adapters")
        finally:  # used now: a registered composite's record is written after this, under the lock
            self.used((inline_name(key),))
            self._busy[key] -= 1
            if self._busy[key] <= 0:
                del self._busy[key]

    def _build_files(
        self, store: CompositeStore, resolved: Composition, sources: list[str]
    ) -> tuple[str, AdapterMetadata, Composition, bool]:
        key = composition_key(resolved)
        staging = Path(tempfile.mkdtemp(prefix="loraplex-compose-"))
        try:
            built = not store.has(key)
            if built:
                folders = []
                for i, (source, expected) in enumerate(zip(sources, resolved.built_from, strict=True)):
                    folder = staging / f"c{i}"
                    self._resolver.fetch(source, folder, self._max_bytes)
                    if content_hash(folder) != expected:
                        raise AdapterInvalid(f"{source} changed since it was registered; register it again",
                                             f"compose.adapters.{i}.name")  # fmt: skip
                    folders.append(folder)
                self._composer.build(resolved, folders, staging / "out")
                store.publish(staging / "out", key)
                self.builds += 1
            source = store.url(key)
            check = staging / "check"
            self._resolver.fetch(source, check, self._max_bytes)  # as a node's cache will read it
            meta = validate_adapter(check, self._base_shapes, max_rank=self._max_rank, max_bytes=self._max_bytes,
                                    base_model=self._base_model)  # fmt: skip
            return source, meta, resolved, built
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def used(self, names: Iterable[str]) -> None:
        """The adapters `names` (an engine replica's report, a router's request) were used now: the inline composites
        among them count as used (`InlineCollection`)."""
        if self._collection is not None:
            self._collection.used_names(names)

    def start_collecting(self) -> None:
        """Starts the periodic `collect` (`InlineCollection.period_s`), once; without a collection, nothing."""
        if self._collection is not None and self._collecting is None:
            self._collecting = asyncio.create_task(self._collect_every(self._collection.period_s))

    async def collect(self) -> list[str]:
        """Deletes from the composite store the inline composites no one used for the collection's TTL, never one a
        registered record names (any version it keeps) or one being built; returns their keys.

        The listing runs in a thread; the deletions run in the build pool (one thread), queued before the registry
        hears of any later request: a build asked for after this pass decided runs after the deletion and builds the
        composite again, and one already under way is never collected."""
        if self._store is None or self._collection is None:
            return []
        store = self._store
        stored = await asyncio.to_thread(store.stored)
        sources = {v.source for r in self._writer.records.values() for v in (r, r.canary) if v is not None}
        held = {key for key in stored if store.url(key) in sources} | set(self._busy)
        sweep = self._collection.sweep(stored, held)
        for key in sweep.forgotten:
            self._inline.pop(key, None)
        removed = await asyncio.get_running_loop().run_in_executor(self._build_pool, _apply, store, sweep)
        if removed:
            logger.info("collected %d inline composites unused for %.0f s from %s", len(removed),
                        self._collection.ttl_s, store.root)  # fmt: skip
        return removed

    async def _collect_every(self, period_s: float) -> None:
        while True:
            await asyncio.sleep(period_s)
            try:
                await self.collect()
            except Exception:  # a store that failed once must not end the collection
                logger.exception("could not collect inline composites from %s", self._store)

    async def rebuild_users_of(self, name: str) -> None:
        """Builds again the composites that have `name` as a component, after it changed; one that cannot be built
        is marked unusable with the reason (never served with a component version it was not made of)."""
        for user in self.users_of(name):
            record = self._writer.records[user]
            if record.composition is None:
                continue
            outcome = await self.compose(user, replace(record.composition, built_from=()), record.pinned,
                                         record.tool_call_parser)  # fmt: skip
            if isinstance(outcome, WireError):
                logger.error("composite %r could not be rebuilt after %r changed: %s", user, name, outcome.message)
                async with self._writer.lock:
                    current = self._writer.records.get(user)
                    if current is not None:
                        reason = f"could not be rebuilt after its component {name!r} changed: {outcome.message}"
                        await self._writer.write(user, current, replace(current, unusable=reason))


def _apply(store: CompositeStore, sweep: Sweep) -> list[str]:
    """Deletes `sweep`'s forgotten composites and moves its touched ones' timestamps; the keys deleted. One the store
    refuses is logged and left for the next pass, not allowed to stop the others."""
    removed = []
    for key in sweep.forgotten:
        try:
            store.remove(key)
            removed.append(key)
        except Exception:
            logger.exception("could not delete the unused inline composite %s", store.url(key))
    for key, at in sweep.touched:
        try:
            store.touch(key, at)
        except Exception:
            logger.warning("could not record the last use of composite %s", store.url(key), exc_info=True)
    return removed
