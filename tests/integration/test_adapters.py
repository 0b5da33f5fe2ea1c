"""Adapter lifecycle on the real stack: register from a folder and from S3, use at once, replace, unregister."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import boto3
import httpx
import openai
import pytest
import torch
from safetensors.torch import load_file, save_file

from serve.adapters.safetensors_files import NO_OP_WARNING
from serve.demo.reference import Greedy, Reference, assert_close, served_greedy
from tests.integration.conftest import (
    EXTERNAL_ADAPTERS,
    REGISTRY_BUCKET,
    S3_KEYS,
    ExternalAdapter,
    Stack,
    make_adapter,
    restart_the_registry_and_check_its_records,
)

MAX_TOKENS = 10
PROMPT = "Write a haiku about the sea."


def served(client: openai.OpenAI, model: str, prompt: list[int]) -> Greedy:
    response = client.completions.create(
        model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, logprobs=5,
        extra_body={"return_tokens_as_token_ids": True, "ignore_eos": True},
    )  # fmt: skip
    return served_greedy(response.choices[0])


def expect(stack: Stack, folder: Path, prompt_text: str = PROMPT) -> tuple[list[int], Greedy]:
    reference = Reference(stack.model_dir, {"x": folder})
    prompt = reference.chat_prompt(prompt_text)
    return prompt, reference.greedy("x", prompt, MAX_TOKENS)


def register(stack: Stack, name: str, source: str) -> httpx.Response:
    return httpx.post(f"{stack.base_url}/v1/adapters", json={"name": name, "source": source}, timeout=120)


def new_adapter(stack: Stack, name: str, seed: int, rank: int = 8) -> Path:
    spec = ExternalAdapter(name, rank=rank, alpha=2 * rank, targets=EXTERNAL_ADAPTERS[1].targets, seed=seed, scale=0.3)
    return make_adapter(stack.model_dir, spec, stack.uploads / f"{name}-{seed}")


def test_register_local_folder_and_use_at_once(client: openai.OpenAI, stack: Stack) -> None:
    folder = new_adapter(stack, "fresh", seed=21)
    created = register(stack, "fresh", str(folder))
    assert created.status_code == 201, created.text
    assert f"{stack.model_id}:fresh" in {m.id for m in client.models.list()}
    prompt, want = expect(stack, folder)
    assert_close(want, served(client, "fresh", prompt), "registered from a local folder")


def test_register_from_s3_and_use(client: openai.OpenAI, stack: Stack) -> None:
    folder = new_adapter(stack, "from-s3", seed=22)
    s3 = boto3.client("s3", endpoint_url=stack.s3_url, region_name="us-east-1",
                      aws_access_key_id=S3_KEYS["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=S3_KEYS["AWS_SECRET_ACCESS_KEY"])  # fmt: skip
    s3.create_bucket(Bucket="adapters")
    for file in folder.iterdir():
        s3.upload_file(str(file), "adapters", f"team/from-s3/{file.name}")
    created = register(stack, "from-s3", "s3://adapters/team/from-s3")
    assert created.status_code == 201, created.text
    prompt, want = expect(stack, folder)
    assert_close(want, served(client, f"{stack.model_id}:from-s3", prompt), "registered from S3")


def test_new_version_replaces_weights_everywhere(client: openai.OpenAI, stack: Stack) -> None:
    first, second = new_adapter(stack, "ver", seed=31), new_adapter(stack, "ver", seed=32)
    assert register(stack, "ver", str(first)).json()["version"] == 1
    prompt, want_first = expect(stack, first)
    assert_close(want_first, served(client, "ver", prompt), "version 1")
    assert register(stack, "ver", str(second)).json()["version"] == 2
    _, want_second = expect(stack, second)
    assert want_second.tokens != want_first.tokens
    assert_close(want_second, served(client, "ver", prompt), "version 2")


def test_loraplex_verify_passes_on_the_served_version_and_fails_on_another(stack: Stack) -> None:
    """`loraplex verify` (issue 17): transformers + PEFT here against the server, the project's top-5 rule."""
    first, second = new_adapter(stack, "checked", seed=51), new_adapter(stack, "checked", seed=52)
    assert register(stack, "checked", str(first)).status_code == 201
    loraplex = str(Path(sys.executable).parent / "loraplex")
    command = [loraplex, "verify", "checked", "--model", str(stack.model_dir), "--url", stack.base_url, "--tokens", "8"]
    from_source = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert from_source.returncode == 2 and "pass --adapter FOLDER" in from_source.stderr  # the server's path: not read
    passed = subprocess.run([*command, "--adapter", str(first)], capture_output=True, text=True, timeout=600)
    assert passed.returncode == 0, passed.stdout + passed.stderr
    assert "PASS: 4/4 prompts" in passed.stdout and "version 1" in passed.stdout

    assert register(stack, "checked", str(second)).json()["version"] == 2
    failed = subprocess.run([*command, "--adapter", str(first)], capture_output=True, text=True, timeout=600)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "version 2" in failed.stdout and "FILES DIFFER" in failed.stdout and "FAIL:" in failed.stdout

    missing = subprocess.run([*command[:2], "nothing-here", *command[3:]], capture_output=True, text=True, timeout=600)
    assert missing.returncode == 2 and "does not exist" in missing.stderr, missing.stderr


def test_an_untrained_adapter_is_registered_with_a_warning_shown_by_the_api_and_cli(
    client: openai.OpenAI, stack: Stack
) -> None:
    """lora_B all zero (as PEFT initializes it): servable, but it answers as the base does, so it says so."""
    spec = ExternalAdapter("untrained", rank=8, alpha=16, targets=("q_proj", "v_proj"), seed=61, scale=0.0)
    created = register(stack, "untrained", str(make_adapter(stack.model_dir, spec, stack.uploads / "untrained")))
    assert created.status_code == 201, created.text
    assert created.json()["warnings"] == [NO_OP_WARNING]
    assert httpx.get(f"{stack.base_url}/v1/adapters/untrained").json()["warnings"] == [NO_OP_WARNING]
    listed = subprocess.run([str(Path(sys.executable).parent / "loraplex"), "adapters", "list", "--url",
                             stack.base_url], capture_output=True, text=True, timeout=120)  # fmt: skip
    lines = listed.stdout.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith(f"{stack.model_id}:untrained\t"))
    assert lines[at + 1] == f"  warning: {NO_OP_WARNING}"
    from transformers import AutoTokenizer

    prompt = list(AutoTokenizer.from_pretrained(stack.model_dir)(PROMPT)["input_ids"])
    assert served(client, "untrained", prompt).tokens == served(client, stack.model_id, prompt).tokens


def test_unregister_then_404_while_others_keep_answering(client: openai.OpenAI, stack: Stack) -> None:
    assert register(stack, "brief", str(new_adapter(stack, "brief", seed=41))).status_code == 201
    assert client.completions.create(model="brief", prompt="Hi", max_tokens=2).choices
    assert httpx.delete(f"{stack.base_url}/v1/adapters/brief").status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="brief", prompt="Hi", max_tokens=2)
    assert stack.model_id + ":brief" not in {m.id for m in client.models.list()}
    assert client.completions.create(model="alpha", prompt="Hi", max_tokens=2).choices


def damaged(stack: Stack, name: str, change: str) -> str:
    folder = new_adapter(stack, name, seed=51)
    weights = folder / "adapter_model.safetensors"
    if change == "no-config":
        (folder / "adapter_config.json").unlink()
    elif change == "pickled":
        (folder / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")
    elif change == "wrong-base":
        tensors = load_file(weights)
        save_file({key: torch.zeros(t.shape[0], t.shape[1] + 1) for key, t in tensors.items()}, str(weights))
    elif change == "too-big-rank":
        folder = new_adapter(stack, name, seed=52, rank=128)
    return str(folder)


@pytest.mark.parametrize(
    ("name", "change", "reason"),
    [
        ("bad-config", "no-config", "adapter_config.json is missing"),
        ("bad-pickle", "pickled", "pickled weights"),
        ("bad-base", "wrong-base", "wrong base model"),
        ("bad-rank", "too-big-rank", "max_lora_rank"),
        ("bad/name", "none", "must match"),
    ],
)
def test_malformed_adapters_are_refused_and_nothing_is_registered(
    client: openai.OpenAI, stack: Stack, name: str, change: str, reason: str
) -> None:
    response = register(stack, name, damaged(stack, name.replace("/", "-"), change))
    assert response.status_code == 400, response.text
    assert reason in response.json()["error"]["message"]
    assert not any(name in m.id for m in client.models.list())
    assert client.completions.create(model="alpha", prompt="Hi", max_tokens=2).choices


@pytest.mark.parametrize(
    ("source", "reason"),
    [("/etc", "outside the allowed adapter roots"), ("s3://adapters/nothing-here", "nothing at")],
)
def test_unreachable_or_forbidden_sources_are_refused(stack: Stack, source: str, reason: str) -> None:
    response = register(stack, "nowhere", source)
    assert response.status_code == 400 and reason in response.json()["error"]["message"]


def test_vllm_load_unload_endpoints_and_cli(stack: Stack) -> None:
    folder = new_adapter(stack, "compat", seed=61)
    body = {"lora_name": "compat", "lora_path": str(folder)}
    loaded = httpx.post(f"{stack.base_url}/v1/load_lora_adapter", json=body, timeout=120)
    assert loaded.status_code == 200 and "added successfully" in loaded.text
    cli = [str(Path(sys.executable).parent / "loraplex"), "adapters"]
    listing = subprocess.run([*cli, "list", "--url", stack.base_url], capture_output=True, text=True, check=True)
    assert f"{stack.model_id}:compat" in listing.stdout
    removed = subprocess.run(
        [*cli, "rm", "compat", "--url", stack.base_url], capture_output=True, text=True, check=True
    )
    assert "removed" in removed.stdout
    again = subprocess.run([*cli, "rm", "compat", "--url", stack.base_url], capture_output=True, text=True)
    assert again.returncode == 1 and "404" in again.stderr
    added = subprocess.run([*cli, "add", "compat2", str(folder), "--url", stack.base_url], capture_output=True,
                           text=True, check=True)  # fmt: skip
    assert "v1" in added.stdout
    unloaded = httpx.post(f"{stack.base_url}/v1/unload_lora_adapter", json={"lora_name": "compat2"})
    assert unloaded.status_code == 200


async def test_base_is_untouched_when_every_engine_slot_holds_an_adapter(
    async_client: openai.AsyncOpenAI, client: openai.OpenAI, stack: Stack, reference: Reference
) -> None:
    """vLLM 0.32.0 on CPU applied the last slot's adapter to base tokens; serve/vllm_patches.py fixes it."""
    names = [f"slot{i}" for i in range(5)]  # more than the stack's max_loras (4): every slot ends up occupied
    for i, name in enumerate(names):
        assert register(stack, name, str(new_adapter(stack, name, seed=70 + i))).status_code == 201
        client.completions.create(model=name, prompt="Hi", max_tokens=2)
    prompt = reference.chat_prompt(PROMPT)
    want = reference.greedy(None, prompt, MAX_TOKENS)

    async def base() -> Greedy:
        response = await async_client.completions.create(
            model=stack.model_id, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, logprobs=5,
            extra_body={"return_tokens_as_token_ids": True, "ignore_eos": True},
        )  # fmt: skip
        return served_greedy(response.choices[0])

    async def adapter(name: str) -> None:
        await async_client.completions.create(model=name, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)

    results = await asyncio.gather(base(), *(adapter(n) for n in names[-4:]), base())
    for got in (results[0], results[-1]):
        assert_close(want, got, "base batched with adapters in every slot")


def replica_counter(stack: Stack, name: str) -> float:
    """Sum over replicas of a replica-reported series, as the router's /metrics shows it."""
    total = 0.0
    for line in httpx.get(f"{stack.base_url}/metrics").text.splitlines():
        if line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def wait_for_reports(stack: Stack, name: str, at_least: float) -> float:
    deadline = time.monotonic() + 20
    while (value := replica_counter(stack, name)) < at_least and time.monotonic() < deadline:
        time.sleep(1)  # replicas report every 2 s
    return value


async def test_concurrent_first_requests_load_once_and_metrics_show_it(
    async_client: openai.AsyncOpenAI, stack: Stack
) -> None:
    time.sleep(3)  # let reports of earlier tests' loads arrive first
    loads_before = wait_for_reports(stack, "loraplex_adapter_load_seconds_count", 1)
    assert register(stack, "burst", str(new_adapter(stack, "burst", seed=81))).status_code == 201
    await asyncio.gather(*(async_client.completions.create(model="burst", prompt="Hi", max_tokens=2) for _ in range(6)))
    loads_after = wait_for_reports(stack, "loraplex_adapter_load_seconds_count", loads_before + 1)
    time.sleep(3)  # one more report, in case a second load were still being counted
    assert replica_counter(stack, "loraplex_adapter_load_seconds_count") == loads_before + 1 == loads_after
    text = httpx.get(f"{stack.base_url}/metrics").text
    registered = len(httpx.get(f"{stack.base_url}/v1/adapters").json()["data"])
    assert f"loraplex_registry_adapters {float(registered)}" in text
    assert replica_counter(stack, "loraplex_adapter_cache_misses_total") >= 1
    assert replica_counter(stack, "loraplex_replica_adapters_loaded") >= 1


def test_a_registered_adapter_reaches_the_nodes_cache_before_any_request_asks_for_it(
    client: openai.OpenAI, stack: Stack
) -> None:
    """Its first request then finds the copy fetched and hash-checked (issue 33, item 2)."""
    from serve.adapters.safetensors_files import content_hash

    staged_before = replica_counter(stack, "loraplex_adapter_staged_total")
    folder = new_adapter(stack, "ahead", seed=97)
    assert register(stack, "ahead", str(folder)).status_code == 201
    cached = stack.log.parent / "adapter-cache" / content_hash(folder)
    deadline = time.monotonic() + 30
    while not cached.is_dir() and time.monotonic() < deadline:
        time.sleep(0.5)  # the replica sees the registration at its next registry poll (2 s)
    assert cached.is_dir(), "fetched to the node with no request for it"
    assert wait_for_reports(stack, "loraplex_adapter_staged_total", staged_before + 1) >= staged_before + 1
    assert client.completions.create(model="ahead", prompt="Hi", max_tokens=2).choices[0].text


def test_pinned_adapter_survives_eviction_churn(client: openai.OpenAI, stack: Stack) -> None:
    """The engine's adapter cache holds max_cpu_loras (4) unpinned adapters beside the pinned ones (room for 2, and a
    spare): 7 entries. Churning 8 others evicts all but the pinned one."""
    keeper = new_adapter(stack, "keeper", seed=91)
    pinned = httpx.post(f"{stack.base_url}/v1/adapters", json={"name": "keeper", "source": str(keeper), "pinned": True})
    assert pinned.status_code == 201 and pinned.json()["pinned"] is True
    prompt, want = expect(stack, keeper)
    assert_close(want, served(client, "keeper", prompt), "pinned adapter before churn")
    evictions_before = replica_counter(stack, "loraplex_adapter_evictions_total")

    churn_folder = new_adapter(stack, "churn", seed=92)
    churn = [f"churn{i}" for i in range(8)]
    for name in churn:
        assert register(stack, name, str(churn_folder)).status_code == 201
        client.completions.create(model=name, prompt="Hi", max_tokens=1)

    wait_for_reports(stack, "loraplex_adapter_evictions_total", evictions_before + 1)
    time.sleep(2.5)  # one report after the last churn request
    placement = httpx.get(f"{stack.base_url}/v1/adapters/keeper").json()["replicas"]
    assert placement and all(replica["resident"] for replica in placement), placement
    assert httpx.get(f"{stack.base_url}/v1/adapters/churn0").json()["replicas"][0]["resident"] is False
    assert replica_counter(stack, "loraplex_adapter_evictions_total") > evictions_before
    assert_close(want, served(client, "keeper", prompt), "pinned adapter after churn")
    for name in churn:
        httpx.delete(f"{stack.base_url}/v1/adapters/{name}")


async def test_steps_full_of_other_adapters_beside_a_pinned_one_keep_the_engine_alive(
    async_client: openai.AsyncOpenAI, client: openai.OpenAI, stack: Stack
) -> None:
    """vLLM's pin took one of the engine's 4 slots and one of its 4 cache entries while its scheduler still let 4
    other adapters into a step: loading the last of them evicted one of the same step, and the worker died building
    the step (KeyError in convert_mapping). Pins now take neither (serve/vllm_patches.py, cpu_cache_entries).
    `keeper` is pinned by the test above; a pin beyond engine.max_pinned_loras (2) is refused."""
    assert httpx.get(f"{stack.base_url}/v1/adapters/keeper").json()["pinned"] is True

    def pin(name: str, seed: int) -> httpx.Response:
        source = str(new_adapter(stack, name, seed=seed))
        return httpx.post(f"{stack.base_url}/v1/adapters", json={"name": name, "source": source, "pinned": True})

    second = pin("keeper2", 93)
    assert second.status_code == 201, second.text
    third = pin("keeper3", 94)
    assert third.status_code == 409 and third.json()["error"]["param"] == "pinned", third.text
    assert httpx.get(f"{stack.base_url}/v1/adapters/keeper3").status_code == 404  # nothing half-done
    names = [f"full{i}" for i in range(8)]
    for i, name in enumerate(names):
        assert register(stack, name, str(new_adapter(stack, name, seed=95 + i))).status_code == 201
    for group in (names[:4], names[4:], names[:4]):  # each step's adapters loaded afresh, 4 at once
        await asyncio.gather(
            *(async_client.completions.create(model=name, prompt="Hi", max_tokens=8) for name in group)
        )
    prompt, want = expect(stack, stack.uploads / "keeper-91")
    assert_close(want, served(client, "keeper", prompt), "pinned adapter after full steps of others")
    for name in [*names, "keeper", "keeper2"]:
        httpx.delete(f"{stack.base_url}/v1/adapters/{name}")


def test_the_node_cache_holds_installed_adapters_and_lets_go_of_unregistered_ones(
    client: openai.OpenAI, stack: Stack
) -> None:
    """The engine replica holds a shared lock on each installed version's cache folder, so the node's pruner
    never deletes a folder vLLM may re-read after an eviction; unregistering lets go (issue 15)."""
    import fcntl

    from serve.adapters.safetensors_files import content_hash

    folder = new_adapter(stack, "held", seed=95)
    assert register(stack, "held", str(folder)).status_code == 201
    client.completions.create(model="held", prompt="Hi", max_tokens=1)
    cached = stack.log.parent / "adapter-cache" / content_hash(folder)
    assert cached.is_dir()

    def held_elsewhere() -> bool:
        with (cached / ".inuse").open() as marker:
            try:
                fcntl.flock(marker, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(marker, fcntl.LOCK_UN)
            return False

    assert held_elsewhere(), "installed: the replica holds its folder"
    assert replica_counter(stack, "loraplex_adapter_cache_bytes") > 0 or wait_for_reports(
        stack, "loraplex_adapter_cache_bytes", 1
    )
    assert httpx.delete(f"{stack.base_url}/v1/adapters/held").status_code == 200
    deadline = time.monotonic() + 20
    while held_elsewhere() and time.monotonic() < deadline:
        time.sleep(0.5)  # the replica sees the deletion at its next registry poll (2 s)
    assert not held_elsewhere(), "unregistered: the folder may be pruned"
    assert httpx.get(f"{stack.base_url}/health").json() == {"status": "ok"}


def test_the_registry_keeps_its_records_in_s3_and_a_restarted_replica_serves_them(
    client: openai.OpenAI, stack: Stack
) -> None:
    """The S3 store: one object per adapter in the bucket, and a registry replica that dies (its node lost) comes
    back with every adapter at the same version, with no disk of its own."""
    folder = new_adapter(stack, "durable", seed=31)
    assert register(stack, "durable", str(folder)).status_code == 201
    s3 = boto3.client("s3", endpoint_url=stack.s3_url, region_name="us-east-1",
                      aws_access_key_id=S3_KEYS["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=S3_KEYS["AWS_SECRET_ACCESS_KEY"])  # fmt: skip
    keys = {item["Key"] for item in s3.list_objects_v2(Bucket=REGISTRY_BUCKET)["Contents"]}
    assert {f"{stack.model_id}/adapters/durable.json", f"{stack.model_id}/base.json"} <= keys
    restart_the_registry_and_check_its_records(stack.base_url, str(new_adapter(stack, "later", seed=32)))
    prompt, want = expect(stack, folder)
    assert_close(want, served(client, "durable", prompt), "served after the registry's restart")
