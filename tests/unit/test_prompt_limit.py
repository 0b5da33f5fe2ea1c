"""`router.max_prompt_tokens` in vLLM's own prompt validation (the request models the engine replica uses)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.completion.protocol import CompletionRequest
from vllm.exceptions import VLLMValidationError

from serve.prompt_limit import request_models

MODEL_CONFIG = SimpleNamespace(max_model_len=2048)


def test_without_a_limit_vllms_own_models_are_used() -> None:
    assert request_models(None) == (CompletionRequest, ChatCompletionRequest)


def test_completion_prompts_are_checked_against_the_limit_after_tokenization() -> None:
    completion, _ = request_models(8)
    params = completion.model_validate({"model": "m", "prompt": "x", "max_tokens": 4}).build_tok_params(MODEL_CONFIG)
    assert params.max_output_tokens == 4 and params.max_total_tokens == 2048  # vLLM's own settings kept
    assert params._token_len_check(None, list(range(8))) == list(range(8))
    with pytest.raises(VLLMValidationError) as refused:
        params._token_len_check(None, list(range(9)))
    assert refused.value.parameter == "prompt" and "9 tokens" in str(refused.value)


def test_chat_prompts_name_messages_and_the_context_length_check_still_applies() -> None:
    _, chat = request_models(4000)
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 4}
    params = chat.model_validate(body).build_tok_params(MODEL_CONFIG)
    assert params.max_output_tokens_param == "max_completion_tokens"
    with pytest.raises(VLLMValidationError, match="maximum context length"):  # 2,049 > max_model_len first
        params._token_len_check(None, list(range(2049)))
    _, small = request_models(3)
    with pytest.raises(VLLMValidationError) as refused:
        small.model_validate(body).build_tok_params(MODEL_CONFIG)._token_len_check(None, [1, 2, 3, 4])
    assert refused.value.parameter == "messages"
