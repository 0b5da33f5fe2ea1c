"""Scripted stand-ins for the engine and registry deployments, for fast tests of the router alone."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from serve.adapters.records import AdapterRecord, RegistryError, ReplicaReport, Snapshot
from serve.wire import Endpoint, ReplicaItem, Usage

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


@dataclass
class FakeEngine:
    """Records each request and plays `script`'s items back; an Exception item is raised."""

    script: Script = echo_script
    requests: list[tuple[Endpoint, dict[str, Any]]] = field(default_factory=list)
    adapters: list[AdapterRecord | None] = field(default_factory=list)

    def generate(
        self, endpoint: Endpoint, body: dict[str, Any], adapter: AdapterRecord | None = None
    ) -> AsyncIterator[ReplicaItem]:
        self.requests.append((endpoint, body))
        self.adapters.append(adapter)
        return self._play(self.script(endpoint, body))

    async def _play(self, items: list[ReplicaItem | Exception]) -> AsyncIterator[ReplicaItem]:
        for item in items:
            if isinstance(item, Exception):
                raise item
            yield item


def record(name: str, version: int = 1, source: str = "/adapters/x") -> AdapterRecord:
    return AdapterRecord(name=name, source=source, version=version, content_hash=f"{name}-{version}", rank=8,
                         alpha=16.0, target_modules=("q_proj",), size_bytes=1, pinned=False, created=0)  # fmt: skip


@dataclass
class FakeRegistry:
    """An in-memory registry that accepts any source not containing `bad`."""

    records: dict[str, AdapterRecord] = field(default_factory=dict)
    generation_: int = 1
    reports: list[ReplicaReport] = field(default_factory=list)

    async def replica_reports(self) -> list[ReplicaReport]:
        return self.reports

    async def generation(self) -> int:
        return self.generation_

    async def snapshot(self) -> Snapshot:
        return Snapshot(self.generation_, dict(self.records))

    async def register(self, name: str, source: str, pinned: bool) -> AdapterRecord | RegistryError:
        if "bad" in source:
            return RegistryError(400, f"{source} is not a LoRA adapter", "source")
        previous = self.records.get(name)
        self.records[name] = record(name, previous.version + 1 if previous else 1, source)
        self.generation_ += 1
        return self.records[name]

    async def unregister(self, name: str) -> AdapterRecord | RegistryError:
        if name not in self.records:
            return RegistryError(404, f"adapter {name!r} is not registered", "name")
        self.generation_ += 1
        return self.records.pop(name)
