"""How the router reaches the adapter registry: a protocol, and its Ray Serve handle implementation."""

from __future__ import annotations

from typing import Any, Protocol

from serve.wire import AdapterRecord, Changes, ReplicaReport, Snapshot, WireError


class RegistryClient(Protocol):
    """The registry operations the router uses."""

    async def generation(self) -> int: ...
    async def snapshot(self) -> Snapshot: ...
    async def changes(self, since: int) -> Changes: ...
    async def register(self, name: str, source: str, pinned: bool) -> AdapterRecord | WireError: ...
    async def unregister(self, name: str) -> AdapterRecord | WireError: ...
    async def replica_reports(self) -> list[ReplicaReport]: ...


class ServeRegistryClient:
    """A `RegistryClient` over the registry deployment's handle."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle

    async def generation(self) -> int:
        return int(await self._handle.generation.remote())

    async def snapshot(self) -> Snapshot:
        snapshot: Snapshot = await self._handle.snapshot.remote()
        return snapshot

    async def changes(self, since: int) -> Changes:
        changes: Changes = await self._handle.changes.remote(since)
        return changes

    async def register(self, name: str, source: str, pinned: bool) -> AdapterRecord | WireError:
        outcome: AdapterRecord | WireError = await self._handle.register.remote(name, source, pinned)
        return outcome

    async def unregister(self, name: str) -> AdapterRecord | WireError:
        outcome: AdapterRecord | WireError = await self._handle.unregister.remote(name)
        return outcome

    async def replica_reports(self) -> list[ReplicaReport]:
        reports: list[ReplicaReport] = await self._handle.replica_reports.remote()
        return reports
