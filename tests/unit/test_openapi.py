"""The OpenAPI schema tells the truth: the bodies routes read themselves, and the one error shape."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from fastapi.routing import APIRoute

from routing.app import create_app
from routing.catalog import ModelCatalog
from routing.errors import ErrorResponse, Overloaded
from serve.config import RouterConfig
from tests.unit.fake_engine import FakeRegistry, engine_client

ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}
GENERATE = {"/v1/completions": ("prompt", "CompletionBody"), "/v1/chat/completions": ("messages", "ChatBody")}


@pytest.fixture(scope="module")
def app() -> Any:
    return create_app(engine_client(), ModelCatalog("tiny-base", FakeRegistry()), RouterConfig())


@pytest.fixture(scope="module")
def schema(app: Any) -> dict[str, Any]:
    return dict(app.openapi())


def operations(schema: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(path, method, op) for path, methods in schema["paths"].items() for method, op in methods.items()]


def test_schema_is_valid_openapi(schema: dict[str, Any]) -> None:
    validator = pytest.importorskip("openapi_spec_validator", reason="openapi-spec-validator is not installed")
    validator.validate(schema)


@pytest.mark.parametrize("path", GENERATE)
def test_generate_routes_declare_their_json_body(schema: dict[str, Any], path: str) -> None:
    field, title = GENERATE[path]
    body = schema["paths"][path]["post"]["requestBody"]
    assert body["required"] is True
    declared = body["content"]["application/json"]["schema"]
    assert declared["title"] == title
    assert set(declared["required"]) == {"model", field}
    assert declared["additionalProperties"] is True  # other OpenAI / vLLM parameters pass through
    assert "$ref" not in str(declared)  # inlined: an operation cannot add components
    ok = schema["paths"][path]["post"]["responses"]["200"]["content"]
    assert set(ok) == {"application/json", "text/event-stream"}


@pytest.mark.parametrize("path", GENERATE)
def test_generate_routes_still_read_their_raw_body(app: Any, path: str) -> None:
    """The OpenAPI body is documentation only: FastAPI must not parse it (we answer parse errors ourselves)."""
    route = next(r for r in app.routes if isinstance(r, APIRoute) and r.path == path)
    assert route.body_field is None


def test_adapter_writes_declare_their_bodies(schema: dict[str, Any]) -> None:
    for path in ("/v1/adapters", "/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
        body = schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body["$ref"].startswith("#/components/schemas/")


def test_every_error_response_is_the_openai_error_model(schema: dict[str, Any]) -> None:
    for path, method, op in operations(schema):
        responses = op["responses"]
        assert "422" not in responses, (method, path)  # FastAPI's default; ours are 400
        for status in ("400", "404", "413", "500", "503", "default"):
            assert responses[status]["content"]["application/json"]["schema"] == ERROR_REF, (method, path, status)
        for status in ("429", "503"):
            assert "Retry-After" in responses[status]["headers"]


def test_error_model_matches_the_bodies_we_send(schema: dict[str, Any]) -> None:
    detail = schema["components"]["schemas"]["ErrorDetail"]
    assert set(detail["required"]) == {"message", "type", "param", "code"}
    ErrorResponse.model_validate(Overloaded("busy").body())


async def test_no_page_of_this_origin_loads_a_script_from_elsewhere(app: Any) -> None:
    """The console keeps its key in this origin's session storage: any HTML page here is under its CSP (FastAPI's
    `/docs` and `/redoc` load Swagger UI and ReDoc from a CDN, so they are off; `/openapi.json` stays)."""
    pages = [r.path for r in app.routes if "GET" in getattr(r, "methods", ()) and "{" not in r.path]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as client:
        for path in {*pages, "/docs", "/redoc", "/docs/oauth2-redirect"}:
            response = await client.get(path, follow_redirects=True)
            if response.headers.get("content-type", "").startswith("text/html"):
                assert "script-src 'self';" in response.headers.get("content-security-policy", ""), path
                assert "cdn" not in response.text.lower(), path
        assert (await client.get("/docs")).status_code == 404
        assert (await client.get("/redoc")).status_code == 404
        assert (await client.get("/openapi.json")).status_code == 200
