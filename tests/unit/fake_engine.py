"""Scripted stand-ins for the engine and registry deployments, for fast tests of the router alone."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from types import SimpleNamespace
from typing import Any

from routing.engine_client import ServeEngineClient
from serve.wire import (
    INLINE_COMPOSITE_PREFIX,
    AdapterRecord,
    Changes,
    Composition,
    Endpoint,
    ReplicaItem,
    ReplicaReport,
    Snapshot,
    Usage,
    WireError,
    composition_key,
)

Script = Callable[[Endpoint, dict[str, Any]], list[ReplicaItem | Exception]]


def echo_script(endpoint: Endpoint, body: dict[str, Any]) -> list[ReplicaItem | Exception]:
    """Answers like vLLM would, echoing the model id the router sent."""
    if not body.get("stream"):
        return [{"object": "chat.completion" if endpoint == "chat" else "text_completion",
                 "model": body["model"], "choices": [{"index": 0, "text": "hi"}],
                 "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}]  # fmt: skip
    events: list[ReplicaItem | Exception] = [
        f"data: {json.dumps({'model': body['model'], 'choices': [{'index': 0, 'text': word}]})}\n\n"
        for word in ("a", "b")
    ]
    return [*events, "data: [DONE]\n\n", Usage(prompt_tokens=3, completion_tokens=2)]


class FakeCall:
    """A streaming Serve call: plays `items` (an Exception item is raised), then waits for ever if `endless`."""

    def __init__(self, items: list[ReplicaItem | Exception], endless: bool = False) -> None:
        self.items = list(items)
        self.endless = endless
        self.cancelled_by_router = False

    def __aiter__(self) -> FakeCall:
        return self

    async def __anext__(self) -> ReplicaItem:
        if self.items:
            item = self.items.pop(0)
            if isinstance(item, Exception):
                raise item
            return item
        if self.endless:
            await asyncio.Event().wait()  # generating for ever
        raise StopAsyncIteration

    def cancel(self) -> None:
        self.cancelled_by_router = True


class StreamCall:
    """A streaming Serve call over `items`, which records whether the router cancelled it."""

    def __init__(self, items: AsyncIterator[ReplicaItem]) -> None:
        self._items = items
        self.cancelled_by_router = False

    def __aiter__(self) -> StreamCall:
        return self

    async def __anext__(self) -> ReplicaItem:
        return await anext(self._items)

    def cancel(self) -> None:
        self.cancelled_by_router = True


class FakeHandle:
    """The shape of the engine deployment's `DeploymentHandle`: `options(...).generate.remote(...)` calls `_call`."""

    def options(self, **_: Any) -> FakeHandle:
        return self

    @property
    def generate(self) -> SimpleNamespace:
        return SimpleNamespace(remote=self._call)

    @property
    def ready(self) -> SimpleNamespace:
        return SimpleNamespace(remote=self._ready)

    async def _ready(self) -> bool:
        return True

    def _call(
        self, endpoint: Endpoint, body: dict[str, Any], *, adapter: AdapterRecord | None = None, reply_to: Any = None
    ) -> Any:
        raise NotImplementedError


@dataclass
class FakeEngine(FakeHandle):
    """Stands for the engine deployment's handle: records each request and plays `script`'s items back."""

    script: Script = echo_script
    endless: bool = False
    requests: list[tuple[Endpoint, dict[str, Any]]] = field(default_factory=list)
    adapters: list[AdapterRecord | None] = field(default_factory=list)
    calls: list[FakeCall] = field(default_factory=list)

    def _call(
        self, endpoint: Endpoint, body: dict[str, Any], *, adapter: AdapterRecord | None = None, reply_to: Any = None
    ) -> FakeCall:
        self.requests.append((endpoint, body))
        self.adapters.append(adapter)
        self.calls.append(FakeCall(self.script(endpoint, body), self.endless))
        return self.calls[-1]


def engine_client(engine: FakeEngine | None = None) -> ServeEngineClient:
    """The router's real engine client over a fake engine deployment."""
    return ServeEngineClient(engine or FakeEngine())


def record(name: str, version: int = 1, source: str = "/adapters/x") -> AdapterRecord:
    return AdapterRecord(name=name, source=source, version=version, content_hash=f"{name}-{version}", rank=8,
                         alpha=16.0, target_modules=("q_proj",), size_bytes=1, pinned=False, created=0)  # fmt: skip


@dataclass
class FakeRegistry:
    """An in-memory registry that accepts any source not containing `bad`."""

    records: dict[str, AdapterRecord] = field(default_factory=dict)
    generation_: int = 1
    reports: list[ReplicaReport] = field(default_factory=list)
    materialized: list[Composition] = field(default_factory=list)
    """Every inline composite asked of it, in order."""

    async def replica_reports(self) -> list[ReplicaReport]:
        return self.reports

    async def generation(self) -> int:
        return self.generation_

    async def snapshot(self) -> Snapshot:
        return Snapshot(self.generation_, dict(self.records))

    async def changes(self, since: int) -> Changes:
        """Every record whenever anything changed (a registry that keeps no change log answers so too)."""
        if since == self.generation_:
            return Changes(since, {})
        return Changes(self.generation_, dict(self.records), full=True)

    async def register(
        self, name: str, source: str, pinned: bool, tool_call_parser: str | None = None
    ) -> AdapterRecord | WireError:
        if "bad" in source:
            return WireError(400, f"{source} is not a LoRA adapter", "source")
        previous = self.records.get(name)
        self.records[name] = record(name, previous.version + 1 if previous else 1, source)
        self.generation_ += 1
        return self.records[name]

    async def unregister(self, name: str) -> AdapterRecord | WireError:
        if name not in self.records:
            return WireError(404, f"adapter {name!r} is not registered", "name")
        self.generation_ += 1
        return self.records.pop(name)

    # Registered composites and rollouts need adapter files: tests of them use the real registry (test_compose,
    # test_rollout).
    async def compose(
        self, name: str, composition: Composition, pinned: bool, tool_call_parser: str | None = None
    ) -> AdapterRecord | WireError:
        return WireError(400, "the fake registry builds no composites", "compose")

    async def materialize(self, composition: Composition, owner: str) -> tuple[AdapterRecord, bool] | WireError:
        """A stand-in composite (no files), recorded in `materialized`; a new one counts as built."""
        if any(name not in self.records for name in composition.adapters):
            return WireError(400, "a component is not registered", "compose.adapters")
        built = composition not in self.materialized
        self.materialized.append(composition)
        resolved = replace(composition, built_from=tuple(self.records[n].content_hash for n in composition.adapters))
        made = record(INLINE_COMPOSITE_PREFIX + composition_key(resolved)[:24])
        return replace(made, composition=resolved), built

    async def rollout(self, name: str, source: str, percent: float) -> AdapterRecord | WireError:
        return WireError(409, "the fake registry rolls nothing out", "name")

    async def split(self, name: str, percent: float) -> AdapterRecord | WireError:
        return WireError(409, "the fake registry rolls nothing out", "name")

    async def promote(self, name: str) -> AdapterRecord | WireError:
        return WireError(409, "the fake registry rolls nothing out", "name")

    async def rollback(self, name: str) -> AdapterRecord | WireError:
        return WireError(409, "the fake registry rolls nothing out", "name")
