"""The adapter registry: where it keeps its records and composites, which sources it accepts, the node cache."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

from pydantic import Field, SecretStr, field_validator

from serve.config._base import _Strict


class RegistryConfig(_Strict):
    """Where the adapter registry keeps its state and which adapter sources it accepts."""

    store: str | None = Field(
        default=None,
        description=(
            "Where the registry keeps its records: `sqlite:///PATH` (a relative path; four slashes for an absolute "
            "one) or `s3://BUCKET/PREFIX` (one object per adapter, conditional writes; credentials and endpoint "
            "as for `s3://` sources), for clusters whose nodes share no disk. None: SQLite beside `state_file` "
            "(`registry.db`)."
        ),
    )
    state_file: str = Field(
        default=".loraplex/registry.json",
        description=(
            "Where the registry keeps its files when no `store` is given: the SQLite database (`registry.db`) and "
            "the composites it builds go beside this path (the file itself is not written)."
        ),
    )
    composites: str | None = Field(
        default=None,
        description=(
            "Where the registry stores the composite adapters it builds (one folder per composite, named by the hash "
            "of what it was made from): a folder every node can read, or `s3://BUCKET/PREFIX`. None: beside the "
            "store, `s3://BUCKET/PREFIX-composites` for an S3 store, the `composites` folder beside `state_file` "
            "otherwise."
        ),
    )
    max_pending_builds: int = Field(
        default=4,
        ge=1,
        description=(
            "New inline composites (a request's `compose` no one asked for before) the registry makes or has waiting "
            "at once, for every key together; one more is refused at once, 503 with `Retry-After`. Each waits on one "
            "of the registry's request slots, so this keeps them for routers' reads and health checks."
        ),
    )
    max_pending_builds_per_key: int = Field(
        default=1,
        ge=1,
        description="New inline composites one key may have being made or waiting at once; past it 429 with "
        "`Retry-After`.",
    )
    builds_per_key_per_minute: int | None = Field(
        default=10,
        ge=1,
        description=(
            "New inline composites one key may ask for in any minute (built with PEFT, or read back from the "
            "composite store after a restart); past it 429 with `Retry-After`. Composites made before cost nothing. "
            "None: no bound."
        ),
    )
    inline_composite_ttl_s: float | None = Field(
        default=86400.0,
        ge=600,
        description=(
            "An inline composite no request used for this long is deleted from the composite store (asked for again, "
            "it is built again); never one a registered adapter's record names. Its last use survives a restart of "
            "the registry as the store's timestamp of it (a folder's mtime, S3's LastModified), which the registry "
            "moves to the uses it saw at each check (every quarter of this, at most hourly). At least 600 s: a router "
            "asks the registry again for an inline composite it left idle for a minute. None: never deleted."
        ),
    )
    cache_dir: str = Field(
        default=".loraplex/adapter-cache", description="Per-node copies of adapters, one folder per content hash."
    )
    local_roots: list[str] = Field(
        default_factory=list,
        description=(
            "Folders under which local (`/path`, `file://`) adapter sources may be registered through the API. "
            "Folders of adapters given in the config or on the command line are always allowed."
        ),
    )
    max_adapter_bytes: int = Field(default=2 * 1024**3, ge=1, description="Largest adapter accepted, in bytes.")
    cache_max_bytes: int | None = Field(
        default=20 * 1024**3,
        ge=1,
        description=(
            "Bound of each node's adapter cache (`cache_dir`), in bytes: the least recently used copies no engine "
            "replica on the node has installed are deleted beyond it. None: unbounded."
        ),
    )
    cache_stage_bytes: int = Field(
        default=4 * 1024**3,
        ge=0,
        description=(
            "Each node fetches registered adapters into its cache ahead of any request for them, the newest first, "
            "while the cache holds less than this (and less than half of `cache_max_bytes`), so a first request "
            "does not wait for the copy and its hash check. 0 turns it off."
        ),
    )
    s3_endpoint_url: str | None = Field(
        default=None, description="S3-compatible endpoint for `s3://` sources (MinIO, moto, ...); None means AWS."
    )
    s3_region: str = Field(default="us-east-1", description="S3 region.")
    s3_access_key_id: str | None = Field(default=None, description="S3 key id; None uses the usual AWS chain.")
    s3_secret_access_key: SecretStr | None = Field(
        default=None,
        description=(
            "S3 secret; None uses the usual AWS chain (environment, shared files, IAM roles: preferred, as it keeps "
            "the secret out of configs). Never rendered: reprs, dumps and logs show `**********`."
        ),
    )
    hf_endpoint: str | None = Field(
        default=None,
        description=(
            "Hugging Face Hub endpoint for `hf://` sources (a mirror, a private hub); None: huggingface_hub's "
            "default (`HF_ENDPOINT`, else https://huggingface.co)."
        ),
    )
    hf_token: SecretStr | None = Field(
        default=None,
        description=(
            "Hub token for private or gated `hf://` sources; None: the one huggingface_hub finds itself (`HF_TOKEN`, "
            "else a saved `hf auth login`; preferred, as it keeps the secret out of configs). Never rendered."
        ),
    )

    @field_validator("store")
    @classmethod
    def _store_scheme(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if value.startswith("s3://"):
            if not urlparse(value).netloc:
                raise ValueError("an s3:// registry store needs a bucket: s3://BUCKET/PREFIX")
        elif not (value.startswith("sqlite:///") and len(value) > len("sqlite:///")):
            raise ValueError(f"registry store {value!r}: use sqlite:///PATH or s3://BUCKET/PREFIX")
        return value

    @property
    def store_url(self) -> str:
        """The store's URL, `store` or the SQLite database beside `state_file`."""
        return self.store or f"sqlite:///{Path(self.state_file).with_name('registry.db')}"

    @property
    def composites_url(self) -> str:
        """Where composites go: `composites`, or the default beside the store."""
        if self.composites:
            return self.composites
        if self.store and self.store.startswith("s3://"):
            return self.store.rstrip("/") + "-composites"
        return str(Path(self.state_file).with_name("composites").resolve())
