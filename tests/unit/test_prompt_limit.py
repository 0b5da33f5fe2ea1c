"""`router.max_prompt_tokens` in vLLM's own prompt validation (the request models the engine replica uses)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from pydantic import TypeAdapter
from vllm.entrypoints.anthropic.protocol import AnthropicMessagesRequest
from vllm.entrypoints.anthropic.serving import AnthropicServingMessages
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.completion.protocol import CompletionRequest
from vllm.entrypoints.openai.responses.protocol import ResponsesRequest
from vllm.exceptions import VLLMValidationError

from serve.prompt_limit import request_models

MODEL_CONFIG = SimpleNamespace(max_model_len=2048)


def test_without_a_limit_vllms_own_models_are_used() -> None:
    models = request_models(None)
    assert (models.completion, models.chat, models.responses) == (
        CompletionRequest,
        ChatCompletionRequest,
        ResponsesRequest,
    )
    serving = object()
    assert models.messages_serving(serving) is serving


def test_completion_prompts_are_checked_against_the_limit_after_tokenization() -> None:
    completion = request_models(8).completion
    params = completion.model_validate({"model": "m", "prompt": "x", "max_tokens": 4}).build_tok_params(MODEL_CONFIG)
    assert params.max_output_tokens == 4 and params.max_total_tokens == 2048  # vLLM's own settings kept
    assert params._token_len_check(None, list(range(8))) == list(range(8))
    with pytest.raises(VLLMValidationError) as refused:
        params._token_len_check(None, list(range(9)))
    assert refused.value.parameter == "prompt" and "9 tokens" in str(refused.value)


def test_chat_prompts_name_messages_and_the_context_length_check_still_applies() -> None:
    chat = request_models(4000).chat
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 4}
    params = chat.model_validate(body).build_tok_params(MODEL_CONFIG)
    assert params.max_output_tokens_param == "max_completion_tokens"
    with pytest.raises(VLLMValidationError, match="maximum context length"):  # 2,049 > max_model_len first
        params._token_len_check(None, list(range(2049)))
    small = request_models(3).chat
    with pytest.raises(VLLMValidationError) as refused:
        small.model_validate(body).build_tok_params(MODEL_CONFIG)._token_len_check(None, [1, 2, 3, 4])
    assert refused.value.parameter == "messages"


def _refused(params: Any, tokens: int) -> VLLMValidationError:
    with pytest.raises(VLLMValidationError) as refused:
        params._token_len_check(None, list(range(tokens)))
    return refused.value


def test_responses_prompts_are_capped_naming_input() -> None:
    responses = request_models(8).responses
    params = responses.model_validate({"model": "m", "input": "x", "max_output_tokens": 4}).build_tok_params(
        MODEL_CONFIG
    )
    assert params.max_output_tokens == 4 and params._token_len_check(None, list(range(8))) == list(range(8))
    assert _refused(params, 9).parameter == "input"


@pytest.mark.parametrize(
    ("body", "param"),
    [({"prompt": "x"}, "prompt"), ({"messages": [{"role": "user", "content": "x"}]}, "messages")],
)
def test_tokenizer_prompts_are_capped(body: dict[str, Any], param: str) -> None:
    """A tokenizer request is no way round the limit: it tokenizes what a generation would."""
    request = TypeAdapter(request_models(8).tokenize).validate_python({"model": "m", **body})
    assert _refused(request.build_tok_params(MODEL_CONFIG), 9).parameter == param


def test_messages_are_converted_to_the_capped_chat_model() -> None:
    """vLLM serves Anthropic's Messages by converting them to a chat request: the copy of its serving object that the
    Messages route uses converts them to the capped one; vLLM's own object is left as it was."""
    serving = AnthropicServingMessages.__new__(AnthropicServingMessages)  # conversion needs no engine
    capped = request_models(8).messages_serving(serving)
    body = {"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": "x"}], "temperature": 0.5}
    converted = capped.to_chat_completion_request(AnthropicMessagesRequest.model_validate(body))
    assert converted.max_completion_tokens == 4 and converted.temperature == 0.5
    assert _refused(converted.build_tok_params(MODEL_CONFIG), 9).parameter == "messages"
    uncapped = serving.to_chat_completion_request(AnthropicMessagesRequest.model_validate(body))
    assert uncapped.build_tok_params(MODEL_CONFIG)._token_len_check(None, list(range(9))) == list(range(9))


def test_every_route_of_the_engine_replica_uses_the_capped_models() -> None:
    """The routes the replica serves parse each body with the capped model (completions, chat, Responses, tokenize)
    and answer Messages with the capped copy of vLLM's serving object."""
    from serve.engines.vllm_routes import build_routes

    def serving() -> SimpleNamespace:
        return SimpleNamespace(create_error_response=None, create_completion=None, create_chat_completion=None,
                               create_responses=None, create_tokenize=None, create_detokenize=None)  # fmt: skip

    messages = AnthropicServingMessages.__new__(AnthropicServingMessages)
    state = SimpleNamespace(openai_serving_completion=serving(), openai_serving_chat=serving(),
                            openai_serving_responses=serving(), anthropic_serving_messages=messages,
                            serving_tokenization=serving())  # fmt: skip
    routes = build_routes(state, request_models(8))
    bodies = {
        "completions": {"model": "m", "prompt": "x"},
        "chat": {"model": "m", "messages": [{"role": "user", "content": "x"}]},
        "responses": {"model": "m", "input": "x"},
        "tokenize": {"model": "m", "prompt": "x"},
    }
    for endpoint, body in bodies.items():
        _refused(routes[endpoint].parse(body).build_tok_params(MODEL_CONFIG), 9)
    answered_by = routes["messages"].serve.__self__  # type: ignore[attr-defined]
    converted = answered_by.to_chat_completion_request(
        AnthropicMessagesRequest.model_validate({"model": "m", "max_tokens": 4, "messages": bodies["chat"]["messages"]})
    )
    _refused(converted.build_tok_params(MODEL_CONFIG), 9)
