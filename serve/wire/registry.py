"""How routers and engine replicas reach the adapter registry: a protocol of its operations, and its Ray Serve handle
implementation. Both sides call the registry through it, never through an untyped handle."""

from __future__ import annotations

from typing import Any, Protocol

from serve.wire import AdapterRecord, Changes, Composition, ReplicaReport, Snapshot, WireError


class RegistryClient(Protocol):
    """The registry operations routers (reads, writes) and engine replicas (`report`, `warm_plan`) use."""

    async def generation(self) -> int: ...
    async def snapshot(self) -> Snapshot: ...
    async def changes(self, since: int) -> Changes: ...
    async def register(
        self, name: str, source: str, pinned: bool, tool_call_parser: str | None = None
    ) -> AdapterRecord | WireError: ...
    async def unregister(self, name: str) -> AdapterRecord | WireError: ...
    async def compose(
        self, name: str, composition: Composition, pinned: bool, tool_call_parser: str | None = None
    ) -> AdapterRecord | WireError: ...
    async def materialize(self, composition: Composition, owner: str) -> tuple[AdapterRecord, bool] | WireError:
        """The inline composite `composition` a request of key `owner` asked for (`owner`'s build bounds apply)."""
        ...

    async def rollout(self, name: str, source: str, percent: float) -> AdapterRecord | WireError: ...
    async def split(self, name: str, percent: float) -> AdapterRecord | WireError: ...
    async def promote(self, name: str) -> AdapterRecord | WireError: ...
    async def rollback(self, name: str) -> AdapterRecord | WireError: ...
    async def replica_reports(self) -> list[ReplicaReport]: ...
    async def report(self, report: ReplicaReport) -> int:
        """An engine replica's report; answers the registry's generation (`changes` tells what it brought)."""
        ...

    async def warm_plan(self, replica: str, limit: int) -> list[AdapterRecord]:
        """What a joining engine `replica` should load before it is preferred for it, hottest first."""
        ...


class ServeRegistryClient:
    """A `RegistryClient` over the registry deployment's handle.

    Writes go on Serve's gRPC transport (as the engine client's calls): a registration's round trip costs about half
    a Ray actor call's. Reads stay Ray calls: a follower's full list is 20 MB at 100,000 adapters, and Serve's gRPC
    channels take replies of at most 4 MB (`RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH`).
    """

    def __init__(self, handle: Any) -> None:
        self._handle = handle
        self._writes = handle.options(_by_reference=False)

    async def generation(self) -> int:
        return int(await self._handle.generation.remote())

    async def snapshot(self) -> Snapshot:
        snapshot: Snapshot = await self._handle.snapshot.remote()
        return snapshot

    async def changes(self, since: int) -> Changes:
        changes: Changes = await self._handle.changes.remote(since)
        return changes

    async def register(
        self, name: str, source: str, pinned: bool, tool_call_parser: str | None = None
    ) -> AdapterRecord | WireError:
        outcome: AdapterRecord | WireError = await self._writes.register.remote(name, source, pinned, tool_call_parser)
        return outcome

    async def unregister(self, name: str) -> AdapterRecord | WireError:
        outcome: AdapterRecord | WireError = await self._writes.unregister.remote(name)
        return outcome

    async def compose(
        self, name: str, composition: Composition, pinned: bool, tool_call_parser: str | None = None
    ) -> AdapterRecord | WireError:
        outcome: AdapterRecord | WireError = await self._writes.compose.remote(
            name, composition, pinned, tool_call_parser
        )
        return outcome

    async def materialize(self, composition: Composition, owner: str) -> tuple[AdapterRecord, bool] | WireError:
        outcome: tuple[AdapterRecord, bool] | WireError = await self._writes.materialize.remote(composition, owner)
        return outcome

    async def rollout(self, name: str, source: str, percent: float) -> AdapterRecord | WireError:
        outcome: AdapterRecord | WireError = await self._writes.rollout.remote(name, source, percent)
        return outcome

    async def split(self, name: str, percent: float) -> AdapterRecord | WireError:
        outcome: AdapterRecord | WireError = await self._writes.split.remote(name, percent)
        return outcome

    async def promote(self, name: str) -> AdapterRecord | WireError:
        outcome: AdapterRecord | WireError = await self._writes.promote.remote(name)
        return outcome

    async def rollback(self, name: str) -> AdapterRecord | WireError:
        outcome: AdapterRecord | WireError = await self._writes.rollback.remote(name)
        return outcome

    async def replica_reports(self) -> list[ReplicaReport]:
        reports: list[ReplicaReport] = await self._handle.replica_reports.remote()
        return reports

    async def report(self, report: ReplicaReport) -> int:
        return int(await self._handle.report.remote(report))

    async def warm_plan(self, replica: str, limit: int) -> list[AdapterRecord]:
        plan: list[AdapterRecord] = await self._handle.warm_plan.remote(replica, limit)
        return plan
