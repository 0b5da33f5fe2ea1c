"""Schemathesis against a running loraplex, through its own `/openapi.json`: no 5xx, every error OpenAI-shaped.

Runs only when `LORAPLEX_FUZZ_URL` names a server (e.g. `http://127.0.0.1:8000`); skipped otherwise.
`LORAPLEX_FUZZ_EXAMPLES` sets the generated examples per operation (default 25). Adapter writes are
left out: they would fetch arbitrary sources or unregister adapters the server serves. Requests the
steering sends to a served model generate at most 4 tokens, so a CPU engine keeps up.
"""

from __future__ import annotations

import os
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, settings

from tests.fuzzing import openai_error_shape, steer

schemathesis = pytest.importorskip(
    "schemathesis", reason="schemathesis is not installed; it is in pyproject's dev extra (pip install -e '.[dev]')"
)

FUZZ_URL = "LORAPLEX_FUZZ_URL"
EXAMPLES = int(os.environ.get("LORAPLEX_FUZZ_EXAMPLES", "25"))
WRITES = [
    "POST /v1/adapters",
    "DELETE /v1/adapters/{name}",
    "POST /v1/load_lora_adapter",
    "POST /v1/unload_lora_adapter",
]


@pytest.fixture(scope="session")
def fuzz_base_url() -> str:
    url = os.environ.get(FUZZ_URL, "").rstrip("/")
    if not url:
        pytest.skip(f"set {FUZZ_URL} to a running loraplex's base URL to fuzz it")
    return url


@pytest.fixture(scope="session")
def live_schema(fuzz_base_url: str) -> Any:
    return schemathesis.openapi.from_url(f"{fuzz_base_url}/openapi.json", wait_for_schema=60).exclude(name=WRITES)


@pytest.fixture(scope="session")
def served_models(fuzz_base_url: str) -> list[str]:
    return [model["id"] for model in httpx.get(f"{fuzz_base_url}/v1/models", timeout=30).json()["data"]]


schema = schemathesis.pytest.from_fixture("live_schema")


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)
def test_live_server_never_answers_5xx(case: Any, fuzz_base_url: str, served_models: list[str]) -> None:
    steer(case, served_models, max_tokens=4)
    checks = [schemathesis.checks.not_a_server_error, openai_error_shape]
    case.call_and_validate(base_url=fuzz_base_url, checks=checks, timeout=120)


def test_live_server_still_healthy(fuzz_base_url: str) -> None:
    assert httpx.get(f"{fuzz_base_url}/health", timeout=30).status_code == 200
