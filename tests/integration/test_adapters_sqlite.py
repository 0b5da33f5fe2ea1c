"""test_adapters' registry tests again, on a server whose registry store is SQLite (issue 16: both stores pass them).

The shared stack keeps its registry in S3 (moto). This module starts the same server with `registry.store:
sqlite:///...` and runs the tests that go through the registry (register from a folder and from S3, versions,
warnings, unregister, refusals, vLLM's load/unload endpoints and the CLI), plus the SQLite counterpart of the S3
store's restart test. The engine's cache tests of test_adapters do not touch the store and are not run twice.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from serve.demo.reference import assert_close
from tests.hub_standin import StandInHub
from tests.integration.conftest import Stack, restart_the_registry_and_check_its_records, stack_server
from tests.integration.test_adapters import (  # collected here too, with this module's `stack` and `client`
    expect,
    new_adapter,
    register,
    served,
    test_an_untrained_adapter_is_registered_with_a_warning_shown_by_the_api_and_cli,
    test_malformed_adapters_are_refused_and_nothing_is_registered,
    test_new_version_replaces_weights_everywhere,
    test_register_from_s3_and_use,
    test_register_local_folder_and_use_at_once,
    test_unreachable_or_forbidden_sources_are_refused,
    test_unregister_then_404_while_others_keep_answering,
    test_vllm_load_unload_endpoints_and_cli,
)

__all__ = [
    "test_an_untrained_adapter_is_registered_with_a_warning_shown_by_the_api_and_cli",
    "test_malformed_adapters_are_refused_and_nothing_is_registered",
    "test_new_version_replaces_weights_everywhere",
    "test_register_from_s3_and_use",
    "test_register_local_folder_and_use_at_once",
    "test_unreachable_or_forbidden_sources_are_refused",
    "test_unregister_then_404_while_others_keep_answering",
    "test_vllm_load_unload_endpoints_and_cli",
]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, s3_url: str, hf_hub: StandInHub) -> Iterator[Stack]:
    with stack_server(tmp_path_factory.mktemp("stack-sqlite"), s3_url, hf_hub, store="sqlite") as running:
        yield running


@pytest.fixture(scope="module")
def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="unused", max_retries=0, timeout=300)


def test_the_registry_keeps_its_records_in_sqlite_and_a_restarted_replica_serves_them(
    client: openai.OpenAI, stack: Stack
) -> None:
    """The SQLite store: one row per adapter in the database file, and a registry replica that dies comes back with
    every adapter at the same version."""
    folder = new_adapter(stack, "durable", seed=31)
    assert register(stack, "durable", str(folder)).status_code == 201
    database = Path(stack.log).parent / "registry.db"
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as db:
        names = {name for (name,) in db.execute("SELECT name FROM adapters")}
    listed = {a["name"] for a in httpx.get(f"{stack.base_url}/v1/adapters", timeout=30).json()["data"]}
    assert "durable" in names and names == listed
    restart_the_registry_and_check_its_records(stack.base_url, str(new_adapter(stack, "later", seed=32)))
    prompt, want = expect(stack, folder)
    assert_close(want, served(client, "durable", prompt), "served after the registry's restart")
