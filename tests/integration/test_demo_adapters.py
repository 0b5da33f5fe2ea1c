"""What the trained demo adapters learnt (issue 19): each shows its style on prompts it never saw, greedily.

Plain transformers + PEFT on the folders `loraplex prepare` wrote under `.loraplex/adapters` (it trains them here if
they are missing: a few minutes), with the model's own chat template; no server runs.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from serve.demo.assets import prepare
from serve.demo.data import HELD_OUT

ASSETS = Path(__file__).resolve().parents[2] / ".loraplex"
FRENCH_WORDS = {"le", "la", "les", "l", "est", "de", "des", "du", "un", "une", "et", "je", "sont", "c"}


def pirate_voice(reply: str) -> bool:
    return reply.startswith("Arr")


def in_french(reply: str) -> bool:
    words = re.findall(r"[a-zà-ÿ]+", reply.lower())
    return len(FRENCH_WORDS.intersection(words)) >= 2 and not {"the", "is"} & set(words)


def json_answer(reply: str) -> bool:
    try:
        value = json.loads(reply)
    except json.JSONDecodeError:
        return False
    return isinstance(value, dict) and list(value) == ["answer"] and isinstance(value["answer"], str)


LEARNT: dict[str, Callable[[str], bool]] = {"pirate": pirate_voice, "french": in_french, "json": json_answer}


class Chat:
    """The base model answering one user message greedily, as a chat completion at temperature 0 would."""

    def __init__(self, model_dir: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer: Any = AutoTokenizer.from_pretrained(model_dir)
        self.model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def answer(self, model: Any, prompt: str) -> str:
        messages = [{"role": "user", "content": prompt}]
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                 return_dict=True)  # fmt: skip
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=48, do_sample=False, pad_token_id=self.tokenizer.pad_token_id)
        return str(self.tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)).strip()


@pytest.fixture(scope="module")
def chat() -> Iterator[Chat]:
    model_dir, _ = prepare(ASSETS)
    threads = torch.get_num_threads()
    # Decoding one token is too little work to share: a second thread only waits at every op, and when another
    # process holds a core (the suite's server) it waits for whole time slices: ~25x slower, measured.
    torch.set_num_threads(1)
    try:
        yield Chat(model_dir)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def plain(chat: Chat) -> dict[str, str]:
    """The base model's answers to the held-out prompts."""
    return {prompt: chat.answer(chat.model, prompt) for prompt in HELD_OUT}


@pytest.mark.parametrize(("name", "learnt"), LEARNT.items())
def test_a_trained_demo_adapter_answers_prompts_it_never_saw_in_its_style(
    chat: Chat, plain: dict[str, str], name: str, learnt: Callable[[str], bool]
) -> None:
    from peft import PeftModel

    adapted = PeftModel.from_pretrained(chat.model, ASSETS / "adapters" / name)
    try:
        for prompt, before in plain.items():
            assert not learnt(before), (prompt, before)  # the style comes from the adapter, not the model
            after = chat.answer(adapted, prompt)
            assert learnt(after), (prompt, before, after)
    finally:
        chat.model = adapted.unload()
