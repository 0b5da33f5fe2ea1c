"""Rolling out a new version on the real stack (issue 17, item 3): a 90/10 split measured over 400 requests, each
version serving its own weights (against transformers + PEFT), sticky per `user`, /metrics by version, the split
kept across a restart of the registry, promote and rollback by API and CLI."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections import Counter
from pathlib import Path

import httpx
import openai

from routing.rollout_choice import user_point
from serve.demo.reference import Greedy, Reference, assert_close, served_greedy
from tests.integration.conftest import Stack, restart_the_registry_and_check_its_records
from tests.integration.test_adapters import MAX_TOKENS, PROMPT, new_adapter, register

REQUESTS = 400


def served(client: openai.OpenAI, model: str, prompt: list[int], user: str | None = None) -> Greedy:
    response = client.completions.create(
        model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, logprobs=5, user=user or openai.NOT_GIVEN,
        extra_body={"return_tokens_as_token_ids": True, "ignore_eos": True},
    )  # fmt: skip
    return served_greedy(response.choices[0])


def rollout_counts(stack: Stack, name: str) -> dict[str, float]:
    counts: dict[str, float] = {}
    for line in httpx.get(f"{stack.base_url}/metrics").text.splitlines():
        if line.startswith("loraplex_rollout_requests_total{") and f'model="{stack.model_id}:{name}"' in line:
            version = line.split('version="', 1)[1].split('"', 1)[0]
            counts[version] = counts.get(version, 0.0) + float(line.rsplit(" ", 1)[1])
    return counts


async def test_a_ninety_ten_rollout_splits_serves_each_version_and_is_promoted(
    async_client: openai.AsyncOpenAI, client: openai.OpenAI, stack: Stack
) -> None:
    old, new = new_adapter(stack, "support-v1", seed=61), new_adapter(stack, "support-v2", seed=62)
    assert register(stack, "support", str(old)).status_code == 201
    started = httpx.post(f"{stack.base_url}/v1/adapters/support/rollout", json={"source": str(new), "percent": 10},
                         timeout=120)  # fmt: skip
    assert started.status_code == 201, started.text
    canary_model = f"{stack.model_id}:support@v2"

    gate = asyncio.Semaphore(16)

    async def one() -> str:
        async with gate:
            response = await async_client.completions.create(model="support", prompt="Hi", max_tokens=1)
            return response.model

    models = Counter(await asyncio.gather(*(one() for _ in range(REQUESTS))))
    assert models.keys() <= {f"{stack.model_id}:support", canary_model}
    share = models[canary_model] / REQUESTS
    assert abs(share - 0.10) <= 0.05, f"{models[canary_model]} of {REQUESTS} went to v2"
    assert rollout_counts(stack, "support") == {"1": REQUESTS - models[canary_model], "2": models[canary_model]}

    # Each version serves its own weights; a user keeps theirs.
    reference = Reference(stack.model_dir, {"v1": old, "v2": new})
    prompt = reference.chat_prompt(PROMPT)
    on_new = next(f"user-{i}" for i in range(1000) if user_point("support", 2, f"user-{i}") < 10)
    on_old = next(f"user-{i}" for i in range(1000) if user_point("support", 2, f"user-{i}") >= 10)
    for user, version in ((on_new, "v2"), (on_old, "v1")):
        got = [served(client, "support", prompt, user=user) for _ in range(3)]
        for greedy in got:
            assert_close(reference.greedy(version, prompt, MAX_TOKENS), greedy, f"{user} on {version}")

    # The split is the registry's: it survives the registry's restart.
    restart_the_registry_and_check_its_records(stack.base_url, str(new_adapter(stack, "after", seed=63)))
    card = httpx.get(f"{stack.base_url}/v1/adapters/support").json()
    assert (card["version"], card["canary"]["version"], card["canary_percent"]) == (1, 2, 10)

    loraplex = str(Path(sys.executable).parent / "loraplex")
    for command, shown in ((["split", "support", "50"], "v1 50% / v2 50%"), (["promote", "support"], "v2 100%")):
        done = subprocess.run([loraplex, "adapters", *command, "--url", stack.base_url], capture_output=True,
                              text=True, timeout=120)  # fmt: skip
        assert done.returncode == 0 and done.stdout.strip() == f"{stack.model_id}:support\t{shown}", done.stderr
    after = {(await async_client.completions.create(model="support", prompt="Hi", max_tokens=1)).model
             for _ in range(10)}  # fmt: skip
    assert after == {f"{stack.model_id}:support"}
    assert_close(reference.greedy("v2", prompt, MAX_TOKENS), served(client, "support", prompt), "promoted v2")


def test_a_rollout_is_rolled_back(client: openai.OpenAI, stack: Stack) -> None:
    old, bad = new_adapter(stack, "faq-v1", seed=64), new_adapter(stack, "faq-v2", seed=65)
    assert register(stack, "faq", str(old)).status_code == 201
    body = {"source": str(bad), "percent": 100}
    assert httpx.post(f"{stack.base_url}/v1/adapters/faq/rollout", json=body, timeout=120).status_code == 201
    assert client.completions.create(model="faq", prompt="Hi", max_tokens=1).model == f"{stack.model_id}:faq@v2"
    rolled_back = httpx.post(f"{stack.base_url}/v1/adapters/faq/rollback", timeout=60)
    assert rolled_back.status_code == 200 and rolled_back.json()["canary"] is None
    reference = Reference(stack.model_dir, {"v1": old})
    prompt = reference.chat_prompt(PROMPT)
    assert_close(reference.greedy("v1", prompt, MAX_TOKENS), served(client, "faq", prompt), "after the rollback")
