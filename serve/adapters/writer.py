"""What the registry lends the collaborators that write records for it (its composite adapters, its rollouts): a
read-only view of its records, its write lock, and its checks and writes. Nothing else of the registry is theirs."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Protocol

from serve.adapters.validation import AdapterMetadata
from serve.wire import AdapterRecord, Composition, WireError


class RecordWriter(Protocol):
    """The registry's records and writes, as its collaborators use them; every write is made under `lock`."""

    @property
    def records(self) -> Mapping[str, AdapterRecord]: ...

    @property
    def lock(self) -> asyncio.Lock: ...

    def fetch_and_check(self, name: str, source: str) -> tuple[str, AdapterMetadata] | WireError:
        """`source` pinned, and what validation found in its files (blocking: call it in a thread)."""
        ...

    def unknown_parser(self, tool_call_parser: str | None) -> WireError | None:
        """400 when the server loads no tool-call parser of that name."""
        ...

    def next_version(
        self,
        name: str,
        source: str,
        pinned: bool,
        meta: AdapterMetadata,
        composition: Composition | None = None,
        tool_call_parser: str | None = None,
    ) -> AdapterRecord:
        """The record `name` gets from these checked files: its current one updated, or a new version."""
        ...

    async def record(self, record: AdapterRecord) -> AdapterRecord | WireError:
        """Makes `record` (from `next_version`) current unless it already is; under `lock`."""
        ...

    async def write(self, name: str, previous: AdapterRecord | None, record: AdapterRecord | None) -> WireError | None:
        """Stores `record` (None: deletes `name`) and makes it current, or says why not; under `lock`."""
        ...
