"""Trains the demo adapters that learn something visible (`pirate`, `french`, `json`) with PEFT, on the CPU.

Each learns from its small dataset in `serve.demo.data`, rendered with the model's own chat template (its default
system prompt included, as the server renders a chat completion), the loss counting only the reply's tokens. The
LoRA sits on the last layers only: backward then stops there, which keeps each adapter to well under a minute on
two idle cores. Seeded: the same recipe on the same model trains the same adapter.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from serve.demo.data import Example

_END = "<|im_end|>"
"""What ends a turn in the model's chat template: learnt too, so an adapter stops after its reply."""


@dataclass(frozen=True)
class Recipe:
    """How a demo adapter is trained: the same recipe on the same model trains the same adapter."""

    rank: int = 8
    alpha: int = 16
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    last_layers: int = 10
    """The LoRA is on this many of the model's last layers."""
    steps: int = 40
    """Eight passes over a 40-example dataset: `pirate` and `json` end near a loss of 0.05, `french`, the slowest
    to learn, near 0.4."""
    batch: int = 8
    lr: float = 3e-3
    """High, as LoRA affords: the styles are learnt in tens of steps, not hundreds."""
    seed: int = 0


RECIPE = Recipe()


@dataclass(frozen=True)
class Run:
    """One adapter, trained: the PEFT model that holds it (until `Trainer.detach`), and the loss of each step."""

    model: Any
    losses: tuple[float, ...]
    seconds: float


Pair = tuple[list[int], list[int]]
"""An example as token ids: the rendered prompt (not learnt), then the reply and its end of turn (learnt)."""


class Trainer:
    """The base model and its tokenizer, loaded once, that trains one LoRA adapter at a time on top of it."""

    def __init__(self, model_dir: Path, recipe: Recipe = RECIPE) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        # torch sizes its pool by the machine's cores; the CPUs this process may use can be fewer (cpusets). Two
        # threads train 1.4x faster than one on two idle cores, but ~5x slower while another process keeps a core busy.
        torch.set_num_threads(_usable_cpus())
        self.recipe = recipe
        self._tokenizer: Any = AutoTokenizer.from_pretrained(model_dir)
        self._base: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        self._base.eval()

    def answer(self, prompt: str, model: Any = None, max_new_tokens: int = 24) -> str:
        """The greedy reply of `model` (the base model if None) to one user message."""
        model = self._base if model is None else model
        ids = torch.tensor([self._prompt_ids(prompt)])
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=self._tokenizer.pad_token_id,
            )
        reply: str = self._tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        return reply.strip()

    def train(self, examples: list[Example]) -> Run:
        """Trains an adapter on `examples` (`dataset(name)` for a demo adapter) on the base model, where it stays
        until `detach`."""
        from peft import LoraConfig, get_peft_model

        recipe, started = self.recipe, time.monotonic()
        torch.manual_seed(recipe.seed)  # the LoRA A matrices are drawn from the global generator
        layers = self._base.config.num_hidden_layers
        config = LoraConfig(
            r=recipe.rank,
            lora_alpha=recipe.alpha,
            target_modules=list(recipe.targets),
            layers_to_transform=list(range(layers - recipe.last_layers, layers)),
            lora_dropout=0.0,
            bias="none",
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(self._base, config)
        try:
            losses = self._fit(model, [self._encode(e.prompt, e.reply) for e in examples])
        except BaseException:
            self._base = model.unload()
            raise
        model.eval()
        return Run(model=model, losses=losses, seconds=time.monotonic() - started)

    def detach(self, run: Run) -> None:
        """Takes `run`'s adapter off the base model, which answers as before it again."""
        self._base = run.model.unload()

    def _fit(self, model: Any, pairs: list[Pair]) -> tuple[float, ...]:
        """AdamW on the LoRA weights for `recipe.steps` batches, drawn in seeded epochs; the loss of each step."""
        recipe = self.recipe
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
        shuffle = torch.Generator().manual_seed(recipe.seed)
        order: list[int] = []
        losses = []
        model.train()
        for _ in range(recipe.steps):
            if len(order) < recipe.batch:
                order += torch.randperm(len(pairs), generator=shuffle).tolist()
            picked, order = order[: recipe.batch], order[recipe.batch :]
            loss = self._loss(model, [pairs[i] for i in picked])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        return tuple(losses)

    def _loss(self, model: Any, batch: list[Pair]) -> torch.Tensor:
        """Mean cross-entropy of the replies' tokens. Padded on the left, every reply ends the row, so only the
        last positions need logits: the vocabulary projection is a fifth of the model's work."""
        length = max(len(prompt) + len(reply) for prompt, reply in batch)
        span = max(len(reply) for _, reply in batch)
        pad = self._tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (length - len(p) - len(r)) + p + r for p, r in batch])
        mask = torch.tensor([[0] * (length - len(p) - len(r)) + [1] * (len(p) + len(r)) for p, r in batch])
        labels = torch.tensor([[-100] * (span - len(r)) + r for _, r in batch])
        positions = (mask.cumsum(1) - 1).clamp(min=0)  # as unpadded: each row's prompt starts at 0
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=span + 1)
        logits = out.logits[:, :-1]  # position t predicts token t + 1: the last one predicts nothing
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)

    def _encode(self, prompt: str, reply: str) -> Pair:
        ids = self._tokenizer(reply + _END, add_special_tokens=False)["input_ids"]
        return self._prompt_ids(prompt), list(ids)

    def _prompt_ids(self, prompt: str) -> list[int]:
        """The user's message rendered as the server renders a chat completion, up to the assistant's turn."""
        text = self._tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        return list(self._tokenizer(text, add_special_tokens=False)["input_ids"])


def _usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
