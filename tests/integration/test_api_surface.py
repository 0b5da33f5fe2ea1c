"""The newer APIs on the real stack through their official clients (issue 18): OpenAI's Responses (openai SDK),
Anthropic's Messages (anthropic SDK) and vLLM's tokenizer, each with an adapter picked by `model`.

Greedy answers of Responses and Messages equal chat's for the same messages and adapter (the same chat template,
the same weights: vLLM's own serving code behind each), and differ from the base model's. Out-of-scope keys:
tests/integration/test_tenants.py.
"""

from __future__ import annotations

import json

import anthropic
import httpx
import jsonschema
import openai

from serve.demo.reference import Reference
from tests.integration.conftest import Stack

QUESTION = "Name a colour of the sea."
TOKENS = 12


def chat(client: openai.OpenAI, model: str) -> str:
    response = client.chat.completions.create(model=model, messages=[{"role": "user", "content": QUESTION}],
                                              max_tokens=TOKENS, temperature=0)  # fmt: skip
    return response.choices[0].message.content or ""


def test_responses_answer_with_the_adapter_as_chat_does(client: openai.OpenAI, stack: Stack) -> None:
    for model in ("alpha", stack.model_id):
        response = client.responses.create(model=model, input=[{"role": "user", "content": QUESTION}],
                                           max_output_tokens=TOKENS, temperature=0)  # fmt: skip
        assert response.output_text == chat(client, model), model
        assert response.usage is not None and response.usage.output_tokens == TOKENS
    assert chat(client, "alpha") != chat(client, stack.model_id), "the adapter changes the answer"
    stream = client.responses.create(model="alpha", input=QUESTION, max_output_tokens=TOKENS, temperature=0,
                                     stream=True)  # fmt: skip
    kinds, text = [], ""
    for event in stream:
        kinds.append(event.type)
        if event.type == "response.output_text.delta":
            text += event.delta
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed" and text


def test_the_anthropic_sdk_talks_to_an_adapter(client: openai.OpenAI, stack: Stack) -> None:
    claude = anthropic.Anthropic(base_url=stack.base_url, api_key="unused", max_retries=0, timeout=120)
    greedy = {"temperature": 0}  # this SDK no longer sends `temperature` itself; the API takes it
    message = claude.messages.create(model="alpha", max_tokens=TOKENS, extra_body=greedy,
                                     messages=[{"role": "user", "content": QUESTION}])  # fmt: skip
    block = message.content[0]
    assert block.type == "text" and block.text == chat(client, "alpha")
    assert message.usage.output_tokens == TOKENS and message.model == f"{stack.model_id}:alpha"
    with claude.messages.stream(model="alpha", max_tokens=TOKENS, extra_body=greedy,
                                messages=[{"role": "user", "content": QUESTION}]) as stream:  # fmt: skip
        streamed = "".join(stream.text_stream)
    assert streamed == block.text
    try:
        claude.messages.create(model="no-such-adapter", max_tokens=4, messages=[{"role": "user", "content": "x"}])
        raise AssertionError("an unknown model was served")
    except anthropic.NotFoundError as exc:
        assert exc.body["type"] == "error" and exc.body["error"]["type"] == "not_found_error"  # type: ignore[index]


def test_tokenize_counts_with_the_chat_template_and_detokenize_reverses(
    client: openai.OpenAI, stack: Stack, reference: Reference
) -> None:
    counted = client.post(f"{stack.base_url}/tokenize", cast_to=object,
                          body={"model": "alpha", "messages": [{"role": "user", "content": QUESTION}]})  # fmt: skip
    assert isinstance(counted, dict) and counted["tokens"] == reference.chat_prompt(QUESTION)
    assert counted["count"] == len(counted["tokens"])
    text = client.post(f"{stack.base_url}/detokenize", cast_to=object,
                       body={"model": "alpha", "tokens": reference.tokenizer.encode("the sea")})  # fmt: skip
    assert isinstance(text, dict) and text["prompt"] == "the sea"


ANSWER = {
    "type": "object",
    "properties": {"colour": {"type": "string", "enum": ["blue", "green", "grey"]}},
    "required": ["colour"],
    "additionalProperties": False,
}


def test_structured_output_follows_its_schema(client: openai.OpenAI) -> None:
    """vLLM's structured outputs constrain greedy decoding to the schema, so even the demo model complies."""
    messages = [{"role": "user", "content": f"{QUESTION} Answer in JSON."}]
    response = client.chat.completions.create(
        model="alpha", messages=messages, max_tokens=40, temperature=0,  # type: ignore[arg-type]
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER, "strict": True}},
    )  # fmt: skip
    jsonschema.validate(json.loads(response.choices[0].message.content or ""), ANSWER)


WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 40}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.",
                                      "parameters": WEATHER, "strict": True}},
    {"type": "function", "function": {"name": "get_time", "description": "Time in a city.", "strict": True,
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                     "required": ["city"], "additionalProperties": False}}},
]  # fmt: skip


def test_tool_calls_use_the_adapters_parser_and_follow_the_functions_schema(
    client: openai.OpenAI, stack: Stack
) -> None:
    """Tools need vLLM's tool-call parser for the model's chat format. The stack's server has none of its own but
    loads `hermes` for adapters that ask for it (engine.tool_call_parsers): `alpha` registered again as `alpha-tools`
    with that parser gets tool calls, decoded under each strict function's schema (the parser's structural tags), so
    even the demo model returns calls whose arguments validate; `alpha` itself is refused in OpenAI's shape."""
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    try:
        client.chat.completions.create(model="alpha", messages=messages, tools=TOOLS, tool_choice=named,  # type: ignore[arg-type]
                                       max_tokens=8)  # fmt: skip
        raise AssertionError("a tool call without a parser was accepted")
    except openai.BadRequestError as exc:
        assert "tool-call-parser" in str(exc.message), exc

    def register(parser: str) -> httpx.Response:
        body = {"name": "alpha-tools", "source": str(stack.adapters["alpha"]), "tool_call_parser": parser}
        return httpx.post(f"{stack.base_url}/v1/adapters", json=body)

    unknown = register("no_such_parser")
    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "tool_call_parser", unknown.text
    created = register("hermes")
    assert created.status_code == 201 and created.json()["tool_call_parser"] == "hermes", created.text
    try:
        for choice in (named, "required"):
            response = client.chat.completions.create(
                model="alpha-tools", messages=messages, tools=TOOLS, tool_choice=choice,  # type: ignore[arg-type]
                max_tokens=150, temperature=0,
            )  # fmt: skip
            calls = response.choices[0].message.tool_calls or []
            # OpenAI ends a named tool choice with "stop", a required one with "tool_calls"; vLLM does the same.
            assert calls and response.choices[0].finish_reason in ("stop", "tool_calls"), (choice, response.choices[0])
            call = calls[0]
            assert call.type == "function" and call.function.name in {"get_weather", "get_time"}, choice
            schema = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == call.function.name)
            jsonschema.validate(json.loads(call.function.arguments), schema)  # type: ignore[arg-type]
            if choice is named:
                assert call.function.name == "get_weather"
        responses_tool = {"type": "function", "name": "get_weather", "parameters": WEATHER, "strict": True}
        answer = client.responses.create(model="alpha-tools", input=messages[0]["content"], tools=[responses_tool],  # type: ignore[list-item]
                                         tool_choice="required", max_output_tokens=150, temperature=0)  # fmt: skip
        calls_made = [item for item in answer.output if item.type == "function_call"]
        assert calls_made and calls_made[0].name == "get_weather", answer.output
        jsonschema.validate(json.loads(calls_made[0].arguments), WEATHER)
        auto = client.chat.completions.create(model="alpha-tools", messages=messages, tools=TOOLS, tool_choice="auto",  # type: ignore[arg-type]
                                              max_tokens=8, temperature=0)  # fmt: skip
        assert auto.choices[0].message.content or auto.choices[0].message.tool_calls  # the parser ran on its answer
    finally:
        httpx.delete(f"{stack.base_url}/v1/adapters/alpha-tools")
