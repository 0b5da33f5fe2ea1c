"""The newer APIs on the real stack through their official clients (issue 18): OpenAI's Responses (openai SDK),
Anthropic's Messages (anthropic SDK) and vLLM's tokenizer, each with an adapter picked by `model`.

Greedy answers of Responses and Messages equal chat's for the same messages and adapter (the same chat template,
the same weights: vLLM's own serving code behind each), and differ from the base model's. Out-of-scope keys:
tests/integration/test_tenants.py.
"""

from __future__ import annotations

import json

import anthropic
import jsonschema
import openai

from serve.reference import Reference
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
