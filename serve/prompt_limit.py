"""`router.max_prompt_tokens`: prompts longer than the operator allows are refused, counted exactly.

Only the engine replica holds the tokenizer and the chat template, so the limit is checked there, at
the point where vLLM itself checks a prompt against the context length: vLLM's request models build
the `TokenizeParams` that validate every tokenized prompt, and the request models here build ones
with one more check. The refusal is vLLM's own validation error (400, `param: prompt`), so it takes
the same path to the client as every other invalid request, before anything reaches the scheduler.
"""

from __future__ import annotations

import dataclasses
from functools import cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest


@cache
def _capped_params_class() -> type:
    from vllm.exceptions import VLLMValidationError
    from vllm.renderers.params import TokenizeParams

    @dataclasses.dataclass(frozen=True)
    class CappedTokenizeParams(TokenizeParams):
        max_prompt_tokens: int | None = None
        prompt_param: str = "prompt"

        def _token_len_check(self, tokenizer: Any, tokens: Any) -> Any:
            tokens = super()._token_len_check(tokenizer, tokens)
            if self.max_prompt_tokens is not None and len(tokens) > self.max_prompt_tokens:
                raise VLLMValidationError(
                    f"Your prompt has {len(tokens)} tokens; this server accepts at most {self.max_prompt_tokens} "
                    "per prompt. Please shorten the prompt.",
                    parameter=self.prompt_param,
                    value=len(tokens),
                )
            return tokens

    return CappedTokenizeParams


def _capped(params: Any, limit: int, prompt_param: str) -> Any:
    fields = {f.name: getattr(params, f.name) for f in dataclasses.fields(params) if f.init}
    return _capped_params_class()(**fields, max_prompt_tokens=limit, prompt_param=prompt_param)


@cache
def request_models(limit: int | None) -> tuple[type[CompletionRequest], type[ChatCompletionRequest]]:
    """vLLM's completion and chat request models, refusing prompts over `limit` tokens (None: vLLM's own)."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    if limit is None:
        return CompletionRequest, ChatCompletionRequest
    cap: int = limit

    class CappedCompletionRequest(CompletionRequest):
        def build_tok_params(self, model_config: Any) -> Any:
            return _capped(super().build_tok_params(model_config), cap, "prompt")

    class CappedChatCompletionRequest(ChatCompletionRequest):
        def build_tok_params(self, model_config: Any) -> Any:
            return _capped(super().build_tok_params(model_config), cap, "messages")

    return CappedCompletionRequest, CappedChatCompletionRequest
