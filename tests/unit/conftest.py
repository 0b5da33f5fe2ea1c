"""Unit tests' collection: stable ids for parameters that are made at random (generated API keys)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.unit.tenancy import KEY_NAMES


def pytest_make_parametrize_id(config: pytest.Config, val: Any, argname: str) -> str | None:
    """A generated key's id is its name: every worker of `pytest -n` collects the same test ids."""
    if isinstance(val, str) and val in KEY_NAMES:
        return f"key-{KEY_NAMES[val]}"
    return None
