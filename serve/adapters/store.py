"""Where the registry keeps its records: one small interface, two stores.

- `SqliteStore` (`sqlite:///path`, the default): one database file, WAL, every write a transaction.
- `S3Store` (`s3://bucket/prefix`): one object per adapter in the bucket users keep adapters in, so a registry
  replica restarted on any node finds the same records with no shared disk. Writes are conditional
  (`If-None-Match: *` to create, `If-Match: <etag>` to replace or delete): two registry replicas in a split
  brain cannot overwrite each other's writes, the second gets a conflict.

Both keep the identity of the base model the records were validated against (`BaseIdentity`), so a server
started with another base re-checks them (see `AdapterRegistry`).

Every write names the record the writer believes is current (`expected`, None for "absent"); a store whose
record differs raises `StoreConflict` and changes nothing. Any other failure raises `StoreUnavailable`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

from serve.adapters.safetensors_files import base_linear_shapes
from serve.adapters.sources import S3Source
from serve.wire import AdapterRecord, Composition, keyed

logger = logging.getLogger("loraplex.registry")


class StoreConflict(Exception):
    """The stored record is not the one the writer expected: another registry wrote it meanwhile."""


class StoreUnavailable(Exception):
    """The store could not be read or written (disk full, bucket unreachable, access denied)."""


@dataclass(frozen=True)
class BaseIdentity:
    """The base model records were validated against: its public id and a digest of its config and weight shapes."""

    model_id: str
    digest: str

    @classmethod
    def of(cls, model_id: str, model_dir: Path) -> BaseIdentity:
        digest = hashlib.sha256()
        config = model_dir / "config.json"
        digest.update(config.read_bytes() if config.is_file() else b"")
        digest.update(json.dumps(base_linear_shapes(model_dir), sort_keys=True).encode())
        return cls(model_id=model_id, digest=digest.hexdigest())


@dataclass(frozen=True)
class StoredState:
    records: dict[str, AdapterRecord]
    base: BaseIdentity | None


class RegistryStore(Protocol):
    def load(self) -> StoredState: ...

    def get(self, name: str) -> AdapterRecord | None: ...

    def put(self, record: AdapterRecord, expected: AdapterRecord | None) -> None: ...

    def delete(self, name: str, expected: AdapterRecord) -> None: ...

    def set_base(self, base: BaseIdentity) -> None: ...


def encode(record: AdapterRecord) -> str:
    return json.dumps(asdict(record), sort_keys=True)


def decode(text: str | bytes) -> AdapterRecord:
    return record_of(json.loads(text))


def record_of(item: dict[str, Any]) -> AdapterRecord:
    """The record a decoded JSON object (`asdict` of one) holds."""
    composition = item.get("composition")
    if composition is not None:
        composition = Composition(**{
            **composition, **{key: tuple(composition[key]) for key in ("adapters", "weights", "built_from")}
        })  # fmt: skip
    return AdapterRecord(**{
        **item,
        "target_modules": tuple(item["target_modules"]),
        "warnings": tuple(item.get("warnings", ())),
        "options": tuple(item.get("options", ())),
        "composition": composition,
        "canary": None if item.get("canary") is None else record_of(item["canary"]),
    })  # fmt: skip


class SqliteStore:
    """Records in one SQLite database (WAL, full sync: a committed write survives a crash or power loss)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()  # one connection, used from the registry's loop and its start-up
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                self._db = self._open()
            except sqlite3.DatabaseError as exc:  # damaged outside loraplex (a bad copy, a failing disk)
                self._db = self._restore(exc)
            self._back_up()
        except (OSError, sqlite3.Error) as exc:
            raise StoreUnavailable(f"cannot open the registry database: {exc}") from None

    def __repr__(self) -> str:
        return f"SqliteStore({self.path})"

    @property
    def backup(self) -> Path:
        """A copy of the database as it was at the last start that found it sound."""
        return self.path.with_name(self.path.name + ".bak")

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=10)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            if (verdict := db.execute("PRAGMA quick_check").fetchone()[0]) != "ok":
                raise sqlite3.DatabaseError(verdict)
            db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            db.execute("CREATE TABLE IF NOT EXISTS adapters (name TEXT PRIMARY KEY, record TEXT NOT NULL)")
        except BaseException:
            db.close()
            raise
        return db

    def _restore(self, damage: sqlite3.DatabaseError) -> sqlite3.Connection:
        """Sets the damaged database aside (kept, named in the log) and starts from the last good copy."""
        aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
        os.replace(self.path, aside)
        for suffix in ("-wal", "-shm"):
            self.path.with_name(self.path.name + suffix).unlink(missing_ok=True)
        if self.backup.is_file():
            shutil.copyfile(self.backup, self.path)
        logger.critical(
            "registry database %s is damaged (%s): kept as %s; starting from %s",
            self.path, damage, aside, self.backup if self.backup.is_file() else "an empty registry",
        )  # fmt: skip
        return self._open()

    def _back_up(self) -> None:
        """Copies the sound database to `backup` (SQLite's online backup into a temporary file, then a rename)."""
        partial = self.backup.with_name(self.backup.name + ".partial")
        target = sqlite3.connect(partial)
        try:
            self._db.backup(target)
        finally:
            target.close()
        os.replace(partial, self.backup)

    def load(self) -> StoredState:
        with self._lock, self._errors():
            records = keyed(decode(text) for (text,) in self._db.execute("SELECT record FROM adapters"))
            row = self._db.execute("SELECT value FROM meta WHERE key = 'base'").fetchone()
        return StoredState(records=records, base=BaseIdentity(**json.loads(row[0])) if row else None)

    def get(self, name: str) -> AdapterRecord | None:
        with self._lock, self._errors():
            row = self._db.execute("SELECT record FROM adapters WHERE name = ?", (name,)).fetchone()
        return decode(row[0]) if row else None

    def put(self, record: AdapterRecord, expected: AdapterRecord | None) -> None:
        with self._transaction(record.name, expected):
            self._db.execute("INSERT OR REPLACE INTO adapters VALUES (?, ?)", (record.name, encode(record)))

    def delete(self, name: str, expected: AdapterRecord) -> None:
        with self._transaction(name, expected):
            self._db.execute("DELETE FROM adapters WHERE name = ?", (name,))

    def set_base(self, base: BaseIdentity) -> None:
        with self._lock, self._errors():
            self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('base', ?)", (json.dumps(asdict(base)),))

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _transaction(self, name: str, expected: AdapterRecord | None) -> Iterator[None]:
        """`BEGIN IMMEDIATE` (the write lock), the expected-record check, the caller's write, `COMMIT`; any
        failure rolls back and changes nothing."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                row = self._db.execute("SELECT record FROM adapters WHERE name = ?", (name,)).fetchone()
                if (decode(row[0]) if row else None) != expected:
                    raise StoreConflict(f"adapter {name!r} changed in the registry store meanwhile")
                yield
                self._db.execute("COMMIT")
            except BaseException as exc:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                if isinstance(exc, (sqlite3.Error, OSError)):
                    raise StoreUnavailable(f"the registry database failed: {exc}") from None
                raise

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except (sqlite3.Error, OSError) as exc:
            raise StoreUnavailable(f"the registry database failed: {exc}") from None


SNAPSHOT_STALE = 100
"""Objects an S3 store's load may fetch one by one before it writes a fresh snapshot."""


STORE_CONNECT_TIMEOUT_S, STORE_READ_TIMEOUT_S, STORE_ATTEMPTS = 3, 10, 2
"""The S3 store's bounds on one request: a connection, a wait for the next bytes, attempts in all."""


@dataclass
class S3Store:
    """One object per adapter under `s3://bucket/prefix/adapters/NAME.json`, the base identity in `base.json`.

    The ETag of every record this store read or wrote is kept; writes are conditional on it, so a record
    another writer changed since is never overwritten.

    `snapshot.json` beside them lets a restart read 100,000 records without 100,000 GETs: every record with the
    ETag it had. `load` lists the adapter objects (their ETags come with the listing, 1,000 per call) and GETs only
    those whose ETag the snapshot does not have; it is only ever a cache of the objects, which stay the truth
    (a stale or half-written snapshot costs GETs, never a wrong record), and is rewritten after a load that had
    to fetch more than `SNAPSHOT_STALE` objects.
    """

    bucket: str
    prefix: str
    connection: S3Source = field(default_factory=S3Source)
    _etags: dict[str, str] = field(default_factory=dict, init=False, repr=False)
    _client: Any = field(default=None, init=False, repr=False)
    stats: dict[str, int] = field(default_factory=dict, init=False, repr=False)
    """What the last `load` did: objects listed, taken from the snapshot, fetched one by one."""

    @property
    def client(self) -> Any:
        if self._client is None:
            from botocore.config import Config

            # botocore's defaults (60 s a read, 5 attempts) would hold a write for minutes on an endpoint that does
            # not answer; a write that fails changes nothing and is retried by its caller.
            timeouts = Config(connect_timeout=STORE_CONNECT_TIMEOUT_S, read_timeout=STORE_READ_TIMEOUT_S,
                              retries={"total_max_attempts": STORE_ATTEMPTS, "mode": "standard"})  # fmt: skip
            self._client = self.connection.client(timeouts)
        return self._client

    def _key(self, name: str) -> str:
        return f"{self.prefix}/adapters/{name}.json" if self.prefix else f"adapters/{name}.json"

    @property
    def _base_key(self) -> str:
        return f"{self.prefix}/base.json" if self.prefix else "base.json"

    @property
    def _snapshot_key(self) -> str:
        return f"{self.prefix}/snapshot.json" if self.prefix else "snapshot.json"

    def load(self) -> StoredState:
        with self._errors():
            folder = self._key("").removesuffix(".json")
            listed = {
                item["Key"]: item["ETag"]
                for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=folder)
                for item in page.get("Contents", [])
                if item["Key"].endswith(".json")
            }
            cached = self._read_snapshot()
            records: dict[str, AdapterRecord] = {}
            missing = []
            for key, etag in listed.items():
                hit = cached.get(key)
                if hit is not None and hit[0] == etag:
                    records[hit[1].name] = hit[1]
                    self._etags[hit[1].name] = etag
                else:
                    missing.append(key)
            with ThreadPoolExecutor(max_workers=16) as pool:
                fetched = list(pool.map(self._read, missing))
            records |= keyed(record for record in fetched if record is not None)
            base = self._read_object(self._base_key)
        self.stats = {"listed": len(listed), "from_snapshot": len(listed) - len(missing), "fetched": len(missing)}
        if len(missing) > SNAPSHOT_STALE or len(cached) != len(listed) - len(missing):
            self._write_snapshot(records)
        return StoredState(records=records, base=BaseIdentity(**json.loads(base[0])) if base else None)

    def _read_snapshot(self) -> dict[str, tuple[str, AdapterRecord]]:
        """Object key → (ETag, record) as the last snapshot saw them; empty if there is none or it cannot be read."""
        found = self._read_object(self._snapshot_key)
        if found is None:
            return {}
        try:
            entries = json.loads(found[0])["objects"]
            return {key: (etag, record_of(item)) for key, (etag, item) in entries.items()}
        except (ValueError, KeyError, TypeError) as exc:
            logger.warning("the S3 registry store's snapshot cannot be read (%s); reading every record", exc)
            return {}

    def _write_snapshot(self, records: dict[str, AdapterRecord]) -> None:
        objects = {
            self._key(name): (self._etags[name], asdict(record))
            for name, record in records.items()
            if name in self._etags
        }
        body = json.dumps({"objects": objects}, separators=(",", ":")).encode()
        try:
            with self._errors():
                self.client.put_object(
                    Bucket=self.bucket, Key=self._snapshot_key, Body=body, ContentType="application/json"
                )
        except StoreUnavailable as exc:  # a cache: the next start reads the objects themselves
            logger.warning("could not write the S3 registry store's snapshot: %s", exc)

    def get(self, name: str) -> AdapterRecord | None:
        with self._errors():
            return self._read(self._key(name))

    def put(self, record: AdapterRecord, expected: AdapterRecord | None) -> None:
        condition = {"IfNoneMatch": "*"} if expected is None else {"IfMatch": self._etag_of(record.name, expected)}
        with self._errors():
            answer = self.client.put_object(
                Bucket=self.bucket, Key=self._key(record.name), Body=encode(record).encode(),
                ContentType="application/json", **condition,
            )  # fmt: skip
        self._etags[record.name] = answer["ETag"]

    def delete(self, name: str, expected: AdapterRecord) -> None:
        etag = self._etag_of(name, expected)
        with self._errors():
            self.client.delete_object(Bucket=self.bucket, Key=self._key(name), IfMatch=etag)
        self._etags.pop(name, None)

    def set_base(self, base: BaseIdentity) -> None:
        with self._errors():
            self.client.put_object(Bucket=self.bucket, Key=self._base_key, Body=json.dumps(asdict(base)).encode())

    def _etag_of(self, name: str, expected: AdapterRecord) -> str:
        etag = self._etags.get(name)
        if etag is None:
            raise StoreConflict(f"adapter {name!r} is not the one this registry read from the store")
        return etag

    def _read(self, key: str) -> AdapterRecord | None:
        found = self._read_object(key)
        if found is None:
            return None
        record = decode(found[0])
        self._etags[record.name] = found[1]
        return record

    def _read_object(self, key: str) -> tuple[bytes, str] | None:
        from botocore.exceptions import ClientError

        try:
            answer = self.client.get_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise
        return answer["Body"].read(), answer["ETag"]

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """A failed precondition is a `StoreConflict`; any other S3 or network failure is `StoreUnavailable`."""
        from botocore.exceptions import BotoCoreError, ClientError

        where = "the S3 registry store"
        try:
            yield
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                raise StoreConflict("a record changed in the S3 registry store meanwhile") from None
            if code in ("NoSuchBucket", "AccessDenied", "403"):
                # Said plainly: the store never creates its bucket, and with these a registry replica cannot start.
                problem = "does not exist" if code == "NoSuchBucket" else "refuses these credentials"
                url = f"s3://{self.bucket}/{self.prefix}"
                message = f"{where}: bucket {self.bucket!r} {problem} (registry.store is {url}; it creates no bucket)"
                raise StoreUnavailable(message) from None
            raise StoreUnavailable(f"{where} failed: {code or type(exc).__name__}") from None
        except BotoCoreError as exc:
            raise StoreUnavailable(f"{where} is unreachable ({type(exc).__name__})") from None


def open_store(url: str, s3: S3Source) -> RegistryStore:
    """The store a `registry.store` URL names: `sqlite:///relative/or//absolute/path` or `s3://bucket/prefix`."""
    parsed = urlparse(url)
    if parsed.scheme == "sqlite":
        return SqliteStore(Path(sqlite_path(url)))
    if parsed.scheme == "s3":
        return S3Store(bucket=parsed.netloc, prefix=parsed.path.strip("/"), connection=s3)
    raise ValueError(f"unsupported registry store {url!r}; use sqlite:///PATH or s3://BUCKET/PREFIX")


def sqlite_path(url: str) -> str:
    """The file of a `sqlite:///PATH` URL (three slashes then a relative path, four for an absolute one)."""
    return url.removeprefix("sqlite:///")
