"""What the registry lends the collaborators that write records for it (its composite adapters, its rollouts): a
read-only view of its records, its write lock, and its checks and writes. Nothing else of the registry is theirs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import replace
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

    async def record(self, record: AdapterRecord) -> AdapterRecord | WireError:
        """Makes `record` (from `next_record`) current unless it already is; under `lock`."""
        ...

    async def write(self, name: str, previous: AdapterRecord | None, record: AdapterRecord | None) -> WireError | None:
        """Stores `record` (None: deletes `name`) and makes it current, or says why not; under `lock`."""
        ...


def next_record(
    previous: AdapterRecord | None,
    name: str,
    source: str,
    pinned: bool,
    meta: AdapterMetadata,
    composition: Composition | None = None,
    tool_call_parser: str | None = None,
) -> AdapterRecord:
    """The record `name` (now `previous`, or None) gets from these checked files: `previous` updated when the files
    are the same, else a new version."""
    if previous is not None and previous.content_hash == meta.content_hash and previous.source == source:
        return replace(previous, pinned=pinned, unusable=None, warnings=meta.warnings, composition=composition,
                       tool_call_parser=tool_call_parser, options=meta.options)  # fmt: skip
    return AdapterRecord(
        name=name, source=source, version=(previous.version + 1) if previous else 1,
        content_hash=meta.content_hash, rank=meta.rank, alpha=meta.alpha,
        target_modules=meta.target_modules, size_bytes=meta.size_bytes, pinned=pinned,
        created=int(time.time()), warnings=meta.warnings, composition=composition,
        tool_call_parser=tool_call_parser, options=meta.options,
    )  # fmt: skip
