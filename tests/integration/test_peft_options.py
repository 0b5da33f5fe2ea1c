"""PEFT options served on the real stack: per-module rank and scale (rank_pattern, alpha_pattern), LoRA on
embed_tokens, a bias on LoRA's B (lora_bias) and DoRA's per-channel magnitudes (use_dora), the last two through
loraplex's vLLM plugin, each served in one batch with the base model and a plain adapter and checked against
transformers + PEFT under the project's top-5 rule; what would not be served faithfully is a 400 naming the field."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
from safetensors.torch import load_file, save_file

from serve.adapters.validation import DORA_OPTION, LORA_BIAS_OPTION
from serve.demo.option_adapters import ALL_LINEAR, make_peft_adapter
from serve.demo.reference import Greedy, Reference, assert_close, divergence, served_greedy
from tests.integration.conftest import Stack

MAX_TOKENS = 12
PROMPTS = ("What is the capital of France?", "Write a haiku about the sea.")
GREEDY = {"max_tokens": MAX_TOKENS, "temperature": 0, "logprobs": 5}
TOKEN_IDS = {"return_tokens_as_token_ids": True, "ignore_eos": True}
PLAIN = "ext-qv"
"""A plain adapter of the stack (tests/integration/conftest.py EXTERNAL_ADAPTERS)."""

OPTIONS = {
    # name: (LoraConfig settings, seed, the options its record lists)
    # v_proj above q_proj's rank: the packed q/k/v layer of vLLM says rank 8 (serve/cpu_lora.py adapter_rank).
    "opt-patterns": (
        {"r": 8, "lora_alpha": 16, "target_modules": ALL_LINEAR, "rank_pattern": {"v_proj": 16, "down_proj": 4},
         "alpha_pattern": {"v_proj": 8, "up_proj": 32}},
        81, ["rank_pattern: per-module rank", "alpha_pattern: per-module scale"],
    ),
    "opt-embed": (
        {"r": 8, "lora_alpha": 16, "target_modules": ["embed_tokens", "q_proj", "v_proj"]},
        82, ["embed_tokens: LoRA"],
    ),
    # Every linear layer of every block, packed (q/k/v, gate/up) and not (o, down), gains a bias on its adapter's rows.
    "opt-bias": (
        {"r": 8, "lora_alpha": 16, "target_modules": ALL_LINEAR, "lora_bias": True},
        83, [LORA_BIAS_OPTION],
    ),
    # DoRA on every linear layer, packed and not, its magnitudes moved off the row norms (`make_peft_adapter`).
    "opt-dora": (
        {"r": 8, "lora_alpha": 16, "target_modules": ALL_LINEAR, "use_dora": True},
        84, [DORA_OPTION],
    ),
}  # fmt: skip


def register(stack: Stack, name: str, source: Path) -> httpx.Response:
    return httpx.post(f"{stack.base_url}/v1/adapters", json={"name": name, "source": str(source)}, timeout=300)


@pytest.fixture(scope="module")
def option_adapters(stack: Stack) -> dict[str, Path]:
    folders = {}
    for name, (settings, seed, _) in OPTIONS.items():
        folders[name] = make_peft_adapter(stack.model_dir, stack.uploads / name, seed, **settings)
        created = register(stack, name, folders[name])
        assert created.status_code == 201, created.text
    return folders


@pytest.fixture(scope="module")
def option_reference(stack: Stack, option_adapters: dict[str, Path]) -> Reference:
    return Reference(stack.model_dir, {PLAIN: stack.adapters[PLAIN], **option_adapters})


@pytest.mark.parametrize("name", list(OPTIONS))
def test_the_adapter_record_lists_its_peft_options_and_how_they_are_served(
    stack: Stack, option_adapters: dict[str, Path], name: str
) -> None:
    record = httpx.get(f"{stack.base_url}/v1/adapters/{name}", timeout=30).json()
    assert record["options"] == OPTIONS[name][2], record


async def test_each_option_in_a_batch_with_base_and_a_plain_adapter_matches_peft(
    async_client: openai.AsyncOpenAI, stack: Stack, option_reference: Reference
) -> None:
    targets: list[str | None] = [None, PLAIN, *OPTIONS]
    jobs = [(adapter, option_reference.chat_prompt(text)) for adapter in targets for text in PROMPTS]

    async def run(adapter: str | None, prompt: list[int]) -> Greedy:
        model = stack.model_id if adapter is None else f"{stack.model_id}:{adapter}"
        response = await async_client.completions.create(model=model, prompt=prompt, extra_body=TOKEN_IDS, **GREEDY)
        return served_greedy(response.choices[0])

    served = await asyncio.gather(*(run(adapter, prompt) for adapter, prompt in jobs))
    for (adapter, prompt), got in zip(jobs, served, strict=True):
        want = option_reference.greedy(adapter, prompt, MAX_TOKENS)
        assert_close(want, got, f"{adapter or 'base'} in a batch with base, {PLAIN} and the PEFT options")


@pytest.mark.parametrize("name", list(OPTIONS))
def test_loraplex_verify_passes_on_each_option(stack: Stack, option_adapters: dict[str, Path], name: str,
                                               tmp_path: Path) -> None:  # fmt: skip
    """What a user runs to check an adapter they publish: `loraplex verify` (transformers + PEFT in the CLI's process,
    the server's answers, the top-5 rule, the files' hash against the served version); one prompt each."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS[1] + "\n")
    command = [str(Path(sys.executable).parent / "loraplex"), "verify", name, "--model", str(stack.model_dir),
               "--adapter", str(option_adapters[name]), "--prompts", str(prompts), "--tokens", str(MAX_TOKENS),
               "--url", stack.base_url]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "PASS: 1/1 prompts" in done.stdout and "FILES DIFFER" not in done.stdout, done.stdout


def without(folder: Path, dest: Path, config: dict[str, object], drop: str = "") -> Path:
    """A copy of adapter `folder` with `config` changed and the tensors whose names hold `drop` (if any) left out."""
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "adapter_config.json").write_bytes((folder / "adapter_config.json").read_bytes())
    set_config(dest, **config)
    tensors = load_file(folder / "adapter_model.safetensors")
    save_file({k: t for k, t in tensors.items() if not drop or drop not in k}, str(dest / "adapter_model.safetensors"))
    return dest


def test_what_the_options_change_shows_in_the_reference(
    stack: Stack, option_adapters: dict[str, Path], option_reference: Reference, tmp_path: Path
) -> None:
    """Guards the batch test: a server that dropped the per-module scales, the embedding LoRA, LoRA's biases or DoRA's
    magnitudes (serving it as plain LoRA), or applied none of the adapter, would answer differently from PEFT with the
    whole adapter."""
    no_embedding = {"target_modules": ["q_proj", "v_proj"]}
    stripped = Reference(stack.model_dir, {
        "opt-patterns": without(option_adapters["opt-patterns"], tmp_path / "a", {"alpha_pattern": {}}),
        "opt-embed": without(option_adapters["opt-embed"], tmp_path / "e", no_embedding, drop="embed_tokens"),
        "opt-bias": without(option_adapters["opt-bias"], tmp_path / "b", {"lora_bias": False}, drop="lora_B.bias"),
        "opt-dora": without(option_adapters["opt-dora"], tmp_path / "d", {"use_dora": False},
                            drop="lora_magnitude_vector"),
    })  # fmt: skip
    prompts = [option_reference.chat_prompt(text) for text in PROMPTS]
    for name in OPTIONS:
        full = [option_reference.greedy(name, prompt, MAX_TOKENS).tokens for prompt in prompts]
        assert full != [stripped.greedy(name, prompt, MAX_TOKENS).tokens for prompt in prompts], name
        assert full != [option_reference.greedy(None, prompt, MAX_TOKENS).tokens for prompt in prompts], name
    # Beyond the top-5 rule's tolerance: DoRA served as plain LoRA (its magnitudes dropped) would fail the batch test.
    failures = [divergence(option_reference.greedy("opt-dora", prompt, MAX_TOKENS), stripped.greedy(
        "opt-dora", prompt, MAX_TOKENS))[1] for prompt in prompts]  # fmt: skip
    assert any(failure is not None for failure in failures), failures


def set_config(folder: Path, **changes: object) -> None:
    settings = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**settings, **changes}))


def trained_embedding(folder: Path) -> None:
    tensors = load_file(folder / "adapter_model.safetensors")
    tensors["base_model.model.model.embed_tokens.base_layer.weight"][7].add_(1.0)
    save_file(tensors, str(folder / "adapter_model.safetensors"))


REFUSED = [
    # (name, LoraConfig settings, a change to the saved files, the field named in `param`, the reason)
    ("opt-tied-head", {"r": 8, "lora_alpha": 16, "target_modules": ["embed_tokens", "q_proj"],
                       "ensure_weight_tying": True},
     None, "ensure_weight_tying", "a LoRA on lm_head, which this base model ties to its embedding"),
    ("opt-trained-embedding", {"r": 8, "lora_alpha": 16, "target_modules": ["embed_tokens"]},
     trained_embedding, "target_modules", "differ from the base model's"),
    ("opt-bad-pattern", {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], "rank_pattern": {"q_proj": 4}},
     lambda f: set_config(f, rank_pattern={"q_proj": 8}), "rank_pattern", "has rank 4, but"),
    ("opt-bias-unset", {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], "lora_bias": True},
     lambda f: set_config(f, lora_bias=False), "lora_bias", "PEFT would ignore them"),
    ("opt-dora-embedding", {"r": 8, "lora_alpha": 16, "target_modules": ["embed_tokens", "q_proj"], "use_dora": True},
     None, "use_dora", "use_dora: DoRA on embed_tokens"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "settings", "change", "param", "reason"), REFUSED, ids=[c[0] for c in REFUSED])
def test_what_vllm_would_not_serve_faithfully_is_refused_naming_the_field_and_recorded_nowhere(
    client: openai.OpenAI, stack: Stack, name: str, settings: dict[str, object], change: object, param: str,
    reason: str,
) -> None:  # fmt: skip
    folder = make_peft_adapter(stack.model_dir, stack.uploads / name, seed=90, **settings)
    if change is not None:
        change(folder)  # type: ignore[operator]
    response = register(stack, name, folder)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and reason in error["message"], error
    assert httpx.get(f"{stack.base_url}/v1/adapters/{name}", timeout=30).status_code == 404
    assert not any(name in m.id for m in client.models.list())
