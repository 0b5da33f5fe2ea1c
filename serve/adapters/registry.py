"""The adapter registry: the one source of truth for which adapters exist, at which version.

It runs as a single Ray Serve deployment that every router and engine replica reaches through a
handle, and persists to a JSON file, so it survives a restart of the application. Writes are
validated (fetched, checked against the base model) before anything is recorded.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import shutil
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

from serve.adapters.records import AdapterRecord, ReplicaReport, Snapshot
from serve.adapters.sources import LocalSource, S3Source, SourceResolver
from serve.adapters.validation import AdapterInvalid, AdapterMetadata, base_linear_shapes, validate_adapter
from serve.config import ADAPTER_NAME_PATTERN, AppConfig, is_adapter_name
from serve.files import atomic_write
from serve.processes import die_with_parent_if_asked
from serve.wire import WireError

logger = logging.getLogger("loraplex.registry")
REPORT_TTL_S = 30.0


def fresh_generation() -> int:
    """A registry's first generation, unlike any generation an earlier run of it (or another) handed out.

    Routers and replicas refetch when the generation they cached differs, so a registry that restarted at 1
    would, after as many writes as before, look unchanged to them (a deleted adapter served, a new one 404).
    The start is the clock in milliseconds above 20 bits of writes, plus random low bits; it stays an int.
    """
    return ((time.time_ns() // 1_000_000) << 20) + secrets.randbelow(1 << 16)


class AdapterRegistry:
    """Validates, records and persists adapters; serves snapshots to routers and replicas."""

    def __init__(
        self,
        state_file: Path,
        base_model: Path,
        resolver: SourceResolver,
        *,
        max_rank: int,
        max_bytes: int,
        initial: dict[str, str] | None = None,
    ) -> None:
        self._file = state_file
        self._resolver = resolver
        self._max_rank = max_rank
        self._max_bytes = max_bytes
        self._base_shapes = base_linear_shapes(base_model)
        self._records: dict[str, AdapterRecord] = self._load()
        self._generation = fresh_generation()
        self._lock = asyncio.Lock()
        self._reports: dict[str, tuple[float, ReplicaReport]] = {}
        for name, source in (initial or {}).items():
            # Configured adapters are checked at every start: changed weights become a new version.
            pinned = name in self._records and self._records[name].pinned
            outcome = self._validate_and_record(name, source, pinned=pinned)
            if isinstance(outcome, WireError):
                raise AdapterInvalid(f"adapter {name!r}: {outcome.message}")

    async def snapshot(self) -> Snapshot:
        return Snapshot(generation=self._generation, records=dict(self._records))

    async def generation(self) -> int:
        return self._generation

    async def report(self, report: ReplicaReport) -> int:
        """An engine replica's periodic report; returns the generation so it knows whether to sync."""
        self._reports[report.replica] = (time.monotonic(), report)
        return self._generation

    async def replica_reports(self) -> list[ReplicaReport]:
        """Reports of replicas heard from within `REPORT_TTL_S` (a replaced replica drops out)."""
        now = time.monotonic()
        self._reports = {k: v for k, v in self._reports.items() if now - v[0] <= REPORT_TTL_S}
        return [report for _, report in self._reports.values()]

    async def register(self, name: str, source: str, pinned: bool = False) -> AdapterRecord | WireError:
        """Adds `name`, or makes a new version of it when the weights changed.

        The fetch and the checks (up to `max_bytes` from S3) run outside the registry's lock: only recording
        the outcome takes it, so one large download holds up no other write, read or replica report.
        """
        checked = await asyncio.to_thread(self._fetch_and_check, name, source)
        if isinstance(checked, WireError):
            return checked
        async with self._lock:
            return self._record(name, source, pinned, checked)

    async def unregister(self, name: str) -> AdapterRecord | WireError:
        async with self._lock:
            record = self._records.get(name)
            if record is None:
                return WireError(404, f"adapter {name!r} is not registered", "name")
            failure = self._commit({key: value for key, value in self._records.items() if key != name})
            return failure or record

    def _validate_and_record(self, name: str, source: str, pinned: bool) -> AdapterRecord | WireError:
        checked = self._fetch_and_check(name, source)
        return checked if isinstance(checked, WireError) else self._record(name, source, pinned, checked)

    def _fetch_and_check(self, name: str, source: str) -> AdapterMetadata | WireError:
        if not is_adapter_name(name):
            return WireError(400, f"adapter name must match {ADAPTER_NAME_PATTERN}", "name")
        staging = Path(tempfile.mkdtemp(prefix="loraplex-adapter-"))
        try:
            self._resolver.fetch(source, staging, self._max_bytes)
            return validate_adapter(staging, self._base_shapes, max_rank=self._max_rank, max_bytes=self._max_bytes)
        except AdapterInvalid as exc:
            return WireError(400, str(exc), exc.param)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _record(self, name: str, source: str, pinned: bool, meta: AdapterMetadata) -> AdapterRecord | WireError:
        previous = self._records.get(name)
        if previous is not None and previous.content_hash == meta.content_hash and previous.source == source:
            record = replace(previous, pinned=pinned)
        else:
            record = AdapterRecord(
                name=name, source=source, version=(previous.version + 1) if previous else 1,
                content_hash=meta.content_hash, rank=meta.rank, alpha=meta.alpha,
                target_modules=meta.target_modules, size_bytes=meta.size_bytes, pinned=pinned,
                created=int(time.time()),
            )  # fmt: skip
        return self._commit({**self._records, name: record}) or record

    def _commit(self, records: dict[str, AdapterRecord]) -> WireError | None:
        """Persists `records`, then makes them current: a write that fails changes nothing, here or on disk.

        The previous state file is kept as `<file>.bak` (the last good state, should the file be damaged).
        """
        try:
            if self._file.is_file():
                atomic_write(self._backup, self._file.read_text())
            atomic_write(self._file, json.dumps({"adapters": [asdict(r) for r in records.values()]}, indent=2))
        except OSError as exc:
            logger.exception("could not save the registry state to %s", self._file)
            return WireError(500, f"the registry could not save its state ({exc.strerror or exc}); nothing changed")
        self._records = records
        self._generation += 1
        return None

    @property
    def _backup(self) -> Path:
        return self._file.with_name(self._file.name + ".bak")

    def _load(self) -> dict[str, AdapterRecord]:
        """The saved records; a damaged file is set aside (kept, named in the log) and the last good state used."""
        if not self._file.is_file():
            return {}
        try:
            return _records_of(self._file)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            aside = self._file.with_name(f"{self._file.name}.corrupt-{int(time.time())}")
            os.replace(self._file, aside)
            good = self._backup if self._backup.is_file() else None
            logger.critical(
                "registry state %s is damaged (%s): kept as %s; starting from %s",
                self._file, exc, aside, good or "an empty registry",
            )  # fmt: skip
            if good is None:
                return {}
            records = _records_of(good)
            atomic_write(self._file, good.read_text())
            return records


def _records_of(file: Path) -> dict[str, AdapterRecord]:
    data = json.loads(file.read_text())
    return {
        item["name"]: AdapterRecord(**{**item, "target_modules": tuple(item["target_modules"])})
        for item in data["adapters"]
    }


def make_resolver(config: AppConfig) -> SourceResolver:
    """Sources allowed by `config`: its local roots plus the folders of its configured adapters."""
    roots = [Path(root).resolve() for root in config.registry.local_roots]
    roots += [Path(adapter.path).resolve() for adapter in config.adapters]
    s3 = S3Source(
        endpoint_url=config.registry.s3_endpoint_url,
        region=config.registry.s3_region,
        access_key_id=config.registry.s3_access_key_id,
        secret_access_key=secret.get_secret_value() if (secret := config.registry.s3_secret_access_key) else None,
    )
    return SourceResolver(local=LocalSource(tuple(roots)), s3=s3)


class RegistryDeployment(AdapterRegistry):
    """The registry as the application builds it from an `AppConfig`."""

    def __init__(self, config: AppConfig) -> None:
        die_with_parent_if_asked()  # a registry process outliving its raylet serves no one
        super().__init__(
            Path(config.registry.state_file),
            Path(config.engine.model),
            make_resolver(config),
            max_rank=config.engine.max_lora_rank,
            max_bytes=config.registry.max_adapter_bytes,
            initial={adapter.name: adapter.path for adapter in config.adapters},
        )
