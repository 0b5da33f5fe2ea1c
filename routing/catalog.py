"""The models a router serves: the base model and the registry's adapters, and how ids resolve to them."""

from __future__ import annotations

import asyncio
import bisect
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, replace
from typing import Any

from routing.errors import AdapterUnavailable, ModelNotFound, NotReady, UpstreamError
from serve.wire import (
    ADAPTER_ID_SEPARATOR,
    AdapterRecord,
    Composition,
    ReplicaReport,
    Snapshot,
    WireError,
    adapter_model_id,
    composition_key,
)
from serve.wire.registry import RegistryClient

SEPARATOR = ADAPTER_ID_SEPARATOR
logger = logging.getLogger("loraplex.router")
REGISTRY_TIMEOUT_S = 5.0
REFRESH_S = 1.0
INLINE_KEPT = 1024
"""Inline composites a router remembers by what they are made of (a forgotten one is asked of the registry again)."""
INLINE_IDLE_S = 60.0
"""An inline composite this router has not used for this long is asked of the registry again. One in use is never
collected (`registry.inline_composite_ttl_s`, at least 600 s: each request's replica reports it); an idle one may have
been, and engines would find its files gone."""
REPORTS_S = 1.0
"""Read routes share the engine replicas' reports for this long instead of asking the registry once each."""
VISIBLE_KEPT = 64
"""Scopes (verb and key) whose visible adapters a router keeps for the current listing; the least recent go."""


@dataclass(frozen=True)
class ModelTarget:
    """What a request's `model` resolved to."""

    id: str
    """Canonical id: the base model's id, or `BASE:NAME` for an adapter."""
    adapter: AdapterRecord | None
    """The adapter at its current version, or None for the base model."""


class ModelCatalog:
    """Resolves `BASE`, `BASE:NAME` and bare `NAME`; follows the registry within `REFRESH_S` seconds."""

    def __init__(self, base_id: str, registry: RegistryClient, clock: Callable[[], float] = time.monotonic) -> None:
        self.base_id = base_id
        self.registry = registry
        self._clock = clock
        self._snapshot = Snapshot(generation=0, records={})
        self._ordered: tuple[int, list[str]] = (0, [])
        """(generation, the adapters' names in order): sorted once per generation, not per list request; names only,
        as the records are in the snapshot (a second list of them cost 8 bytes per adapter)."""
        self._checked = 0.0
        self._created = int(time.time())
        self._composites: OrderedDict[str, tuple[float, AdapterRecord]] = OrderedDict()
        """Inline composites by key: when this router last used each, and its record."""
        self._reports: tuple[float, list[ReplicaReport]] | None = None
        self._reports_call: asyncio.Future[list[ReplicaReport]] | None = None
        self._listing = 0
        """Counts the sorted name lists built: a visible list computed from an older one is stale."""
        self._visible: OrderedDict[Hashable, tuple[int, list[str]]] = OrderedDict()

    def adapter_id(self, name: str) -> str:
        return adapter_model_id(self.base_id, name)

    async def refresh(self, force: bool = False) -> bool:
        """Brings the adapters up to the registry's generation by what changed since this router's (the whole
        list only when the registry cannot say: it restarted, or this router fell behind its change log); asks
        at most every `REFRESH_S` unless forced.

        False when the registry did not answer within `REGISTRY_TIMEOUT_S`: the adapters known so far keep
        being served rather than every request waiting on an unreachable registry.
        """
        now = self._clock()
        if not force and now - self._checked < REFRESH_S:
            return True
        self._checked = now
        try:
            async with asyncio.timeout(REGISTRY_TIMEOUT_S):
                changes = await self.registry.changes(self._snapshot.generation)
                if changes.generation != self._snapshot.generation:
                    self._snapshot = self._snapshot.updated(changes)
        except Exception as exc:
            logger.warning("adapter registry unreachable (%s); serving the adapters known so far", type(exc).__name__)
            return False
        return True

    def wrote(self, name: str, record: AdapterRecord | None) -> None:
        """Takes in this router's own write to the registry (`record` None: `name` removed) without a round trip for
        it: a request through this router sees it at once. The next read still asks the registry for what changed
        (this write again, and any other), so nothing older can stay."""
        self._snapshot.records.pop(name, None)
        if record is not None:
            self._snapshot.records[record.name] = record  # keyed by its own name (`serve.wire.keyed`)
        self._ordered = (-1, [])
        self._checked = -REFRESH_S

    def name_of(self, requested: str) -> str | None:
        """The adapter name a model id asks for (`BASE:NAME` or `NAME` → `NAME`), or None for the base model."""
        if requested == self.base_id:
            return None
        return requested.removeprefix(self.base_id + SEPARATOR)

    async def resolve(self, requested: str) -> ModelTarget:
        name = self.name_of(requested)
        if name is None:
            return ModelTarget(id=self.base_id, adapter=None)
        await self.refresh()
        record = self._snapshot.records.get(name)
        if record is None:
            reached = await self.refresh(force=True)  # registered a moment ago through another router replica?
            record = self._snapshot.records.get(name)
            if record is None and not reached:
                raise NotReady("the adapter registry cannot be reached; retry shortly")
        if record is None:
            raise ModelNotFound(f"The model `{requested}` does not exist.", param="model")
        if record.unusable:
            raise AdapterUnavailable(f"The model `{requested}` is unavailable", f"it {record.unusable}", status=400)
        return ModelTarget(id=self.adapter_id(name), adapter=record)

    async def composite(self, composition: Composition, owner: str) -> tuple[ModelTarget, bool]:
        """The inline composite `composition` of registered adapters that key `owner` asked for, and whether asking
        for it built it now.

        Known by the hash of what it is made of (its components' current versions included), so a new version of a
        component makes a new composite; the registry builds each once, however many routers ask at once.
        """
        await self.refresh()
        records = [self._snapshot.records.get(name) for name in composition.adapters]
        if all(record is not None for record in records):
            made_of = tuple(record.content_hash for record in records if record is not None)
            key = composition_key(replace(composition, built_from=made_of))
            now = self._clock()
            if (known := self._composites.get(key)) is not None and now - known[0] < INLINE_IDLE_S:
                self._composites[key] = (now, known[1])
                self._composites.move_to_end(key)
                return ModelTarget(id=self.adapter_id(known[1].name), adapter=known[1]), False
        outcome = await self.registry.materialize(composition, owner)
        if isinstance(outcome, WireError):
            raise UpstreamError(outcome)
        record, built = outcome
        if record.composition is not None:  # the registry's record says what it was built from
            key = composition_key(record.composition)
            self._composites[key] = (self._clock(), record)
            self._composites.move_to_end(key)
            if len(self._composites) > INLINE_KEPT:
                self._composites.popitem(last=False)
        return ModelTarget(id=self.adapter_id(record.name), adapter=record), built

    async def records(self) -> list[AdapterRecord]:
        """Every adapter, in name order."""
        await self.refresh()
        records = self._snapshot.records
        return [records[name] for name in self._sorted()]

    async def count(self) -> int:
        await self.refresh()
        return len(self._snapshot.records)

    def _sorted(self) -> list[str]:
        generation, names = self._ordered
        if generation != self._snapshot.generation:
            names = sorted(self._snapshot.records)
            self._ordered = (self._snapshot.generation, names)
            self._listing += 1
        return names

    async def replica_reports(self) -> list[ReplicaReport]:
        """The engine replicas' latest reports, asked of the registry at most every `REPORTS_S`, one call shared by
        the requests that want them meanwhile (the console, `/metrics`, an adapter's card): not one registry call per
        request. A caller that leaves does not cancel the shared call."""
        if self._reports is not None and self._clock() - self._reports[0] < REPORTS_S:
            return self._reports[1]
        if self._reports_call is None or self._reports_call.done():
            self._reports_call = asyncio.ensure_future(self._ask_reports())
        return await asyncio.shield(self._reports_call)

    async def _ask_reports(self) -> list[ReplicaReport]:
        reports = await self.registry.replica_reports()
        self._reports = (self._clock(), reports)
        return reports

    async def visible(self, scope: Hashable, shows: Callable[[str], bool]) -> list[str]:
        """The adapters' names for which `shows` holds, in order (do not modify it). Computed once per registry
        generation for each `scope` (what `shows` depends on: the verb and the key), not per request: matching a
        key's globs against 100,000 names takes about 0.1 s of the event loop that relays streams."""
        await self.refresh()
        names = self._sorted()
        known = self._visible.get(scope)
        if known is not None and known[0] == self._listing:
            self._visible.move_to_end(scope)
            return known[1]
        shown = [name for name in names if shows(name)]
        self._visible[scope] = (self._listing, shown)
        self._visible.move_to_end(scope)
        if len(self._visible) > VISIBLE_KEPT:
            self._visible.popitem(last=False)
        return shown

    async def visible_after(
        self, scope: Hashable, shows: Callable[[str], bool], name: str | None, limit: int
    ) -> tuple[list[AdapterRecord], bool]:
        """Up to `limit` records of `visible` adapters named after `name` (all for None), found by bisection, and
        whether more follow."""
        names = await self.visible(scope, shows)
        start = 0 if name is None else bisect.bisect_right(names, name)
        records = self._snapshot.records
        page = [record for n in names[start : start + limit + 1] if (record := records.get(n)) is not None]
        return page[:limit], len(page) > limit

    async def models(
        self, visible: Callable[[str | None], bool] = lambda _: True, scope: Hashable = None
    ) -> list[dict[str, Any]]:
        """OpenAI model objects: the base model first, then adapters with `parent` = base.

        Only models for which `visible(adapter name, or None for the base)` holds are listed; with a `scope` (what
        `visible` depends on), the adapters it shows are kept for the registry's generation (`visible`).
        """
        base = [self._card(self.base_id, parent=None, created=self._created)] if visible(None) else []
        if scope is None:
            records = [r for r in await self.records() if visible(r.name)]
        else:
            shown, known = await self.visible(("models", scope), visible), self._snapshot.records
            records = [record for name in shown if (record := known.get(name)) is not None]
        adapters = [r for r in records if not r.unusable]
        return base + [self._card(self.adapter_id(r.name), self.base_id, r.created) for r in adapters]

    async def model(self, requested: str) -> dict[str, Any]:
        target = await self.resolve(requested)
        if target.adapter is None:
            return self._card(target.id, parent=None, created=self._created)
        return self._card(target.id, parent=self.base_id, created=target.adapter.created)

    def _card(self, model_id: str, parent: str | None, created: int) -> dict[str, Any]:
        return {
            "id": model_id,
            "object": "model",
            "created": created,
            "owned_by": "loraplex",
            "root": self.base_id,
            "parent": parent,
        }
