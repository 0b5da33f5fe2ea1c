"""Schemathesis over the router's own OpenAPI schema, in process against the fake engine.

Every operation, with generated valid and invalid inputs (schemathesis' examples, coverage and
fuzzing phases): no answer is a 5xx and every error is in OpenAI's shape. Deterministic
(`derandomize`) and quick. `tests/integration/test_fuzz_live.py` runs the same checks against a
running server.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings

from routing.app import create_app
from routing.catalog import ModelCatalog
from serve.config import RouterConfig
from tests.fuzzing import openai_error_shape, steer
from tests.unit.fake_engine import FakeRegistry, engine_client, record

schemathesis = pytest.importorskip(
    "schemathesis", reason="schemathesis is not installed; it is in pyproject's dev extra (pip install -e '.[dev]')"
)

BASE = "tiny-base"
SERVED = (BASE, "a1", f"{BASE}:a2")
APP = create_app(  # an open server: schemathesis calls it as `testserver`
    engine_client(),
    ModelCatalog(BASE, FakeRegistry({n: record(n) for n in ("a1", "a2")})),
    RouterConfig(allowed_hosts=["testserver"]),
)
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@schema.parametrize()
@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)
def test_no_5xx_and_every_error_is_openai_shaped(case: schemathesis.Case) -> None:
    steer(case, SERVED)
    case.call_and_validate(checks=[schemathesis.checks.not_a_server_error, openai_error_shape])
