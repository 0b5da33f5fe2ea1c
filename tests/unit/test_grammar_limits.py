"""Grammar inputs (JSON schemas, regexes, grammars, tools) are bounded before an engine compiles them: a schema
whose nested counted repetitions multiply past `router.max_schema_repetition`, or grammar inputs over
`router.max_schema_bytes`, are 400 naming the field, on every generating API, and never reach an engine."""

from __future__ import annotations

from typing import Any

import pytest

from routing.grammar_limits import pattern_repetition
from tests.unit.fake_engine import FakeEngine
from tests.unit.tenancy import BASE, client_for, make_app

EXPLOSIVE = "(a{1,1000}){1,1000}"
"""A million states for the grammar compiler, in 19 characters."""
USER = [{"role": "user", "content": "hi"}]


def big_array(pattern: str = EXPLOSIVE) -> dict[str, Any]:
    return {"type": "array", "minItems": 20_000, "items": {"type": "string", "pattern": pattern}}


@pytest.mark.parametrize(
    ("pattern", "repetition"),
    [
        ("abc", 1),
        ("a{5}", 5),
        ("a{2,7}b{3,}", 7),
        (EXPLOSIVE, 1_000_000),
        ("((a{10}){10}){10}", 1000),
        ("(a{10}|b{20}){3}", 60),
        ("\\d{3}-\\d{4}", 4),
        ("[{]{5}\\{9999}", 5),  # an escaped brace or one in a class quantifies nothing
        ("(a+)*b?", 1),
        ("a{,5}", 1),  # not a quantifier in Python's re: literal characters
    ],
)
def test_nested_counted_repetitions_multiply(pattern: str, repetition: int) -> None:
    assert pattern_repetition(pattern) == repetition


REFUSED = [
    ("/v1/chat/completions", {"messages": USER, "response_format": {"type": "json_schema", "json_schema": {
        "name": "s", "schema": {"type": "object", "properties": {"x": {"type": "string", "pattern": EXPLOSIVE}}}}}},
     "response_format.json_schema.schema.properties.x.pattern"),
    ("/v1/chat/completions", {"messages": USER, "response_format": {"type": "json_schema", "json_schema": {
        "name": "s", "schema": big_array("a{1,10}")}}}, "response_format.json_schema.schema.items.pattern"),
    ("/v1/chat/completions", {"messages": USER, "structured_outputs": {"regex": EXPLOSIVE}},
     "structured_outputs.regex"),
    ("/v1/completions", {"prompt": "x", "structured_outputs": {"json": big_array()}},
     "structured_outputs.json.items.pattern"),
    ("/v1/chat/completions", {"messages": USER, "tools": [{"type": "function", "function": {
        "name": "f", "strict": True, "parameters": {"type": "object", "properties": {"x": {"maxLength": 20_000}}}}}]},
     "tools.0.function.parameters.properties.x"),
    ("/v1/responses", {"input": "hi", "text": {"format": {"type": "json_schema", "name": "s",
                                                          "schema": big_array()}}}, "text.format.schema.items.pattern"),
    ("/v1/messages", {"messages": USER, "max_tokens": 8, "tools": [{"name": "f", "input_schema": big_array()}]},
     "tools.0.input_schema.items.pattern"),
    ("/v1/messages", {"messages": USER, "max_tokens": 8, "output_config": {"format": {"type": "json_schema",
                                                                                      "json_schema": big_array()}}},
     "output_config.format.json_schema.items.pattern"),
    ("/v1/chat/completions", {"messages": USER, "tools": [{"type": "function", "function": {
        "name": f"f{i}", "parameters": {"type": "object", "description": "y" * 100}}} for i in range(1000)]}, "tools"),
    ("/v1/chat/completions", {"messages": USER, "response_format": {"type": "json_schema", "json_schema": {
        "name": "s", "schema": {"type": "object", "prefixItems": [{"const": i} for i in range(20_000)]}}}},
     "response_format"),
]  # fmt: skip


@pytest.mark.parametrize(("path", "body", "param"), REFUSED)
async def test_explosive_or_huge_grammar_inputs_are_400_naming_the_field(
    path: str, body: dict[str, Any], param: str
) -> None:
    engine = FakeEngine()
    async with client_for(make_app([], engine)) as client:
        answer = await client.post(path, json={"model": BASE, **body})
    assert answer.status_code == 400, answer.text
    error = answer.json().get("error")
    assert error is not None
    if path != "/v1/messages":  # Anthropic's error shape has no param
        assert error["param"] == param
    assert not engine.requests, "nothing refused reached the engine"


ACCEPTED = [
    ("/v1/chat/completions", {"messages": USER, "response_format": {"type": "json_schema", "json_schema": {
        "name": "s", "schema": {"type": "object", "properties": {
            "phone": {"type": "string", "pattern": "^\\d{3}-\\d{4}$"},
            "tags": {"type": "array", "maxItems": 20, "items": {"type": "string", "maxLength": 100}}}}}}}),
    ("/v1/chat/completions", {"messages": USER, "tools": [{"type": "function", "function": {
        "name": "get_weather", "strict": True, "parameters": {"type": "object", "properties": {
            "city": {"type": "string"}}, "required": ["city"]}}}], "tool_choice": "required"}),
    ("/v1/responses", {"input": "hi", "text": {"format": {"type": "json_schema", "name": "s", "schema": {
        "type": "object", "properties": {"x": {"type": "integer"}}}}}}),
]  # fmt: skip


@pytest.mark.parametrize(("path", "body"), ACCEPTED)
async def test_ordinary_schemas_and_tools_pass(path: str, body: dict[str, Any]) -> None:
    engine = FakeEngine()
    async with client_for(make_app([], engine)) as client:
        answer = await client.post(path, json={"model": BASE, **body})
    assert answer.status_code == 200, answer.text
    assert len(engine.requests) == 1


async def test_the_bounds_are_configured() -> None:
    """An operator whose schemas are larger raises the bounds; a smaller bound refuses what the default accepts."""
    body = {"model": BASE, "messages": USER, "structured_outputs": {"regex": EXPLOSIVE}}
    async with client_for(make_app([], FakeEngine(), max_schema_repetition=1_000_000)) as client:
        assert (await client.post("/v1/chat/completions", json=body)).status_code == 200
    small = {"model": BASE, "messages": USER, "structured_outputs": {"regex": "a{1,50}"}}
    async with client_for(make_app([], FakeEngine(), max_schema_repetition=20)) as client:
        answer = await client.post("/v1/chat/completions", json=small)
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "structured_outputs.regex"
