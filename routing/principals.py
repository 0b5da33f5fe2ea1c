"""Who is asking: the configured API keys, and the `Principal` (scope, limits, weight) each one stands for.

Keys are looked up by their SHA-256; with no keys configured every request is the `ANONYMOUS`
principal, which may do anything. The FastAPI dependencies that use this live in `routing.auth`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

from pydantic import ValidationError

from routing.errors import PermissionDenied, Unauthorized
from routing.keys import OPEN_WARNING, hash_api_key, read_keys_file
from serve.config import ApiKeyConfig, AuthConfig

logger = logging.getLogger("loraplex.router")
RELOAD_S = 2.0


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: the key's name, what it may use, its rate limits and fair-share weight."""

    name: str
    adapters: tuple[str, ...]
    base: bool
    admin: bool
    rpm: int | None = None
    tpm: int | None = None
    weight: float = 1.0
    metrics: bool = False
    compose: bool = False

    @classmethod
    def of(cls, key: ApiKeyConfig) -> Principal:
        return cls(key.name, tuple(key.adapters), key.base, key.admin, key.rpm, key.tpm, key.weight, key.metrics,
                   key.compose)  # fmt: skip

    def may_use(self, adapter: str | None) -> bool:
        """Whether this key may send requests to `adapter` (a bare name), or to the base model when None."""
        if adapter is None:
            return self.base
        return any(fnmatchcase(adapter, pattern) for pattern in self.adapters)

    def may_see(self, adapter: str) -> bool:
        """Whether `adapter` shows in this key's adapter listing: admins manage, so they see every adapter."""
        return self.admin or self.may_use(adapter)

    def require_use(self, adapter: str | None, requested: str) -> None:
        """Refuses a model outside the key's scope, whether or not it exists (no probing for names)."""
        if not self.may_use(adapter):
            raise PermissionDenied(f"This API key may not use the model `{requested}`.", param="model")

    def require_admin(self) -> None:
        if not self.admin:
            raise PermissionDenied("Adapter writes need an API key with the admin scope.")

    def require_compose(self) -> None:
        """Refuses a request's `compose` to keys without the compose (or admin) scope, before anything is built."""
        if not (self.compose or self.admin):
            raise PermissionDenied("`compose` needs an API key with the compose (or admin) scope.", param="compose")

    def require_metrics(self) -> None:
        if not (self.metrics or self.admin):
            raise PermissionDenied("/metrics needs an API key with the metrics (or admin) scope.")


ANONYMOUS = Principal(name="anonymous", adapters=("*",), base=True, admin=True, compose=True)


class KeyRing:
    """The configured keys by hash; follows changes to the keys file within `RELOAD_S` seconds."""

    def __init__(self, config: AuthConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.is_open = config.is_open
        self._inline = list(config.keys)
        self._file = Path(config.keys_file) if config.keys_file else None
        self._clock = clock
        self._checked = clock()
        self._mtime = self._file.stat().st_mtime_ns if self._file else 0
        self._by_hash = self._build(self._read_file())  # a missing or broken file stops the replica from starting
        if self.is_open:
            logger.warning(OPEN_WARNING)

    def authenticate(self, authorization: str | None, api_key: str | None = None) -> Principal:
        """The principal of an `Authorization` header value, or else of an `x-api-key` one (Anthropic's SDK sends
        its key so); raises `Unauthorized`."""
        if self.is_open:
            return ANONYMOUS
        if authorization is None and api_key:
            authorization = f"Bearer {api_key}"
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("Missing API key: send it as `Authorization: Bearer lpx-...`.")
        self._follow_file()
        principal = self._by_hash.get(hash_api_key(token))
        if principal is None:
            raise Unauthorized("Incorrect API key provided.")
        return principal

    def _read_file(self) -> list[ApiKeyConfig]:
        return read_keys_file(self._file).keys if self._file else []

    def _build(self, from_file: list[ApiKeyConfig]) -> dict[str, Principal]:
        keys = [*self._inline, *from_file]
        names = [key.name for key in keys]
        if len(set(names)) != len(names):
            raise ValueError(f"API key names repeat between auth.keys and {self._file}")
        return {key.sha256: Principal.of(key) for key in keys}

    def _follow_file(self) -> None:
        now = self._clock()
        if self._file is None or now - self._checked < RELOAD_S:
            return
        self._checked = now
        try:
            mtime = self._file.stat().st_mtime_ns
            if mtime != self._mtime:
                self._by_hash = self._build(self._read_file())
                self._mtime = mtime
                logger.info("reloaded %d API keys from %s", len(self._by_hash), self._file)
        except (OSError, ValueError, ValidationError):  # keep serving with the keys we had
            logger.exception("could not reload API keys from %s; keeping the previous keys", self._file)
