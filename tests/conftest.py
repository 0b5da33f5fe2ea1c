"""Shared test configuration: integration tests are marked by their folder."""

from __future__ import annotations

from pathlib import Path

import pytest

INTEGRATION = Path(__file__).parent / "integration"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if INTEGRATION in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.integration)
    # Tests that start their own server go first, before the session-wide stack starts: the machine
    # has room for one engine deployment at a time.
    items.sort(key=lambda item: item.get_closest_marker("own_server") is None)
