"""`router.max_prompt_tokens`: prompts longer than the operator allows are refused, counted exactly, on every route.

Only the engine replica holds the tokenizer and the chat template, so the limit is checked there, at
the point where vLLM itself checks a prompt against the context length: every vLLM request model
builds the `TokenizeParams` that validate its tokenized prompt (`build_tok_params`), and the request
models here build ones with one more check. The refusal is vLLM's own validation error (400, `param`
naming the API's prompt field), so it takes the same path to the client as every other invalid request,
before anything reaches the scheduler. Anthropic's Messages are served by converting them to a chat
request inside vLLM's Messages serving object; its copy here converts them to the capped chat model.
"""

from __future__ import annotations

import copy
import dataclasses
from functools import cache
from typing import Any

from pydantic import BaseModel


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


@dataclasses.dataclass(frozen=True)
class RequestModels:
    """vLLM's request models of each route, perhaps capped, and how the Messages route gets its capped chat model."""

    completion: type[BaseModel]
    chat: type[BaseModel]
    responses: type[BaseModel]
    tokenize: Any
    """The union of vLLM's two tokenizer request models (a prompt, or chat messages)."""
    capped: bool = False

    def messages_serving(self, serving: Any) -> Any:
        """vLLM's Messages serving object, or, with a limit, a copy whose converted chat requests are capped."""
        if not self.capped:
            return serving
        capped = copy.copy(serving)
        convert = serving.to_chat_completion_request
        chat = self.chat

        def to_capped_chat(request: Any, **options: Any) -> Any:
            converted = convert(request, **options)  # validated already: its values are copied as they are
            capped_request = chat.model_construct(_fields_set=converted.model_fields_set, **dict(converted))
            if converted.__pydantic_private__:
                capped_request.__pydantic_private__ = dict(converted.__pydantic_private__)
            return capped_request

        capped.to_chat_completion_request = to_capped_chat
        return capped


@cache
def request_models(limit: int | None) -> RequestModels:
    """vLLM's request models of every route, refusing prompts over `limit` tokens (None: vLLM's own)."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.entrypoints.openai.responses.protocol import ResponsesRequest
    from vllm.entrypoints.serve.tokenize.protocol import TokenizeRequest

    if limit is None:
        return RequestModels(CompletionRequest, ChatCompletionRequest, ResponsesRequest, TokenizeRequest)
    return _capped_models(limit)


def _capped_models(cap: int) -> RequestModels:
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.entrypoints.openai.responses.protocol import ResponsesRequest
    from vllm.entrypoints.serve.tokenize.protocol import TokenizeChatRequest, TokenizeCompletionRequest

    class CappedCompletionRequest(CompletionRequest):
        def build_tok_params(self, model_config: Any) -> Any:
            return _capped(super().build_tok_params(model_config), cap, "prompt")

    class CappedChatCompletionRequest(ChatCompletionRequest):
        def build_tok_params(self, model_config: Any) -> Any:
            return _capped(super().build_tok_params(model_config), cap, "messages")

    class CappedResponsesRequest(ResponsesRequest):
        def build_tok_params(self, model_config: Any) -> Any:
            return _capped(super().build_tok_params(model_config), cap, "input")

    class CappedTokenizeCompletionRequest(TokenizeCompletionRequest):
        def build_tok_params(self, model_config: Any) -> Any:
            return _capped(super().build_tok_params(model_config), cap, "prompt")

    class CappedTokenizeChatRequest(TokenizeChatRequest):
        def build_tok_params(self, model_config: Any) -> Any:
            return _capped(super().build_tok_params(model_config), cap, "messages")

    return RequestModels(
        CappedCompletionRequest,
        CappedChatCompletionRequest,
        CappedResponsesRequest,
        CappedTokenizeCompletionRequest | CappedTokenizeChatRequest,
        capped=True,
    )
