"""Composite adapters on the real stack (issue 17, item 1): each of PEFT's methods, registered and inline, serves
what transformers + PEFT's `add_weighted_adapter` of the same adapters computes (the project's top-5 rule), alone
and batched with plain adapters and the base; an inline composite is built once however many ask at once.

The shared stack keeps its registry in S3 (moto), so composites are stored there and read by the node's cache.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest

from serve.demo.reference import Greedy, Reference, assert_close, served_greedy
from tests.integration.conftest import Stack
from tests.integration.test_adapters import MAX_TOKENS, PROMPT, new_adapter, register

SEED = 5
METHODS = [
    ("cat", {"alpha": 0.8, "ext-qv": 0.6}, None),
    ("svd", {"alpha": 1.0, "ext-qv": -0.7}, None),
    ("linear", {"alpha": 0.7, "mate": 0.7}, None),
    ("ties", {"alpha": 1.0, "mate": 0.8}, 0.5),
    ("dare_linear", {"alpha": 1.0, "mate": 1.0}, 0.6),
    ("dare_ties", {"alpha": 0.9, "mate": 1.1}, 0.7),
]


@pytest.fixture(scope="module")
def composer(stack: Stack) -> Reference:
    """The reference with the components loaded and every method's composite added by PEFT, seeded as served."""
    mate = new_adapter(stack, "mate", seed=91)
    assert register(stack, "mate", str(mate)).status_code == 201
    reference = Reference(stack.model_dir, {"alpha": stack.adapters["alpha"], "ext-qv": stack.adapters["ext-qv"],
                                            "mate": mate})  # fmt: skip
    for method, weights, density in METHODS:
        reference.compose(f"mix-{method}", method, weights, density=density, seed=SEED)
    return reference


def compose_body(method: str, weights: dict[str, float], density: float | None) -> dict[str, object]:
    spec: dict[str, object] = {"method": method, "seed": SEED,
                               "adapters": [{"name": name, "weight": w} for name, w in weights.items()]}  # fmt: skip
    if density is not None:
        spec["density"] = density
    return spec


async def served(client: openai.AsyncOpenAI, model: str, prompt: list[int], **extra: object) -> Greedy:
    response = await client.completions.create(
        model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, logprobs=5,
        extra_body={"return_tokens_as_token_ids": True, "ignore_eos": True, **extra},
    )  # fmt: skip
    return served_greedy(response.choices[0])


@pytest.mark.parametrize(("method", "weights", "density"), METHODS)
async def test_each_registered_method_serves_what_peft_composes(
    async_client: openai.AsyncOpenAI, stack: Stack, composer: Reference, method: str, weights: dict[str, float],
    density: float | None,
) -> None:  # fmt: skip
    name = f"mix-{method}"
    created = httpx.post(f"{stack.base_url}/v1/adapters", timeout=300,
                         json={"name": name, "compose": compose_body(method, weights, density)})  # fmt: skip
    assert created.status_code == 201, created.text
    assert created.json()["source"].startswith("s3://"), "composites of an S3 registry are stored in S3"
    prompt = composer.chat_prompt(PROMPT)
    assert_close(composer.greedy(name, prompt, MAX_TOKENS), await served(async_client, name, prompt), name)


async def test_composites_batched_with_plain_adapters_and_the_base(
    async_client: openai.AsyncOpenAI, stack: Stack, composer: Reference
) -> None:
    for method, weights, density in METHODS:  # registered again: the same composite, no new version
        body = {"name": f"mix-{method}", "compose": compose_body(method, weights, density)}
        again = httpx.post(f"{stack.base_url}/v1/adapters", json=body, timeout=300)
        assert again.status_code == 201 and again.json()["version"] == 1, again.text
    prompts = [composer.chat_prompt(text) for text in (PROMPT, "Name three colours.", "What is 2 + 2?")]
    asked = [(model, prompt) for prompt in prompts
             for model in (*(f"mix-{method}" for method, _, _ in METHODS), "alpha", "mate", None)]  # fmt: skip
    results = await asyncio.gather(*(served(async_client, model or stack.model_id, p) for model, p in asked))
    for (model, prompt), got in zip(asked, results, strict=True):
        assert_close(composer.greedy(model, prompt, MAX_TOKENS), got, f"{model or 'base'} in a mixed batch")


def composite_builds(stack: Stack) -> float:
    for line in httpx.get(f"{stack.base_url}/metrics").text.splitlines():
        if line.startswith("loraplex_composite_builds_total "):
            return float(line.split()[1])
    raise AssertionError("no loraplex_composite_builds_total in /metrics")


async def test_an_inline_composite_is_built_once_under_concurrency_and_serves_what_peft_composes(
    async_client: openai.AsyncOpenAI, stack: Stack, composer: Reference
) -> None:
    # linear: built in a second where svd takes tens (PEFT's SVD of every module's delta, here and in the server), and
    # the test_each_registered_method case covers svd.
    weights = {"alpha": 0.5, "mate": 1.2}
    composer.compose("inline-linear", "linear", weights, seed=SEED)
    spec = compose_body("linear", weights, None)
    before = composite_builds(stack)
    prompt = composer.chat_prompt(PROMPT)
    results = await asyncio.gather(*(served(async_client, stack.model_id, prompt, compose=spec) for _ in range(6)))
    assert composite_builds(stack) == before + 1
    for got in results:
        assert_close(composer.greedy("inline-linear", prompt, MAX_TOKENS), got, "inline linear composite")
    listed = [a["name"] for a in httpx.get(f"{stack.base_url}/v1/adapters").json()["data"]]
    assert not any(name.startswith("~") for name in listed), "inline composites are not registered adapters"
    # Asked again later: cached, not built again.
    await served(async_client, stack.model_id, prompt, compose=spec)
    assert composite_builds(stack) == before + 1


def test_a_component_of_a_composite_cannot_be_removed_and_the_cli_composes(stack: Stack) -> None:
    refused = httpx.delete(f"{stack.base_url}/v1/adapters/mate")
    assert refused.status_code == 409 and "mix-linear" in refused.json()["error"]["message"]
    loraplex = str(Path(sys.executable).parent / "loraplex")
    command = [loraplex, "adapters", "compose", "cli-mix", "alpha=0.5", "ext-qv=0.5",
               "--method", "cat", "--url", stack.base_url]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{stack.model_id}:cli-mix v1 r=12"
    listing = subprocess.run([loraplex, "adapters", "list", "--url", stack.base_url],
                             capture_output=True, text=True, timeout=60)  # fmt: skip
    assert "cat(alpha*0.5, ext-qv*0.5)" in listing.stdout
