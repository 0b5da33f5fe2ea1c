"""One crash-safe file replacement (routing/keys.py `atomic_write`) for the keys file."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from routing import keys as files
from routing.keys import atomic_write


def test_a_write_replaces_the_file_whole_owner_only_when_new(tmp_path: Path) -> None:
    target = tmp_path / "state" / "registry.json"
    atomic_write(target, "one")
    assert target.read_text() == "one" and stat.S_IMODE(target.stat().st_mode) == 0o600
    target.chmod(0o640)
    atomic_write(target, "two")
    assert target.read_text() == "two" and stat.S_IMODE(target.stat().st_mode) == 0o640  # kept
    assert sorted(p.name for p in target.parent.iterdir()) == ["registry.json"]


def test_a_failure_before_the_rename_keeps_the_old_file_and_leaves_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "keys.yaml"
    atomic_write(target, "old")

    def disk_full(_: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", disk_full)
    with pytest.raises(OSError):
        atomic_write(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["keys.yaml"]


def test_the_data_is_synced_before_the_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    order: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(files.os, "fsync", lambda fd: (order.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(files.os, "replace", lambda a, b: (order.append("replace"), real_replace(a, b))[1])
    atomic_write(tmp_path / "f", "x")
    assert order == ["fsync", "replace", "fsync"]  # the file, the rename, then the folder
