"""The transformers + PEFT reference that LoRA application in the server is checked against.

Greedy decoding in float32 with the top-5 log-probabilities at each step; the comparison rule is
vLLM's own (tests/models/utils.py `check_logprobs_close`): tokens equal, or at the first divergence
each side's token is in the other's top-5, after which the sequences may differ. The tests use it, and so
does `loraplex verify` on a user's machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

TOP_K = 5


@dataclass(frozen=True)
class Greedy:
    """Token ids of a greedy continuation, and each step's top-k token ids."""

    tokens: list[int]
    top: list[set[int]]


class Reference:
    """A base model with several PEFT adapters, any one of them (or none) active at a time."""

    def __init__(self, model_dir: Path, adapters: dict[str, Path]) -> None:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        names = list(adapters)
        model = PeftModel.from_pretrained(base, adapters[names[0]], adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(adapters[name], adapter_name=name)
        self.model = model.eval()
        self._cache: dict[tuple[str | None, tuple[int, ...], int], Greedy] = {}

    def compose(
        self,
        name: str,
        method: str,
        adapters: dict[str, float],
        density: float | None = None,
        seed: int = 0,
    ) -> None:
        """Adds `name`, PEFT's `add_weighted_adapter` of loaded `adapters` (name: weight), seeded as the server's."""
        torch.manual_seed(seed)
        self.model.add_weighted_adapter(
            list(adapters), list(adapters.values()), name, combination_type=method, density=density
        )

    def chat_prompt(self, text: str) -> list[int]:
        ids: Any = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
        )
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

    def greedy(self, adapter: str | None, prompt: list[int], max_tokens: int) -> Greedy:
        key = (adapter, tuple(prompt), max_tokens)
        if key not in self._cache:
            self._cache[key] = self._greedy(adapter, prompt, max_tokens)
        return self._cache[key]

    @torch.no_grad()
    def _greedy(self, adapter: str | None, prompt: list[int], max_tokens: int) -> Greedy:
        if adapter is None:
            with self.model.disable_adapter():
                return self._decode(prompt, max_tokens)
        self.model.set_adapter(adapter)
        return self._decode(prompt, max_tokens)

    def _decode(self, prompt: list[int], max_tokens: int) -> Greedy:
        ids = torch.tensor([prompt])
        tokens: list[int] = []
        top: list[set[int]] = []
        past = None
        step_input = ids
        for _ in range(max_tokens):
            out = self.model(input_ids=step_input, past_key_values=past, use_cache=True)
            past = out.past_key_values
            logprobs = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
            top_ids = torch.topk(logprobs, TOP_K).indices.tolist()
            token = top_ids[0]
            tokens.append(token)
            top.append(set(top_ids))
            step_input = torch.tensor([[token]])
        return Greedy(tokens=tokens, top=top)


def served_greedy(choice: Any) -> Greedy:
    """A served completion choice (asked with `logprobs=5` and `return_tokens_as_token_ids`) as a `Greedy`: the
    openai SDK's object, or the choice's JSON."""

    def token_id(token: str) -> int:
        return int(token.removeprefix("token_id:"))

    logprobs = choice["logprobs"] if isinstance(choice, dict) else choice.logprobs
    tokens = logprobs["tokens"] if isinstance(logprobs, dict) else logprobs.tokens
    tops = logprobs["top_logprobs"] if isinstance(logprobs, dict) else logprobs.top_logprobs
    return Greedy(tokens=[token_id(t) for t in tokens], top=[{token_id(t) for t in step} for step in tops])


def divergence(reference: Greedy, served: Greedy) -> tuple[int | None, str | None]:
    """(first step where the tokens differ or None, what breaks vLLM's rule there or None when they are close)."""
    if len(served.tokens) != len(reference.tokens):
        return None, f"{len(served.tokens)} tokens served, {len(reference.tokens)} expected"
    for step, (want, got) in enumerate(zip(reference.tokens, served.tokens, strict=True)):
        if want != got:
            if got in reference.top[step] and want in served.top[step]:
                return step, None
            return step, (f"step {step}: reference {want} (top {sorted(reference.top[step])}) "
                          f"vs served {got} (top {sorted(served.top[step])})")  # fmt: skip
    return None, None


def assert_close(reference: Greedy, served: Greedy, context: str) -> None:
    """vLLM's rule: equal, or at the first divergence each token is in the other's top-5; then stop."""
    _, failure = divergence(reference, served)
    assert failure is None, f"{context}: {failure}"
