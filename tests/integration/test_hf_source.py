"""`hf://` adapter sources on the real stack: registered through the API, served as PEFT computes them.

No hub is reachable from where these tests run: the stack reads `hf://` from `tests.hub_standin`, a stand-in for the
Hugging Face Hub on loopback (the `hf_hub` fixture; `registry.hf_endpoint` in the stack's config names it). Both the
registry (which checks and pins) and the engine replicas' node caches (which fetch the pinned commit) read from it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import openai
import pytest

from serve.demo.reference import assert_close
from tests.hub_standin import StandInHub
from tests.integration.conftest import Stack
from tests.integration.test_adapters import expect, new_adapter, register, served


def repo_with(folder: Path, subfolder: str) -> Path:
    """A repo tree holding the adapter `folder` under `subfolder`, beside files an adapter repo also has."""
    tree = folder.parent / f"{folder.name}-repo"
    shutil.rmtree(tree, ignore_errors=True)
    shutil.copytree(folder, tree / subfolder)
    (tree / "README.md").write_text("# adapters\n")
    return tree


def test_register_from_the_hub_pinned_to_a_commit_and_use(
    client: openai.OpenAI, stack: Stack, hf_hub: StandInHub
) -> None:
    first, second = new_adapter(stack, "hub", seed=81), new_adapter(stack, "hub", seed=82)
    sha = hf_hub.push("acme/adapters", repo_with(first, "sql"))
    created = register(stack, "from-hub", "hf://acme/adapters@main/sql")
    assert created.status_code == 201, created.text
    assert (created.json()["version"], created.json()["source"]) == (1, f"hf://acme/adapters@{sha}/sql")
    prompt, want_first = expect(stack, first)
    assert_close(want_first, served(client, "from-hub", prompt), "registered from the hub")

    pushed = hf_hub.push("acme/adapters", repo_with(second, "sql"))
    assert_close(want_first, served(client, "from-hub", prompt), "a push alone changes nothing served")
    again = register(stack, "from-hub", "hf://acme/adapters@main/sql")
    assert again.status_code == 201, again.text
    assert (again.json()["version"], again.json()["source"]) == (2, f"hf://acme/adapters@{pushed}/sql")
    _, want_second = expect(stack, second)
    assert want_second.tokens != want_first.tokens
    assert_close(want_second, served(client, "from-hub", prompt), "version 2, registered again after the push")


@pytest.mark.parametrize(
    ("source", "reason"),
    [
        ("hf://acme/no-such-repo", "no such repo"),
        ("hf://acme/private@main", "private or gated"),
        ("hf://acme/adapters@no-such-branch/sql", "no such revision"),
        ("hf://acme/adapters@main/no-such-folder", "no adapter at"),
    ],
)
def test_hub_sources_it_cannot_read_are_400s_naming_the_source(
    stack: Stack, hf_hub: StandInHub, source: str, reason: str
) -> None:
    if "acme/private" not in hf_hub.repos:
        hf_hub.push("acme/private", new_adapter(stack, "secret", seed=83), private=True)  # the stack has no token
    if "acme/adapters" not in hf_hub.repos:
        hf_hub.push("acme/adapters", repo_with(new_adapter(stack, "hub", seed=84), "sql"))
    response = register(stack, "from-hub-bad", source)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "source" and reason in error["message"] and source.split("@")[0] in error["message"]
