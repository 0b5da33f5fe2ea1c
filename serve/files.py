"""Crash-safe file replacement: the one routine for every file loraplex rewrites (keys, registry state)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


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
