"""Where adapters come from: local folders (`/path`, `file://`), S3-compatible object stores (`s3://`) and the
Hugging Face Hub (`hf://`, in `serve.adapters.hf_source`).

A source copies an adapter folder into a local directory. New schemes plug in by adding a `Source` to
`SourceResolver`.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlparse

from serve.adapters.validation import AdapterInvalid

if TYPE_CHECKING:
    from serve.adapters.hf_source import HfSource

MAX_FILES = 64


class SourceUnreachable(AdapterInvalid):
    """The source could not be read (missing folder, unknown bucket, network failure)."""


UNREACHABLE = "source_unreachable"
"""`WireError.code` of a source that could not be read (a folder gone, a bucket unreachable)."""


class Source(Protocol):
    """Copies the adapter at `uri` into the empty folder `dest`, refusing one larger than `max_bytes` before
    copying anything (a source's listing gives the sizes: a 50 GB object is never downloaded to find out)."""

    def fetch(self, uri: str, dest: Path, max_bytes: int | None = None) -> None: ...


def check_size(uri: str, size: int, max_bytes: int | None) -> None:
    if max_bytes is not None and size > max_bytes:
        raise AdapterInvalid(f"{uri} is {size} bytes; the limit is {max_bytes}")


@dataclass(frozen=True)
class LocalSource:
    """Folders on this machine, only under `allowed_roots` (an empty tuple allows none)."""

    allowed_roots: tuple[Path, ...]

    def fetch(self, uri: str, dest: Path, max_bytes: int | None = None) -> None:
        """Copies the folder's files; the folder, and every file in it once symlinks are followed, must lie
        under an allowed root (a link inside an allowed folder must not reach `/etc` or another tenant's files).
        """
        path = Path(urlparse(uri).path if uri.startswith("file://") else uri).resolve()
        if not self._allowed(path):
            raise AdapterInvalid(f"{uri} is outside the allowed adapter roots")
        if not path.is_dir():
            raise SourceUnreachable(f"{uri} is not a folder")
        files = [p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")]
        if len(files) > MAX_FILES:
            raise AdapterInvalid(f"{uri} holds {len(files)} files; an adapter has a few")
        for file in files:
            if not self._allowed(file.resolve()):
                raise AdapterInvalid(f"{uri}/{file.name} links outside the allowed adapter roots")
        check_size(uri, sum(file.stat().st_size for file in files), max_bytes)
        for file in files:
            shutil.copy2(file, dest / file.name)

    def _allowed(self, path: Path) -> bool:
        return any(path.is_relative_to(root.resolve()) for root in self.allowed_roots)


@dataclass(frozen=True)
class S3Source:
    """`s3://bucket/prefix` on AWS or any S3-compatible endpoint (MinIO, moto, ...)."""

    endpoint_url: str | None = None
    region: str = "us-east-1"
    access_key_id: str | None = None
    secret_access_key: str | None = field(default=None, repr=False)  # never in a repr, log or traceback

    def client(self, config: Any = None) -> Any:
        """A boto3 S3 client for this endpoint and these credentials (the adapter store's too, with its own
        `config`: a botocore `Config`; None: botocore's defaults)."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
            config=config,
        )

    def fetch(self, uri: str, dest: Path, max_bytes: int | None = None) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        parsed = urlparse(uri)
        bucket, prefix = parsed.netloc, parsed.path.strip("/")
        client = self.client()
        try:
            listing = client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/", MaxKeys=MAX_FILES + 1)
            objects = listing.get("Contents", [])
            keys = [item["Key"] for item in objects]
            if not keys:
                raise SourceUnreachable(f"nothing at {uri}")
            if len(keys) > MAX_FILES:
                raise AdapterInvalid(f"{uri} holds more than {MAX_FILES} objects; an adapter has a few")
            check_size(uri, sum(int(item.get("Size", 0)) for item in objects), max_bytes)
            for key in keys:
                name = key[len(prefix) + 1 :]
                if "/" in name or not name or name.startswith("."):
                    continue  # adapters are flat folders; ignore anything nested or hidden
                client.download_file(bucket, key, str(dest / name))
        except (BotoCoreError, ClientError) as exc:
            raise SourceUnreachable(f"cannot read {uri}: {exc}") from None


def _hub() -> HfSource:
    from serve.adapters.hf_source import HfSource  # which imports this module

    return HfSource()


@dataclass(frozen=True)
class SourceResolver:
    """Picks the source for a URI by its scheme."""

    local: LocalSource
    s3: S3Source = field(default_factory=S3Source)
    hf: HfSource = field(default_factory=_hub)

    def pin(self, uri: str) -> str:
        """`uri` naming exactly the files it names now, as the registry records it: an `hf://` branch or tag becomes
        its commit (a later push is a new version only when registered again). Other sources come back unchanged."""
        return self.hf.pin(uri) if urlparse(uri).scheme == "hf" else uri

    def fetch(self, uri: str, dest: Path, max_bytes: int | None = None) -> None:
        scheme = urlparse(uri).scheme
        source: Source
        if scheme in ("", "file"):
            source = self.local
        elif scheme == "s3":
            source = self.s3
        elif scheme == "hf":
            source = self.hf
        else:
            raise AdapterInvalid(f"unsupported adapter source scheme {scheme!r}; use a path, file://, s3:// or hf://")
        dest.mkdir(parents=True, exist_ok=True)
        source.fetch(uri, dest, max_bytes)
