"""The audit log of adapter writes: who did what to which adapter, when, and how it ended.

One JSON object per line on the `loraplex.audit` logger, and appended to `auth.audit_file` when set.
Refused and denied attempts are recorded too; requests without a valid key never reach a write.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from fastapi import Request

from routing.errors import OpenAIError, PermissionDenied

AuditAction = Literal["register", "compose", "unregister", "rollout", "split", "promote", "rollback"]
Outcome = Literal["ok", "denied", "refused", "failed"]
LOGGER = "loraplex.audit"


def show_audit_records() -> None:
    """Makes the `loraplex.audit` logger's INFO records reach a handler in this process.

    Audit records are INFO and would vanish where nobody configured logging (Python's last-resort handler
    shows only warnings). The router deployment calls this once at start; constructing an `AuditLog` has no
    effect on logging, so tests and embedders keep their own configuration.
    """
    logger = logging.getLogger(LOGGER)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    if not logger.hasHandlers():
        logger.addHandler(logging.StreamHandler())


class AuditLog:
    """Writes audit records; the file, when configured, is opened per record (writes are rare)."""

    def __init__(self, file: str | None = None) -> None:
        self._logger = logging.getLogger(LOGGER)
        self._file = Path(file) if file else None

    def record(
        self,
        key: str,
        action: AuditAction,
        request: Request,
        *,
        adapter: str | None,
        source: str | None = None,
        version: int | None = None,
        split: str | None = None,
        status: int = 200,
        error: OpenAIError | None = None,
    ) -> None:
        """One JSON line; `split`: how an adapter's requests are shared between its versions after the change."""
        entry: dict[str, Any] = {
            "ts": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "key": key,
            "action": action,
            "route": f"{request.method} {request.url.path}",
            "adapter": adapter,
            "source": source,
            "outcome": _outcome(error),
            "status": error.status if error else status,
        }
        if version is not None:
            entry["version"] = version
        if split is not None:
            entry["split"] = split
        if error is not None:
            entry["message"] = error.message
        line = json.dumps(entry, sort_keys=False)
        self._logger.info(line)
        if self._file is not None:
            try:
                with self._file.open("a") as handle:
                    handle.write(line + "\n")
            except OSError:  # the write itself happened; losing the file copy must not fail the request
                self._logger.exception("could not append to the audit file %s", self._file)


def _outcome(error: OpenAIError | None) -> Outcome:
    if error is None:
        return "ok"
    if isinstance(error, PermissionDenied):
        return "denied"
    return "refused" if error.status < 500 else "failed"
