"""API keys at rest: minting a key, hashing it, and reading and appending the keys file.

A key is `lpx-` followed by 256 random bits. Only its SHA-256 is ever written down: with that much
entropy a plain hash cannot be reversed by guessing, and the router can look a presented key up in
one step without a slow password hash on every request.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import tempfile
from pathlib import Path

import yaml

from serve.config import ApiKeyConfig, KeysFile

KEY_PREFIX = "lpx-"
OPEN_WARNING = (
    "NO API KEYS CONFIGURED: this server is OPEN. Anyone who can reach it may use every model and "
    "register or remove adapters. Set router.auth.keys_file (see `loraplex keys create`)."
)


def new_api_key() -> str:
    """A fresh random key, to be shown to its owner once."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_api_key(key: str) -> str:
    """The hex SHA-256 under which a key is stored and looked up."""
    return hashlib.sha256(key.encode()).hexdigest()


def read_keys_file(path: Path) -> KeysFile:
    """Parses a YAML or JSON keys file; an empty file holds no keys."""
    text = path.read_text()
    data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    return KeysFile.model_validate(data or {})


def append_key(path: Path, entry: ApiKeyConfig) -> None:
    """Adds `entry` to the keys file (creating it, owner-only), validated and replaced atomically."""
    current = read_keys_file(path) if path.exists() else KeysFile()
    updated = KeysFile(keys=[*current.keys, entry])  # refuses a repeated name
    data = updated.model_dump(mode="json", exclude_defaults=True)
    text = json.dumps(data, indent=2) + "\n" if path.suffix == ".json" else yaml.safe_dump(data, sort_keys=False)
    atomic_write(path, text)


def atomic_write(path: Path, text: str, mode: int | None = None) -> None:
    """Replaces `path` with `text` so that a crash at any moment leaves the old file or the new one, whole.

    A uniquely named temporary file in the same folder is written and fsynced, renamed over `path`, and
    the folder fsynced so the rename itself survives a power loss. `mode` sets the permission bits (default:
    those of the file replaced, or 0o600 for a new file: these files hold hashes and state, not for others).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode is None:
        mode = path.stat().st_mode & 0o777 if path.exists() else 0o600
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
