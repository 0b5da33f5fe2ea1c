"""The adapter registry: the one source of truth for which adapters exist, at which version.

It runs as a single Ray Serve deployment that every router and engine replica reaches through a
handle, and keeps its records in a `RegistryStore` (SQLite by default, S3 for clusters), so they survive
a restart of the application or of the registry's node. Writes are validated (fetched, checked against the
base model) before anything is recorded.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import shutil
import tempfile
import time
from collections import Counter, deque
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from serve.adapters.builds import BuildLimits
from serve.adapters.composite_adapters import CompositeAdapters
from serve.adapters.composite_collection import InlineCollection
from serve.adapters.peft_compose import Composer, CompositeStore
from serve.adapters.resolver import make_resolver, s3_connection
from serve.adapters.rollout_writes import RolloutWrites
from serve.adapters.safetensors_files import base_linear_shapes
from serve.adapters.sources import UNREACHABLE, SourceResolver, SourceUnreachable
from serve.adapters.store import (
    BaseIdentity,
    RegistryStore,
    StoreConflict,
    StoreUnavailable,
    open_store,
)
from serve.adapters.validation import AdapterInvalid, AdapterMetadata, validate_adapter
from serve.adapters.writer import next_record
from serve.config import ADAPTER_NAME_PATTERN, AppConfig, is_adapter_name
from serve.processes import die_with_parent_if_asked
from serve.wire import (
    AdapterRecord,
    Changes,
    Composition,
    ReplicaReport,
    Snapshot,
    WireError,
)
from serve.wire.placement import rendezvous_order

logger = logging.getLogger("loraplex.registry")
REPORT_TTL_S = 30.0
HOT_WINDOW_S = 300.0
"""How far back the requests replicas report count when a joining replica asks what to warm (`warm_plan`)."""
LIVE_S = 10.0
"""A replica reported within this long counts as live for `warm_plan` (replicas report every 2 s; one that was
replaced must not keep its adapters' homes from its successor)."""
RESYNC_S = 30.0
"""How often the registry re-reads its whole store for writes it did not make (`resync`)."""
CHANGE_LOG = 100_000
"""Changes the registry remembers, so followers catch up by what changed since their generation (`changes`)."""


@dataclass(frozen=True)
class _Stored:
    """How the store took a write: done; refused as a conflict (`reread`: with `current`, what it holds now); or
    `failure`."""

    conflict: bool = False
    current: AdapterRecord | None = None
    reread: bool = False
    failure: StoreUnavailable | None = None


def fresh_generation() -> int:
    """A registry's first generation, unlike any generation an earlier run of it (or another) handed out.

    Routers and replicas refetch when the generation they cached differs, so a registry that restarted at 1
    would, after as many writes as before, look unchanged to them (a deleted adapter served, a new one 404).
    The start is the clock in milliseconds above 20 bits of writes, plus random low bits; it stays an int.
    """
    return ((time.time_ns() // 1_000_000) << 20) + secrets.randbelow(1 << 16)


class AdapterRegistry:
    """Validates and records adapters in its store; serves snapshots to routers and replicas. Composites and rollouts
    are its collaborators' (`CompositeAdapters`, `RolloutWrites`), which write through its `RecordWriter`."""

    def __init__(
        self,
        store: RegistryStore,
        base_model: Path,
        resolver: SourceResolver,
        *,
        max_rank: int,
        max_bytes: int,
        base_id: str | None = None,
        initial: dict[str, str] | None = None,
        composites: CompositeStore | None = None,
        max_pinned: int | None = None,
        tool_parsers: tuple[str, ...] = (),
        build_limits: BuildLimits | None = None,
        composer: Composer | None = None,
        inline_collection: InlineCollection | None = None,
    ) -> None:
        self._store = store
        self._tool_parsers = tool_parsers
        """The tool-call parsers the engines load, that an adapter may name (`EngineConfig.tool_parsers`)."""
        self._max_pinned = max_pinned
        """Engine entries pinned adapters may take (`engine.max_pinned_loras`); None: no bound."""
        self._resolver = resolver
        self._max_rank = max_rank
        self._max_bytes = max_bytes
        self._base_shapes = base_linear_shapes(base_model)
        self._base_model = base_model
        self._base = BaseIdentity.of(base_id or base_model.name, base_model)
        state = store.load()
        self._records: dict[str, AdapterRecord] = state.records
        self._lock = asyncio.Lock()
        writer = _Writer(self)
        self._composites = CompositeAdapters(
            writer, resolver=resolver, max_rank=max_rank, max_bytes=max_bytes, base_shapes=self._base_shapes,
            base_model=base_model, store=composites, composer=composer or Composer(base_model),
            limits=build_limits or BuildLimits(), collection=inline_collection,
        )  # fmt: skip
        self._rollouts = RolloutWrites(writer, self._composites.rebuild_users_of)
        for record in self._records.values():
            self._composites.index(None, record)
        self._generation = fresh_generation()
        self._log: list[str] = []
        """The name each write since `_log_floor` changed, in order: entry i made generation `_log_floor + 1 + i`."""
        self._log_floor = self._generation
        """The oldest generation `changes` answers from the log; older ones (another run's too) get every record."""
        self._resyncing: asyncio.Task[None] | None = None
        self._reports: dict[str, tuple[float, ReplicaReport]] = {}
        self._heat: deque[tuple[float, dict[str, int]]] = deque()
        """(when, requests per adapter) of each report within `HOT_WINDOW_S`, oldest first."""
        if state.base != self._base:
            self._recheck_for_this_base(state.base)
        for name, source in (initial or {}).items():
            # Configured adapters are checked at every start: changed weights become a new version.
            known = self._records.get(name)
            pinned, parser = (known.pinned, known.tool_call_parser) if known is not None else (False, None)
            outcome = self._validate_and_record(name, source, pinned, parser)
            if isinstance(outcome, WireError):
                raise AdapterInvalid(f"adapter {name!r}: {outcome.message}")

    @property
    def builds(self) -> int:
        """Composites PEFT built in this process (the others were found in the composite store)."""
        return self._composites.builds

    async def compose(
        self, name: str, composition: Composition, pinned: bool = False, tool_call_parser: str | None = None
    ) -> AdapterRecord | WireError:
        """Registers `name` as a composite, or a new version of it (`CompositeAdapters.compose`)."""
        return await self._composites.compose(name, composition, pinned, tool_call_parser)

    async def materialize(self, composition: Composition, owner: str) -> tuple[AdapterRecord, bool] | WireError:
        """The inline composite a request of key `owner` asked for (`CompositeAdapters.materialize`)."""
        return await self._composites.materialize(composition, owner)

    async def collect(self) -> list[str]:
        """Deletes the inline composites no one used for a while (`CompositeAdapters.collect`); their keys."""
        return await self._composites.collect()

    async def rollout(self, name: str, source: str, percent: float) -> AdapterRecord | WireError:
        return await self._rollouts.rollout(name, source, percent)

    async def split(self, name: str, percent: float) -> AdapterRecord | WireError:
        return await self._rollouts.split(name, percent)

    async def promote(self, name: str) -> AdapterRecord | WireError:
        return await self._rollouts.promote(name)

    async def rollback(self, name: str) -> AdapterRecord | WireError:
        return await self._rollouts.rollback(name)

    async def snapshot(self) -> Snapshot:
        return Snapshot(generation=self._generation, records=dict(self._records))

    async def generation(self) -> int:
        return self._generation

    async def changes(self, since: int) -> Changes:
        """What changed after generation `since`: the records written since (None: removed), or every record when
        `since` is not a generation of this run's log (routers and replicas follow by this, not by snapshots)."""
        if since == self._generation:
            return Changes(since, {})
        if not self._log_floor <= since < self._generation:
            return Changes(self._generation, dict(self._records), full=True)
        names = set(self._log[since - self._log_floor :])
        return Changes(self._generation, {name: self._records.get(name) for name in names})

    async def resync(self) -> int:
        """Takes what the store holds as the truth for every record that differs from memory: the writes another
        registry on the same store made (two registry replicas in a split brain, an operator's restore), which
        its own routers and replicas then follow like any change. Under the write lock, so none of this registry's
        own writes is overtaken by an older listing. Returns how many records changed."""
        async with self._lock:
            return len(await self._reread())

    async def _reread(self) -> list[str]:
        """`resync`'s part under the lock (the caller holds it): the store loaded in a thread, and every record that
        differs taken from it; the names taken, in order (none when the store cannot be read)."""
        try:
            state = await asyncio.to_thread(self._store.load)
        except StoreUnavailable as exc:
            logger.warning("could not re-read the registry store %s: %s", self._store, exc)
            return []
        changed = sorted(n for n in set(self._records) | set(state.records)
                         if self._records.get(n) != state.records.get(n))  # fmt: skip
        for name in changed:
            self._replace(name, state.records.get(name))
        if changed:
            logger.warning("the registry store held %d records this registry did not write: %s", len(changed),
                           ", ".join(changed[:10]))  # fmt: skip
        return changed

    async def report(self, report: ReplicaReport) -> int:
        """An engine replica's periodic report; returns the generation so it knows whether to sync. The first one
        starts the store's periodic re-read (`RESYNC_S`; the replicas' reports come every 2 s while any serves) and
        the collection of unused inline composites, which the reports' requests count as used."""
        if self._resyncing is None:
            self._resyncing = asyncio.create_task(self._resync_every(RESYNC_S))
            self._composites.start_collecting()
        now = time.monotonic()
        self._reports[report.replica] = (now, report)
        if report.requests:
            self._heat.append((now, report.requests))
            self._composites.used(report.requests)
        while self._heat and self._heat[0][0] < now - HOT_WINDOW_S:
            self._heat.popleft()
        return self._generation

    async def warm_plan(self, replica: str, limit: int) -> list[AdapterRecord]:
        """What a joining `replica` should load before it is preferred for it, hottest first, at most `limit`.

        The adapters requested in the last `HOT_WINDOW_S` whose rendezvous home (`routing.policy`) among the live
        replicas, `replica` included, it now is; for an adapter whose traffic has spread over k replicas, whether
        it is among its first k homes. Routers send an adapter's requests to replicas that hold it first, so a
        replica is preferred for these once it has loaded them.
        """
        now = time.monotonic()
        others = [r for seen, r in self._reports.values() if now - seen <= LIVE_S and r.replica != replica]
        live = tuple(sorted({r.replica for r in others} | {replica}))
        heat: Counter[str] = Counter()
        for seen, counts in self._heat:
            if seen >= now - HOT_WINDOW_S:
                heat.update(counts)
        holders = Counter(name for r in others for name in r.adapters)
        plan: list[AdapterRecord] = []
        for name, _ in heat.most_common():
            if len(plan) >= limit:
                break
            record = self._records.get(name)
            if record is None or record.unusable:
                continue
            if replica in rendezvous_order(name, live)[: max(1, holders[name])]:
                plan.append(record)
        return plan

    async def replica_reports(self) -> list[ReplicaReport]:
        """Reports of replicas heard from within `REPORT_TTL_S` (a replaced replica drops out)."""
        now = time.monotonic()
        self._reports = {k: v for k, v in self._reports.items() if now - v[0] <= REPORT_TTL_S}
        return [report for _, report in self._reports.values()]

    async def register(
        self, name: str, source: str, pinned: bool = False, tool_call_parser: str | None = None
    ) -> AdapterRecord | WireError:
        """Adds `name`, or makes a new version of it when the weights changed.

        The fetch and the checks (up to `max_bytes` from S3) run outside the registry's lock: only recording
        the outcome takes it, so one large download holds up no other write, read or replica report.
        """
        if (refused := self._unknown_parser(tool_call_parser)) is not None:
            return refused
        checked = await asyncio.to_thread(self._fetch_and_check, name, source)
        if isinstance(checked, WireError):
            return checked
        source, meta = checked  # the source pinned: an hf:// branch is recorded as its commit
        async with self._lock:
            previous = self._records.get(name)
            if previous is not None and previous.composition is not None:
                return WireError(409, f"adapter {name!r} is a composite; compose it again or delete it first", "name")
            if previous is not None and previous.canary is not None:
                return WireError(409, f"v{previous.canary.version} of {name!r} is being rolled out: promote it or "
                                      "roll it back first", "name")  # fmt: skip
            outcome = await self._record(
                next_record(previous, name, source, pinned, meta, tool_call_parser=tool_call_parser)
            )
        if isinstance(outcome, AdapterRecord) and (previous is None or previous.content_hash != outcome.content_hash):
            await self._composites.rebuild_users_of(name)
        return outcome

    async def unregister(self, name: str) -> AdapterRecord | WireError:
        async with self._lock:
            record = self._records.get(name)
            if record is None:
                return WireError(404, f"adapter {name!r} is not registered", "name")
            if users := self._composites.users_of(name):
                message = f"adapter {name!r} is a component of {', '.join(users)}: delete or recompose those first"
                return WireError(409, message, "name")
            return await self._write(name, record, None) or record

    def _validate_and_record(
        self, name: str, source: str, pinned: bool, tool_call_parser: str | None = None
    ) -> AdapterRecord | WireError:
        """At start-up (no event loop serves yet): checks and records a configured adapter."""
        checked = self._fetch_and_check(name, source)
        if isinstance(checked, WireError):
            return checked
        previous = self._records.get(name)
        record = next_record(previous, name, checked[0], pinned, checked[1], tool_call_parser=tool_call_parser)
        if record == previous:
            return record
        return self._write_at_start(name, previous, record) or record

    def _unknown_parser(self, tool_call_parser: str | None) -> WireError | None:
        if tool_call_parser is None or tool_call_parser in self._tool_parsers:
            return None
        loaded = ", ".join(self._tool_parsers) or "none"
        return WireError(400, f"tool_call_parser {tool_call_parser!r} is not loaded by this server (loaded: {loaded}; "
                              "engine.tool_call_parser and engine.tool_call_parsers)", "tool_call_parser")  # fmt: skip

    def _fetch_and_check(self, name: str, source: str) -> tuple[str, AdapterMetadata] | WireError:
        """`source` pinned to the files it names now (`SourceResolver.pin`), and what the checks found in them: the
        record names the pinned source, so every node fetches the very files checked here."""
        if not is_adapter_name(name):
            return WireError(400, f"adapter name must match {ADAPTER_NAME_PATTERN}", "name")
        staging = Path(tempfile.mkdtemp(prefix="loraplex-adapter-"))
        try:
            exact = self._resolver.pin(source)
            self._resolver.fetch(exact, staging, self._max_bytes)
            meta = validate_adapter(staging, self._base_shapes, max_rank=self._max_rank, max_bytes=self._max_bytes,
                                    base_model=self._base_model)  # fmt: skip
            return exact, meta
        except SourceUnreachable as exc:
            return WireError(400, str(exc), exc.param, code=UNREACHABLE)
        except AdapterInvalid as exc:
            return WireError(400, str(exc), exc.param)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    async def _record(self, record: AdapterRecord) -> AdapterRecord | WireError:
        """Makes `record` (from `next_record`) current unless it already is; under the registry's lock."""
        previous = self._records.get(record.name)
        if record == previous:
            return record
        return await self._write(record.name, previous, record) or record

    async def _write(self, name: str, previous: AdapterRecord | None, record: AdapterRecord | None) -> WireError | None:
        """Stores `record` (None: deletes `name`), then makes it current: a write that fails changes nothing,
        here or in the store. A record another registry changed meanwhile is re-read, and the write refused.
        Under the registry's lock; the store's I/O runs in a thread, so a slow store (S3) holds up other writes,
        never the reads, reports and health checks the event loop answers meanwhile. A write that pins more engine
        entries first re-reads the store (`_reread`): another registry's pins count too, not only this one's."""
        if self._max_pinned is not None and _pinned_entries(record) > _pinned_entries(previous):
            await self._reread()
        if (refused := self._pin_refused(name, record)) is not None:
            return refused
        return self._commit(name, previous, record, await asyncio.to_thread(self._store_write, name, previous, record))

    def _write_at_start(
        self, name: str, previous: AdapterRecord | None, record: AdapterRecord | None
    ) -> WireError | None:
        """`_write` before the registry serves (its constructor, which just loaded the store): the store's I/O in this
        thread."""
        if (refused := self._pin_refused(name, record)) is not None:
            return refused
        return self._commit(name, previous, record, self._store_write(name, previous, record))

    def _store_write(self, name: str, previous: AdapterRecord | None, record: AdapterRecord | None) -> _Stored:
        """The store's part of a write (blocking I/O): done, refused as a conflict (with the record the store holds
        now), or failed."""
        try:
            if record is None:
                assert previous is not None
                self._store.delete(name, previous)
            else:
                self._store.put(record, previous)
            return _Stored()
        except StoreConflict:
            try:
                return _Stored(conflict=True, current=self._store.get(name), reread=True)
            except StoreUnavailable:
                return _Stored(conflict=True)
        except StoreUnavailable as exc:
            return _Stored(failure=exc)

    def _commit(
        self, name: str, previous: AdapterRecord | None, record: AdapterRecord | None, stored: _Stored
    ) -> WireError | None:
        """The registry's part of a write, on its loop: the record made current once the store took it."""
        if stored.conflict:
            if stored.reread:
                self._replace(name, stored.current)
            return WireError(409, f"adapter {name!r} was changed by another registry meanwhile; retry", "name")
        if stored.failure is not None:
            logger.error("could not save adapter %r in %s: %s", name, self._store, stored.failure)
            return WireError(500, f"the registry could not save its state ({stored.failure}); nothing changed")
        self._composites.index(previous, record)
        if record is None:
            self._records.pop(name, None)
        else:
            self._records.pop(name, None)  # keyed by the record's own name (`serve.wire.keyed`)
            self._records[record.name] = record  # in place: snapshots are copies, and a write copies nothing (100,000s)
        self._changed(name)
        return None

    def _pin_refused(self, name: str, record: AdapterRecord | None) -> WireError | None:
        """409 when `record`, as `name`'s record, would pin more engine entries than `max_pinned` allows (each pinned
        version takes one in every replica's adapter cache: one more would evict adapters a full step needs). Counted
        from the records held now, which a pinning `_write` has just re-read from the store."""
        added = _pinned_entries(record) - _pinned_entries(self._records.get(name))
        if self._max_pinned is None or added <= 0:
            return None
        taken = sum(_pinned_entries(r) for r in self._records.values())
        if taken + added <= self._max_pinned:
            return None
        message = (f"{taken} of the {self._max_pinned} pinned adapter versions the engine holds "
                   "(engine.max_pinned_loras) are taken: unpin one, or raise the setting")  # fmt: skip
        return WireError(409, message, "pinned")

    def _changed(self, name: str) -> None:
        self._generation += 1
        self._log.append(name)
        if len(self._log) > 2 * CHANGE_LOG:  # trimmed now and then, not at every write
            self._log_floor += len(self._log) - CHANGE_LOG
            del self._log[:-CHANGE_LOG]

    async def _resync_every(self, period_s: float) -> None:
        while True:
            await asyncio.sleep(period_s)
            try:
                await self.resync()
            except Exception:  # a bad listing must not end the re-reads
                logger.exception("re-reading the registry store failed")

    def _replace(self, name: str, current: AdapterRecord | None) -> None:
        """Takes `current` (None: none) as `name`'s record: what the store holds, re-read after a conflict."""
        self._composites.index(self._records.pop(name, None), current)
        if current is not None:
            self._records[current.name] = current
        self._changed(name)

    def _recheck_for_this_base(self, stored: BaseIdentity | None) -> None:
        """Records validated against another base model are checked again against this one: those that no longer
        fit are kept, marked unusable with the reason (never handed to an engine); those that fit again are usable.
        A record whose source cannot be read now is marked unusable too, and the base is recorded as unchecked, so
        the next start checks every record again: an outage must not leave adapters unusable for good."""
        if self._records:
            logger.warning(
                "the registry's records were validated against %s; checking all %d against %s",
                stored.model_id if stored else "an unrecorded base model", len(self._records), self._base.model_id,
            )  # fmt: skip
        unchecked = 0
        for name, record in sorted(self._records.items()):
            checked = self._fetch_and_check(name, record.source)
            reason = None
            if isinstance(checked, WireError) and checked.code == UNREACHABLE:
                unchecked += 1
                reason = f"could not be checked against base model {self._base.model_id}: {checked.message}"
            elif isinstance(checked, WireError):
                reason = f"does not fit base model {self._base.model_id}: {checked.message}"
            elif checked[1].content_hash != record.content_hash:
                reason = "its source changed since it was registered; register it again"
            if reason != record.unusable:
                failure = self._write_at_start(name, record, replace(record, unusable=reason))
                if failure is not None:
                    raise StoreUnavailable(failure.message)
        if unchecked:
            logger.error("%d adapters could not be checked against %s; checking again at the next start",
                         unchecked, self._base.model_id)  # fmt: skip
        # A digest no base has: whichever base starts next checks every record again.
        self._store.set_base(replace(self._base, digest="unchecked") if unchecked else self._base)


class _Writer:
    """The registry's `RecordWriter`: what its collaborators may use of it, kept off its Ray-callable methods."""

    def __init__(self, registry: AdapterRegistry) -> None:
        self._registry = registry

    @property
    def records(self) -> Mapping[str, AdapterRecord]:
        return self._registry._records

    @property
    def lock(self) -> asyncio.Lock:
        return self._registry._lock

    def fetch_and_check(self, name: str, source: str) -> tuple[str, AdapterMetadata] | WireError:
        return self._registry._fetch_and_check(name, source)

    def unknown_parser(self, tool_call_parser: str | None) -> WireError | None:
        return self._registry._unknown_parser(tool_call_parser)

    async def record(self, record: AdapterRecord) -> AdapterRecord | WireError:
        return await self._registry._record(record)

    async def write(self, name: str, previous: AdapterRecord | None, record: AdapterRecord | None) -> WireError | None:
        return await self._registry._write(name, previous, record)


def _pinned_entries(record: AdapterRecord | None) -> int:
    """Engine adapter-cache entries `record` pins: its version, and the one being rolled out."""
    if record is None or not record.pinned:
        return 0
    return 2 if record.canary is not None else 1


class RegistryDeployment(AdapterRegistry):
    """The registry as the application builds it from an `AppConfig`."""

    def __init__(self, config: AppConfig) -> None:
        die_with_parent_if_asked()  # a registry process outliving its raylet serves no one
        super().__init__(
            open_store(config.registry.store_url, s3_connection(config)),
            Path(config.engine.model),
            make_resolver(config),
            max_rank=config.engine.max_lora_rank,
            max_bytes=config.registry.max_adapter_bytes,
            base_id=config.engine.model_id,
            initial={adapter.name: adapter.path for adapter in config.adapters},
            composites=CompositeStore(config.registry.composites_url, s3_connection(config)),
            max_pinned=config.engine.max_pinned_loras,
            tool_parsers=config.engine.tool_parsers(),
            build_limits=BuildLimits(
                pending=config.registry.max_pending_builds,
                pending_per_key=config.registry.max_pending_builds_per_key,
                per_key_per_minute=config.registry.builds_per_key_per_minute,
            ),
            inline_collection=InlineCollection(ttl) if (ttl := config.registry.inline_composite_ttl_s) else None,
        )
