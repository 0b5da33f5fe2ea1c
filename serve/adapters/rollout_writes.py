"""The registry's writes for rolling out a new version of an adapter beside its current one.

The record of an adapter being rolled out carries the new version as its `canary` and the share of requests it
gets; routers choose per request (`routing.rollout_choice`). Every change is one store write, so the split survives
a restart of the registry.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace

from serve.adapters.writer import RecordWriter
from serve.wire import AdapterRecord, WireError


class RolloutWrites:
    """Starts, splits, promotes and rolls back rollouts through the registry's `writer`; `rebuild` remakes the
    composites of an adapter whose version changed (`CompositeAdapters.rebuild_users_of`)."""

    def __init__(self, writer: RecordWriter, rebuild: Callable[[str], Awaitable[None]]) -> None:
        self._writer = writer
        self._rebuild = rebuild

    async def rollout(self, name: str, source: str, percent: float) -> AdapterRecord | WireError:
        """Starts rolling out `source` as the next version of `name`, to `percent` of its requests; the current
        version keeps the rest until `promote` or `rollback`."""
        if isinstance(refused := self._settled(name), WireError):
            return refused
        fetched = await asyncio.to_thread(self._writer.fetch_and_check, name, source)
        if isinstance(fetched, WireError):
            return fetched
        source, checked = fetched  # the source pinned: an hf:// branch is recorded as its commit
        async with self._writer.lock:
            current = self._settled(name)
            if isinstance(current, WireError):
                return current
            if checked.content_hash == current.content_hash:
                return WireError(400, f"{source} holds the same weights as v{current.version} of {name!r}", "source")
            canary = AdapterRecord(
                name=name, source=source, version=current.version + 1, content_hash=checked.content_hash,
                rank=checked.rank, alpha=checked.alpha, target_modules=checked.target_modules,
                size_bytes=checked.size_bytes, pinned=current.pinned, created=int(time.time()),
                warnings=checked.warnings, tool_call_parser=current.tool_call_parser, options=checked.options,
            )  # fmt: skip
            record = replace(current, canary=canary, canary_percent=percent)
            return await self._writer.write(name, current, record) or record

    async def split(self, name: str, percent: float) -> AdapterRecord | WireError:
        """Sends `percent` of `name`'s requests to the version being rolled out."""
        async with self._writer.lock:
            if isinstance(rolling := self._rolling(name), WireError):
                return rolling
            current, _ = rolling
            record = replace(current, canary_percent=percent)
            return await self._writer.write(name, current, record) or record

    async def promote(self, name: str) -> AdapterRecord | WireError:
        """Makes the version being rolled out `name`'s only version."""
        async with self._writer.lock:
            if isinstance(rolling := self._rolling(name), WireError):
                return rolling
            current, canary = rolling
            if (failure := await self._writer.write(name, current, canary)) is not None:
                return failure
        await self._rebuild(name)
        return canary

    async def rollback(self, name: str) -> AdapterRecord | WireError:
        """Drops the version being rolled out; `name`'s current version takes every request again."""
        async with self._writer.lock:
            if isinstance(rolling := self._rolling(name), WireError):
                return rolling
            current, _ = rolling
            record = replace(current, canary=None, canary_percent=0.0)
            return await self._writer.write(name, current, record) or record

    def _settled(self, name: str) -> AdapterRecord | WireError:
        """`name`'s record, which no rollout is under way for; or why a rollout cannot start."""
        current = self._rollable(name)
        if isinstance(current, AdapterRecord) and current.canary is not None:
            return WireError(409, f"v{current.canary.version} of {name!r} is being rolled out: promote it or roll it "
                                  "back first", "name")  # fmt: skip
        return current

    def _rolling(self, name: str) -> tuple[AdapterRecord, AdapterRecord] | WireError:
        """`name`'s record and the version being rolled out beside it; or why there is none."""
        current = self._rollable(name)
        if isinstance(current, WireError):
            return current
        if current.canary is None:
            return WireError(409, f"adapter {name!r} has no rollout in progress", "name")
        return current, current.canary

    def _rollable(self, name: str) -> AdapterRecord | WireError:
        current = self._writer.records.get(name)
        if current is None:
            return WireError(404, f"adapter {name!r} is not registered", "name")
        if current.composition is not None:
            return WireError(409, f"adapter {name!r} is a composite: it follows its components' versions", "name")
        return current
