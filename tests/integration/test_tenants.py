"""Two tenants and an admin, as a new user sets them up: keys from `loraplex keys create`, the `openai` SDK.

Tenant `acme` may use the base model and adapter `alpha`, 3 requests a minute; tenant `beta-co` may use
adapters matching `be*`, 100 tokens a minute; `ops` is the admin. This module runs its own server.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anthropic
import httpx
import openai
import pytest

from serve.demo.assets import prepare
from tests.integration.conftest import ASSETS, running_server
from tests.unit.tenancy import bearer

pytestmark = pytest.mark.own_server
BASE = "SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class Tenancy:
    base_url: str
    keys: dict[str, str]
    audit: Path
    adapters: dict[str, Path]


def create_key(keys_file: Path, name: str, *flags: str) -> str:
    cli = [str(Path(sys.executable).parent / "loraplex"), "keys", "create", "--name", name, "--file", str(keys_file)]
    out = subprocess.run([*cli, *flags], capture_output=True, text=True, check=True).stdout
    return next(word for word in out.split() if word.startswith("lpx-"))


@pytest.fixture(scope="module")
def tenancy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tenancy]:
    model_dir, demo = prepare(ASSETS)
    work = tmp_path_factory.mktemp("tenants")
    keys_file = work / "keys.yaml"
    keys = {
        "acme": create_key(keys_file, "acme", "--base", "--adapter", "alpha", "--rpm", "3"),
        "beta-co": create_key(keys_file, "beta-co", "--adapter", "be*", "--tpm", "100", "--compose"),
        "ops": create_key(keys_file, "ops", "--admin"),
        "full": create_key(keys_file, "full", "--base", "--adapter", "*", "--compose"),
        "prometheus": create_key(keys_file, "prometheus", "--metrics"),
    }
    assert all(key not in keys_file.read_text() for key in keys.values())  # only hashes are stored
    audit = work / "audit.jsonl"
    config = work / "loraplex.yaml"
    config.write_text(
        json.dumps(
            {
                "engine": {"model": str(model_dir), "dtype": "checkpoint"},
                "router": {
                    "auth": {"keys_file": str(keys_file), "audit_file": str(audit)},
                    "max_tokens": 256,
                    "max_prompt_tokens": MAX_PROMPT_TOKENS,
                },
                "registry": {
                    "state_file": str(work / "registry.json"),
                    "cache_dir": str(work / "cache"),
                    "local_roots": [str(ASSETS / "adapters")],
                },
            }
        )
    )
    with running_server(config, {"alpha": demo["alpha"]}, work) as (base_url, _):
        yield Tenancy(base_url=base_url, keys=keys, audit=audit, adapters=demo)


def sdk(tenancy: Tenancy, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{tenancy.base_url}/v1", api_key=key, max_retries=0, timeout=120)


MAX_PROMPT_TOKENS = 200


def chat(client: openai.OpenAI, model: str, max_tokens: int = 4) -> str:
    response = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=max_tokens,
        extra_body={"ignore_eos": True},  # exactly max_tokens tokens, so token budgets are predictable
    )  # fmt: skip
    return response.choices[0].message.content or ""


def test_missing_or_wrong_key_is_401_health_stays_open_metrics_need_their_scope(tenancy: Tenancy) -> None:
    missing = httpx.get(f"{tenancy.base_url}/v1/models")  # the SDK itself refuses to send no key
    assert missing.status_code == 401 and missing.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError) as caught:
        sdk(tenancy, "lpx-not-a-real-key").models.list()
    assert caught.value.body["code"] == "invalid_api_key"  # type: ignore[index]
    assert httpx.get(f"{tenancy.base_url}/health").status_code == 200
    assert httpx.get(f"{tenancy.base_url}/metrics").status_code == 401  # it names adapters and their traffic
    assert httpx.get(f"{tenancy.base_url}/metrics", headers=bearer(tenancy.keys["acme"])).status_code == 403
    scraped = httpx.get(f"{tenancy.base_url}/metrics", headers=bearer(tenancy.keys["prometheus"]))
    assert scraped.status_code == 200 and "loraplex_requests_total" in scraped.text


def test_each_tenant_sees_and_uses_only_its_scope(tenancy: Tenancy) -> None:
    acme, beta_co = sdk(tenancy, tenancy.keys["acme"]), sdk(tenancy, tenancy.keys["beta-co"])
    assert {m.id for m in acme.models.list()} == {BASE, f"{BASE}:alpha"}
    assert {m.id for m in beta_co.models.list()} == set()  # `be*` matches nothing registered yet

    assert chat(acme, "alpha")
    with pytest.raises(openai.PermissionDeniedError) as caught:
        chat(beta_co, BASE)
    assert caught.value.status_code == 403 and caught.value.body["param"] == "model"  # type: ignore[index]
    with pytest.raises(openai.PermissionDeniedError):
        chat(beta_co, "alpha")


def test_adapter_writes_need_the_admin_scope_and_are_audited(tenancy: Tenancy) -> None:
    source = str(tenancy.adapters["beta"])
    body = {"name": "beta", "source": source}
    denied = httpx.post(f"{tenancy.base_url}/v1/adapters", json=body,
                        headers={"Authorization": f"Bearer {tenancy.keys['beta-co']}"})  # fmt: skip
    assert denied.status_code == 403 and denied.json()["error"]["type"] == "permission_error"
    created = httpx.post(f"{tenancy.base_url}/v1/adapters", json=body, timeout=120,
                         headers={"Authorization": f"Bearer {tenancy.keys['ops']}"})  # fmt: skip
    assert created.status_code == 201, created.text

    beta_co = sdk(tenancy, tenancy.keys["beta-co"])
    assert {m.id for m in beta_co.models.list()} == {f"{BASE}:beta"}
    assert chat(beta_co, "beta")
    records = [json.loads(line) for line in tenancy.audit.read_text().splitlines()]
    seen = {(r["key"], r["action"], r["adapter"], r["outcome"]) for r in records}
    assert ("ops", "register", "beta", "ok") in seen, records
    assert any(r["key"] == "beta-co" and r["action"] == "register" and r["outcome"] == "denied" for r in records)
    assert all(r["ts"] and r["route"] == "POST /v1/adapters" for r in records)


def test_a_composite_serves_only_keys_that_may_use_every_component(tenancy: Tenancy) -> None:
    """beta-co's `be*` covers the name `be-mix` and its component beta, not its component alpha; composing inline
    needs the compose scope too."""
    spec = {"method": "cat", "adapters": [{"name": "alpha", "weight": 0.5}, {"name": "beta", "weight": 0.5}]}
    created = httpx.post(f"{tenancy.base_url}/v1/adapters", json={"name": "be-mix", "compose": spec}, timeout=300,
                         headers={"Authorization": f"Bearer {tenancy.keys['ops']}"})  # fmt: skip
    assert created.status_code == 201, created.text
    beta_co, full = sdk(tenancy, tenancy.keys["beta-co"]), sdk(tenancy, tenancy.keys["full"])
    for asked in ({"model": "be-mix"}, {"model": BASE, "extra_body": {"compose": spec}}):
        with pytest.raises(openai.PermissionDeniedError) as caught:
            beta_co.chat.completions.create(messages=[{"role": "user", "content": "Hi"}], max_tokens=2, **asked)
        assert "`alpha`" in caught.value.body["message"]  # type: ignore[index]
        answer = full.chat.completions.create(messages=[{"role": "user", "content": "Hi"}], max_tokens=2, **asked)
        assert answer.choices[0].message.content
    # acme may use alpha but not compose: an inline composite of alpha alone is refused before any build.
    alone = {"adapters": [{"name": "alpha", "weight": 0.5}]}
    with pytest.raises(openai.PermissionDeniedError) as refused:
        sdk(tenancy, tenancy.keys["acme"]).chat.completions.create(
            model=BASE, messages=[{"role": "user", "content": "Hi"}], max_tokens=2, extra_body={"compose": alone}
        )
    assert refused.value.body["param"] == "compose"  # type: ignore[index]


def test_the_newer_apis_keep_scopes(tenancy: Tenancy) -> None:
    """Responses (openai SDK), Messages (anthropic SDK, its `x-api-key` header) and the tokenizer: 403 for a model
    outside the key's scope, served inside it."""
    beta_co, full = sdk(tenancy, tenancy.keys["beta-co"]), sdk(tenancy, tenancy.keys["full"])
    with pytest.raises(openai.PermissionDeniedError):
        beta_co.responses.create(model="alpha", input="Hi", max_output_tokens=2)
    assert full.responses.create(model="alpha", input="Hi", max_output_tokens=2).output_text
    claude = anthropic.Anthropic(base_url=tenancy.base_url, api_key=tenancy.keys["beta-co"], max_retries=0)
    with pytest.raises(anthropic.PermissionDeniedError) as caught:
        claude.messages.create(model="alpha", max_tokens=2, messages=[{"role": "user", "content": "Hi"}])
    assert caught.value.body["error"]["type"] == "permission_error"  # type: ignore[index]
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=tenancy.base_url, api_key="lpx-wrong", max_retries=0).messages.create(
            model="alpha", max_tokens=2, messages=[{"role": "user", "content": "Hi"}]
        )
    body = {"model": "alpha", "prompt": "Hi"}
    with pytest.raises(openai.PermissionDeniedError):
        beta_co.post(f"{tenancy.base_url}/tokenize", cast_to=object, body=body)
    assert full.post(f"{tenancy.base_url}/tokenize", cast_to=object, body=body)["count"] > 0  # type: ignore[index]


def test_request_and_token_limits_answer_429_with_retry_after(tenancy: Tenancy) -> None:
    acme = sdk(tenancy, tenancy.keys["acme"])
    codes = []
    for _ in range(4):  # a bucket of 3, refilled at 3 a minute: the 4th back-to-back request is over
        try:
            chat(acme, BASE)
            codes.append(200)
        except openai.RateLimitError as exc:
            codes.append(429)
            assert int(exc.response.headers["retry-after"]) >= 1
            assert exc.body["type"] == "rate_limit_error"  # type: ignore[index]
    assert codes[-1] == 429 and codes.count(200) <= 3, codes

    beta_co = sdk(tenancy, tenancy.keys["beta-co"])
    with pytest.raises(openai.RateLimitError):
        for _ in range(2):  # ~95 tokens each (prompt + 60) against 100 a minute, refilled at ~1.7 a second
            chat(beta_co, "beta", max_tokens=60)


def test_input_limits_are_clear_400_and_413(tenancy: Tenancy) -> None:
    headers = {"Authorization": f"Bearer {tenancy.keys['full']}"}
    url = f"{tenancy.base_url}/v1/completions"
    too_long = httpx.post(url, headers=headers, json={"model": BASE, "prompt": "x", "max_tokens": 10_000})
    assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "max_tokens"
    too_many = httpx.post(url, headers=headers, json={"model": BASE, "prompt": "x", "n": 50})
    assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "n"
    huge = httpx.post(url, headers={**headers, "Content-Type": "application/json"},
                      content=b'{"model": "x", "prompt": "' + b"a" * (5 * 1024 * 1024) + b'"}')  # fmt: skip
    assert huge.status_code == 413 and huge.json()["error"]["type"] == "invalid_request_error"
    assert httpx.post(url, headers=headers, json={"model": BASE, "prompt": "Hi", "max_tokens": 2}).status_code == 200


def test_prompts_over_max_prompt_tokens_are_400_counted_by_the_tokenizer(tenancy: Tenancy) -> None:
    full = sdk(tenancy, tenancy.keys["full"])
    at_limit = full.completions.create(model=BASE, prompt=[1] * MAX_PROMPT_TOKENS, max_tokens=1)
    assert at_limit.usage is not None and at_limit.usage.prompt_tokens == MAX_PROMPT_TOKENS
    with pytest.raises(openai.BadRequestError) as over:
        full.completions.create(model=BASE, prompt=[1] * (MAX_PROMPT_TOKENS + 1), max_tokens=1)
    assert over.value.body["param"] == "prompt" and str(MAX_PROMPT_TOKENS) in over.value.body["message"]  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as chat_over:  # the chat template's tokens count too
        full.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "hello " * 250}], max_tokens=1)
    assert chat_over.value.body["param"] == "messages"  # type: ignore[index]
    assert chat(full, BASE)  # short prompts still served
