"""The unit bad-input tables, replayed against the real stack: uvicorn, Ray Serve's proxy and a router replica.

Every row is refused by the router before any engine is asked, so this costs no generation. The
size-limit tests stay in the unit suite: a server that answers 413 early may reset a client still
uploading megabytes, which says nothing about the router.
"""

from __future__ import annotations

import httpx
import pytest

from tests.integration.conftest import Stack
from tests.unit.test_bad_input import (
    BAD_BODIES,
    BAD_REQUESTS,
    JSON_ROUTES,
    Payload,
    assert_openai_error,
    request_for,
)

ROWS = [(path, *row) for path in JSON_ROUTES for row in BAD_BODIES] + BAD_REQUESTS


@pytest.mark.parametrize(("path", "payload", "status", "param"), ROWS)
def test_bad_input_against_the_stack(stack: Stack, path: str, payload: Payload, status: int, param: str | None) -> None:
    data, headers = request_for(path, payload)
    response = httpx.post(f"{stack.base_url}{path}", content=data, headers=headers, timeout=60)
    assert_openai_error(response, status, param)


def test_stack_serves_after_bad_input(stack: Stack) -> None:
    assert httpx.get(f"{stack.base_url}/health", timeout=30).status_code == 200
    assert httpx.get(f"{stack.base_url}/v1/adapters/bad-input-probe", timeout=30).status_code == 404  # none registered
