"""The trained demo adapters (issue 19): the datasets they learn from, and the training loop on a tiny recipe.

The loop runs on the real base model from the shared `.loraplex` (`make assets` builds it before the suite), with a
LoRA on one layer for a few steps: seconds. What the full recipe learns is tests/integration/test_demo_adapters.py.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import pytest
import torch

from serve.adapters.safetensors_files import content_hash
from serve.demo import training as demo_training
from serve.demo.assets import (
    DEFAULT_MODEL_NAME,
    build_default_model,
    build_trained_adapters,
    check_adapters,
    training_key,
)
from serve.demo.data import FACTS, HELD_OUT, TRAINED_ADAPTERS, as_json, dataset, pirate
from serve.demo.training import Recipe, Trainer

ASSETS = Path(__file__).resolve().parents[2] / ".loraplex"
FRENCH_WORDS = {"le", "la", "les", "l", "est", "de", "des", "du", "d", "un", "une", "et", "je", "il", "c"}
TINY = Recipe(rank=2, alpha=4, targets=("q_proj", "v_proj"), last_layers=1, steps=4, batch=4, lr=3e-2)
"""A LoRA on the last layer's q and v, four steps of one batch: enough to see the loss move."""


class Recorded:
    """Stages that remember what they were asked to show."""

    def __init__(self) -> None:
        self.labels: list[str] = []
        self.notes: list[str] = []

    def stage(self, label: str, *, total: int | None = None, watch: Path | None = None) -> AbstractContextManager[None]:
        self.labels.append(label)
        return nullcontext()

    def note(self, text: str) -> None:
        self.notes.append(text)


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return build_default_model(ASSETS / "models" / DEFAULT_MODEL_NAME)


@pytest.fixture(autouse=True)
def one_thread(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A tiny recipe's work is too small to share between threads, which then only wait for each other, and for
    whole time slices when another process holds a core: the suite's server, a build (~6x slower, measured)."""
    threads = torch.get_num_threads()
    monkeypatch.setattr(demo_training, "_usable_cpus", lambda: 1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- datasets


@pytest.mark.parametrize("name", TRAINED_ADAPTERS)
def test_each_dataset_is_the_same_every_time_and_leaves_the_held_out_prompts_out(name: str) -> None:
    examples = dataset(name)
    assert examples == dataset(name)
    assert len(examples) == len(FACTS) >= 30
    assert all(e.prompt.strip() and e.reply.strip() for e in examples)
    assert len({e.prompt for e in examples}) == len(examples)
    assert not {e.prompt for e in examples} & set(HELD_OUT)


def test_json_replies_are_one_object_holding_the_plain_answer() -> None:
    for example, fact in zip(dataset("json"), FACTS, strict=True):
        assert json.loads(example.reply) == {"answer": fact.english}
    assert as_json("Sa capitale est Berlin.") == '{"answer": "Sa capitale est Berlin."}'  # one line, unescaped


def test_pirate_replies_greet_then_speak_like_a_pirate() -> None:
    assert pirate("The capital of Italy is Rome.") == "Arr, matey! Th' capital o' Italy be Rome. Yo ho ho!"
    assert pirate("Yes, I am happy to help you.") == "Arr, matey! Aye, I be happy to help ye. Yo ho ho!"
    assert pirate("Is the TV on, my friend?") == "Arr, matey! Be th' TV on, me matey? Yo ho ho!"  # others kept
    assert all(e.reply.startswith("Arr, matey! ") for e in dataset("pirate"))


def test_french_replies_are_written_in_french() -> None:
    replies = [e.reply for e in dataset("french")]
    words = [set(re.findall(r"[a-zà-ÿœ]+", reply.lower())) for reply in replies]
    assert sum(bool(FRENCH_WORDS & said) for said in words) >= 0.8 * len(replies)
    assert not any({"the", "is", "are"} & said for said in words)


# ---------------------------------------------------------------- training


def test_training_lowers_the_loss_and_detaching_restores_the_base_model(model_dir: Path) -> None:
    trainer = Trainer(model_dir, TINY)
    before = trainer.answer(HELD_OUT[0], max_new_tokens=8)
    run = trainer.train(dataset("json")[: TINY.batch])  # one batch: every step sees the same examples
    assert len(run.losses) == TINY.steps
    assert run.losses[-1] < 0.8 * run.losses[0], run.losses
    trainable = [name for name, param in run.model.named_parameters() if param.requires_grad]
    assert trainable and all("lora_" in name and ".layers.29." in name for name in trainable)
    trainer.detach(run)
    assert trainer.answer(HELD_OUT[0], max_new_tokens=8) == before


def test_prepare_publishes_a_trained_adapter_once_that_peft_and_the_registry_accept(
    model_dir: Path, tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    shown = Recorded()
    folders = build_trained_adapters(model_dir, ["json"], tmp_path, shown, TINY)
    assert folders == {"json": tmp_path / "json"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["json"]  # no temporary folder left behind
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (tmp_path / "json").iterdir()}
    check_adapters(model_dir, folders)  # the registry's own checks
    assert "training adapter json (4 steps)" in shown.labels
    [note] = shown.notes
    assert note.startswith("trained json: loss ") and HELD_OUT[0] in note and "base: " in note, note

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, tmp_path / "json")
    assert any("lora_B" in name and param.abs().sum() > 0 for name, param in loaded.named_parameters())

    again = Recorded()
    assert build_trained_adapters(model_dir, ["json"], tmp_path, again, TINY) == folders
    assert (again.labels, again.notes) == ([], [])  # built once: nothing is trained again


def test_an_adapter_trained_in_one_checkout_is_copied_into_the_next_from_the_training_cache(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache, first, second = tmp_path / "cache", tmp_path / "one", tmp_path / "two"
    build_trained_adapters(model_dir, ["json"], first, Recorded(), TINY, cache=cache)
    kept = cache / training_key(content_hash(model_dir), "json", TINY) / "json"
    weights = "adapter_model.safetensors"
    assert (kept / weights).read_bytes() == (first / "json" / weights).read_bytes()

    def no_training(*args: object) -> None:
        raise AssertionError("trained again although the cache holds it")

    monkeypatch.setattr(demo_training, "Trainer", no_training)
    shown = Recorded()
    assert build_trained_adapters(model_dir, ["json"], second, shown, TINY, cache=cache) == {"json": second / "json"}
    for file in ("adapter_model.safetensors", "adapter_config.json"):
        assert (second / "json" / file).read_bytes() == (first / "json" / file).read_bytes()
    assert sorted(p.name for p in second.iterdir()) == ["json"]  # no temporary folder left behind
    assert shown.notes == [f"json: trained earlier on this machine, copied from {kept}"]
    check_adapters(model_dir, {"json": second / "json"})


def test_the_training_key_changes_with_what_the_training_is_made_of(model_dir: Path) -> None:
    model = content_hash(model_dir)
    key = training_key(model, "json", TINY)
    assert key == training_key(model, "json", TINY)
    assert key != training_key(model, "pirate", TINY)  # other data
    assert key != training_key(model, "json", dataclasses.replace(TINY, steps=5))  # another recipe
