"""API keys (stored as hashes, with their scopes and limits), the keys file, and the audit log."""

from __future__ import annotations

import re

from pydantic import Field, field_validator

from serve.config._base import _Strict

KEY_NAME_PATTERN = r"^[A-Za-z0-9._@-]{1,64}$"
_KEY_NAME = re.compile(KEY_NAME_PATTERN)
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class ApiKeyConfig(_Strict):
    """One API key, stored as the SHA-256 of the key (never the key itself), with its scope and limits."""

    name: str = Field(
        description="The key's public id, `[A-Za-z0-9._@-]`: shown in the audit log, rate limits and fair share."
    )
    sha256: str = Field(
        description="Hex SHA-256 of the whole key string (`lpx-...`), as `loraplex keys create` writes it."
    )
    adapters: list[str] = Field(
        default_factory=list,
        description="Adapter names or globs (`support-*`, `*`) this key may use; matched against the bare name.",
    )
    base: bool = Field(default=False, description="Whether this key may use the base model itself.")
    admin: bool = Field(
        default=False,
        description="Whether this key may write adapters (register, unregister, vLLM load/unload) and list them all.",
    )
    metrics: bool = Field(
        default=False,
        description="Whether this key may read `/metrics` (admin keys may too): the key to give Prometheus.",
    )
    compose: bool = Field(
        default=False,
        description=(
            "Whether this key may send a request's `compose` (an inline composite of adapters it may use; admin keys "
            "may too). Each new composite costs the registry a PEFT build and a folder on every node, so it is off "
            "unless granted; registered composites (`POST /v1/adapters` with `compose`) need admin."
        ),
    )
    rpm: int | None = Field(
        default=None, ge=1, description="Requests per minute (generation requests); None: no limit."
    )
    tpm: int | None = Field(
        default=None,
        ge=1,
        description="Tokens per minute, prompt plus completion (estimated at admission, then settled); None: no limit.",
    )
    weight: float = Field(
        default=1.0,
        gt=0,
        description="Share of the engine this key gets when the router is backlogged, relative to other keys' weights.",
    )

    @field_validator("name")
    @classmethod
    def _name_is_safe(cls, value: str) -> str:
        if not _KEY_NAME.fullmatch(value):
            raise ValueError(f"key name {value!r} must match {KEY_NAME_PATTERN}")
        return value

    @field_validator("sha256")
    @classmethod
    def _is_a_digest(cls, value: str) -> str:
        if not _SHA256.fullmatch(value):
            raise ValueError("sha256 must be 64 lowercase hex digits: the key's hash, never the key")
        return value


def _unique_keys(keys: list[ApiKeyConfig]) -> list[ApiKeyConfig]:
    for attribute in ("name", "sha256"):
        values = [getattr(key, attribute) for key in keys]
        repeated = sorted({value for value in values if values.count(value) > 1})
        if repeated:
            raise ValueError(f"API key {attribute}s must be unique, repeated: {repeated}")
    return keys


class KeysFile(_Strict):
    """The keys file (`auth.keys_file`): YAML or JSON, `keys: [...]`."""

    keys: list[ApiKeyConfig] = Field(default_factory=list, description="The API keys.")

    _unique = field_validator("keys")(_unique_keys)


class AuthConfig(_Strict):
    """API keys and the audit log. With no keys at all the server is open to anyone who reaches it."""

    keys_file: str | None = Field(
        default=None,
        description=(
            "YAML or JSON file of API keys (a mounted secret works); re-read when it changes. "
            "Setting it closes the server even while the file holds no keys."
        ),
    )
    keys: list[ApiKeyConfig] = Field(
        default_factory=list, description="API keys given inline (hashes only), in addition to `keys_file`."
    )
    audit_file: str | None = Field(
        default=None,
        description=(
            "File that adapter writes are appended to as JSON lines; they always go to the `loraplex.audit` log."
        ),
    )

    allow_open: bool = Field(
        default=False,
        description=(
            "Serve without keys on an address other than loopback. Without it such a server refuses to start "
            "(`loraplex serve --allow-open` sets it): an open server lets anyone who reaches it register and remove "
            "adapters."
        ),
    )

    _unique = field_validator("keys")(_unique_keys)

    @property
    def is_open(self) -> bool:
        """True when no key is configured: every request is served without authentication."""
        return self.keys_file is None and not self.keys
