"""Composite adapters (issue 17, item 1): the real registry builds them with PEFT from real adapter files.

Each method's composite, as the registry stores it, holds the same tensors as PEFT's `add_weighted_adapter` run
on the real base model (the registry builds on a weightless copy of it); the router takes composites by name and
inline, with scopes. The served output against transformers + PEFT is tests/integration/test_compose.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file

from routing.app import create_app
from routing.catalog import ModelCatalog
from serve.adapters.peft_compose import CompositeStore
from serve.adapters.registry import AdapterRegistry
from serve.adapters.sources import LocalSource, S3Source, SourceResolver
from serve.adapters.store import S3Store
from serve.config import AuthConfig, RouterConfig
from serve.wire import AdapterRecord, Composition, WireError
from tests.conftest import S3_KEYS
from tests.unit.composing import ASSETS, component_folders, make_registry, registered
from tests.unit.fake_engine import FakeEngine, engine_client
from tests.unit.tenancy import api_key, bearer
from tests.unit.test_adapter_validation import LAYER, write_adapter

METHODS = [
    ("cat", ("alpha", "beta"), (0.7, 0.4), None, 8 + 16),
    ("svd", ("alpha", "beta"), (1.0, -0.5), None, 16),
    ("linear", ("alpha", "mate"), (0.6, 0.6), None, 8),
    ("ties", ("alpha", "mate"), (1.0, 0.8), 0.5, 8),
    ("dare_linear", ("alpha", "mate"), (1.0, 1.0), 0.6, 8),
    ("dare_ties", ("alpha", "mate"), (0.9, 1.1), 0.7, 8),
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return component_folders(tmp_path_factory)


def peft_composite(folders: dict[str, Path], composition: Composition) -> dict[str, torch.Tensor]:
    """PEFT's own `add_weighted_adapter` on the real base model, seeded as the registry seeds it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(folders["model"], dtype=torch.float32)
    model = PeftModel.from_pretrained(base, folders[composition.adapters[0]], adapter_name=composition.adapters[0])
    for name in composition.adapters[1:]:
        model.load_adapter(folders[name], adapter_name=name)
    torch.manual_seed(composition.seed)
    model.add_weighted_adapter(list(composition.adapters), list(composition.weights), "mix",
                               combination_type=composition.method, density=composition.density)  # fmt: skip
    state = {k: v for k, v in model.state_dict().items() if ".mix." in k or k.endswith(".mix")}
    return {key.replace(".mix", "").removeprefix("base_model.model."): value for key, value in state.items()}


@pytest.mark.parametrize(("method", "adapters", "weights", "density", "rank"), METHODS)
async def test_each_method_builds_what_peft_builds_on_the_real_base(
    folders: dict[str, Path], tmp_path: Path, method: str, adapters: tuple[str, ...], weights: tuple[float, ...],
    density: float | None, rank: int,
) -> None:  # fmt: skip
    registry = await registered(folders, tmp_path)
    composition = Composition(method, adapters, weights, density, seed=3)
    record = await registry.compose("mix", composition)
    assert isinstance(record, AdapterRecord), record
    assert record.rank == rank and record.version == 1 and registry.builds == 1
    assert record.composition is not None and len(record.composition.built_from) == len(adapters)
    built = load_file(Path(record.source) / "adapter_model.safetensors")
    expected = peft_composite(folders, composition)
    served = {key.removeprefix("base_model.model."): value for key, value in built.items()}
    assert served.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(served[key], tensor), key


async def test_an_inline_composite_is_built_once_however_many_ask_at_once(
    folders: dict[str, Path], tmp_path: Path
) -> None:
    registry = await registered(folders, tmp_path)
    composition = Composition("cat", ("alpha", "beta"), (0.5, 0.5))
    outcomes = await asyncio.gather(*(registry.materialize(composition, "k") for _ in range(6)))
    records = {o[0] for o in outcomes if not isinstance(o, WireError)}
    assert len(records) == 1 and [o[1] for o in outcomes if not isinstance(o, WireError)].count(True) == 1
    assert registry.builds == 1 and next(iter(records)).name.startswith("~compose-")
    # Another registry (a restart) finds the built files in the composite store: no second build.
    again = make_registry(folders, tmp_path)
    outcome = await again.materialize(composition, "k")
    assert not isinstance(outcome, WireError) and again.builds == 0 and outcome[1] is False
    first = next(iter(records))  # the same record but for its creation second, which the restart may pass
    assert dataclasses.replace(outcome[0], created=first.created) == first


async def test_a_registered_composite_follows_its_components_and_survives_a_restart(
    folders: dict[str, Path], tmp_path: Path
) -> None:
    registry = await registered(folders, tmp_path)
    first = await registry.compose("mix", Composition("cat", ("alpha", "beta"), (1.0, 1.0)))
    assert isinstance(first, AdapterRecord)
    # beta gets a new version: the composite is rebuilt from it, as a new version.
    assert isinstance(await registry.register("beta", str(folders["mate"])), AdapterRecord)
    second = (await registry.snapshot()).records["mix"]
    assert second.version == 2 and second.content_hash != first.content_hash
    assert second.composition is not None and first.composition is not None
    assert second.composition.built_from[1] != first.composition.built_from[1]
    # A component of a composite cannot go, nor be replaced by a composite; the composite is not a source's.
    refused = await registry.unregister("alpha")
    assert isinstance(refused, WireError) and refused.status == 409 and "mix" in refused.message
    assert isinstance(await registry.register("mix", str(folders["alpha"])), WireError)
    nested = await registry.compose("deep", Composition("cat", ("mix", "alpha"), (1.0, 1.0)))
    assert isinstance(nested, WireError) and nested.param == "compose.adapters.0.name"
    # The record and how it was made are in the store.
    restarted = make_registry(folders, tmp_path)
    assert (await restarted.snapshot()).records["mix"] == second
    assert isinstance(await restarted.unregister("alpha"), WireError)


UNCOMBINED_COMPONENTS = [
    # (the option in adapter_config.json, the tensor it saves beside LoRA's, words the refusal must hold)
    pytest.param("lora_bias", "lora_B.bias", ("lora_bias",), id="lora_bias"),
    pytest.param("use_dora", "lora_magnitude_vector", ("DoRA", "use_dora"), id="dora"),
]


@pytest.mark.parametrize(("option", "tensor", "words"), UNCOMBINED_COMPONENTS)
async def test_a_component_whose_option_peft_does_not_combine_is_refused_naming_it(
    folders: dict[str, Path], tmp_path: Path, option: str, tensor: str, words: tuple[str, ...]
) -> None:
    """PEFT's add_weighted_adapter combines A and B only: a composite would drop the component's lora_bias or DoRA
    magnitudes."""
    registry = await registered(folders, tmp_path)
    component = write_adapter(tmp_path / option, **{option: True}, tensors={
        f"{LAYER}.q_proj.lora_A.weight": torch.ones(4, 576), f"{LAYER}.q_proj.lora_B.weight": torch.ones(576, 4),
        f"{LAYER}.q_proj.{tensor}": torch.ones(576)})  # fmt: skip
    assert isinstance(await registry.register(option, str(component)), AdapterRecord)
    refused = await registry.compose("mix", Composition("cat", ("alpha", option), (1.0, 1.0)))
    assert isinstance(refused, WireError) and (refused.status, refused.param) == (400, "compose.adapters.1.name")
    assert all(word in refused.message for word in words), refused.message


async def test_a_composite_that_cannot_be_rebuilt_is_marked_unusable(folders: dict[str, Path], tmp_path: Path) -> None:
    registry = await registered(folders, tmp_path)
    assert isinstance(
        await registry.compose("mix", Composition("linear", ("alpha", "mate"), (1.0, 1.0))), AdapterRecord
    )
    await registry.register("mate", str(folders["beta"]))  # rank 16 now: linear needs one rank
    record = (await registry.snapshot()).records["mix"]
    assert record.unusable is not None and "'mate' changed" in record.unusable and "one rank" in record.unusable


BAD_COMPOSITIONS = [
    (Composition("linear", ("alpha", "beta"), (1.0, 1.0)), "compose.method", "one rank"),
    (Composition("cat", ("alpha", "nope"), (1.0, 1.0)), "compose.adapters.1.name", "not registered"),
    (Composition("ties", ("alpha", "mate"), (1.0, 1.0)), "compose.density", "needs a density"),
    (Composition("cat", ("alpha", "mate"), (1.0, 1.0), density=0.5), "compose.density", "takes no density"),
    (Composition("cat", ("alpha", "alpha"), (1.0, 1.0)), "compose.adapters", "each adapter once"),
    (Composition("cat", ("alpha", "beta", "mate"), (1.0, 1.0, 1.0)), "compose.adapters", "max_lora_rank of 16"),
]


@pytest.mark.parametrize(("composition", "param", "message"), BAD_COMPOSITIONS)
async def test_bad_compositions_are_refused_naming_the_field(
    folders: dict[str, Path], tmp_path: Path, composition: Composition, param: str, message: str
) -> None:
    registry = await registered(folders, tmp_path, max_rank=16)
    for outcome in (await registry.compose("mix", composition), await registry.materialize(composition, "k")):
        assert isinstance(outcome, WireError) and outcome.status == 400
        assert (outcome.param, message in outcome.message) == (param, True), outcome
    assert "mix" not in (await registry.snapshot()).records and registry.builds == 0


async def test_composites_are_stored_in_s3_for_a_cluster(folders: dict[str, Path], tmp_path: Path, s3_url: str) -> None:
    s3 = S3Source(endpoint_url=s3_url, access_key_id=S3_KEYS["AWS_ACCESS_KEY_ID"],
                  secret_access_key=S3_KEYS["AWS_SECRET_ACCESS_KEY"])  # fmt: skip
    s3.client().create_bucket(Bucket="compose-unit")
    resolver = SourceResolver(local=LocalSource((ASSETS.resolve(),)), s3=s3)
    registry = AdapterRegistry(
        S3Store("compose-unit", "records", s3), folders["model"], resolver, max_rank=64, max_bytes=10**9,
        composites=CompositeStore("s3://compose-unit/composites", s3),
    )  # fmt: skip
    for name in ("alpha", "beta"):
        await registry.register(name, str(folders[name]))
    record = await registry.compose("mix", Composition("cat", ("alpha", "beta"), (1.0, 1.0)))
    assert isinstance(record, AdapterRecord) and record.source.startswith("s3://compose-unit/composites/")
    listed = s3.client().list_objects_v2(Bucket="compose-unit", Prefix="composites/")["Contents"]
    assert sorted(Path(item["Key"]).name for item in listed) == ["adapter_config.json", "adapter_model.safetensors"]


# The router: composites by name and inline, with scopes.
Router = tuple[httpx.AsyncClient, FakeEngine, dict[str, str]]
"""A client of a router app over the real registry, the fake engine it sends to, and keys by name."""


@pytest.fixture
async def router(folders: dict[str, Path], tmp_path: Path) -> AsyncIterator[Router]:
    registry = await registered(folders, tmp_path)
    engine = FakeEngine()
    key, entry = api_key("narrow", adapters=["alpha", "beta"], compose=True)
    mixer_key, mixer = api_key("mixer", adapters=["ab", "am", "alpha", "beta"])
    admin_key, admin = api_key("admin", admin=True, metrics=True, adapters=["*"], base=True)
    config = RouterConfig(auth=AuthConfig(keys=[entry, mixer, admin]))
    app = create_app(engine_client(engine), ModelCatalog("tiny-base", registry), config)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://router.localhost", headers=bearer(admin_key)
    ) as client:
        yield client, engine, {"narrow": key, "mixer": mixer_key}


async def test_a_composite_is_registered_listed_and_served_by_name(
    router: Router,
) -> None:
    client, engine, _ = router
    body = {"name": "mix", "compose": {"adapters": [{"name": "alpha", "weight": 0.7},
                                                    {"name": "tiny-base:beta", "weight": 0.3}]}}  # fmt: skip
    created = await client.post("/v1/adapters", json=body)
    assert created.status_code == 201, created.text
    card = created.json()
    assert card["rank"] == 24 and card["composition"]["method"] == "cat"
    assert card["composition"]["adapters"] == ["alpha", "beta"] and card["composition"]["weights"] == [0.7, 0.3]
    assert "tiny-base:mix" in [m["id"] for m in (await client.get("/v1/models")).json()["data"]]
    assert (await client.post("/v1/completions", json={"model": "mix", "prompt": "x"})).status_code == 200
    assert engine.adapters[-1] is not None and engine.adapters[-1].name == "mix"
    both = await client.post("/v1/adapters", json={**body, "source": "/a/b"})
    assert both.status_code == 400 and both.json()["error"]["param"] == "source"
    refused = await client.delete("/v1/adapters/alpha")
    assert refused.status_code == 409 and "mix" in refused.json()["error"]["message"]


async def test_a_key_may_use_a_registered_composite_only_if_it_may_use_every_component(
    router: Router,
) -> None:
    client, _, keys = router  # mixer: ab, am, alpha and beta (not mate)
    for name, components in (("ab", ("alpha", "beta")), ("am", ("alpha", "mate"))):
        body = {"name": name, "compose": {"adapters": [{"name": c, "weight": 1.0} for c in components]}}
        assert (await client.post("/v1/adapters", json=body)).status_code == 201
    allowed = await client.post("/v1/completions", json={"model": "ab", "prompt": "x"}, headers=bearer(keys["mixer"]))
    assert allowed.status_code == 200, allowed.text
    denied = await client.post("/v1/completions", json={"model": "am", "prompt": "x"}, headers=bearer(keys["mixer"]))
    assert denied.status_code == 403 and "`mate`" in denied.json()["error"]["message"]
    assert denied.json()["error"]["param"] == "model"


async def test_an_inline_composite_is_served_once_built_and_only_to_keys_that_may_use_every_component(
    router: Router,
) -> None:
    client, engine, keys = router
    narrow = keys["narrow"]
    compose = {"adapters": [{"name": "alpha", "weight": 1.0}, {"name": "beta", "weight": 0.5}], "method": "cat"}
    asked = [client.post("/v1/completions", json={"model": "tiny-base", "prompt": "x", "compose": compose},
                         headers=bearer(narrow)) for _ in range(4)]  # fmt: skip
    answers = await asyncio.gather(*asked)
    assert [a.status_code for a in answers] == [200] * 4, answers[0].text
    names = {record.name for record in engine.adapters if record is not None}
    assert len(names) == 1 and next(iter(names)).startswith("~compose-")
    assert all("compose" not in body for _, body in engine.requests), "the field is the router's, not vLLM's"
    metrics = (await client.get("/metrics")).text
    assert "loraplex_composite_builds_total 1.0" in metrics
    assert 'model="tiny-base:~compose"' in metrics
    # One component out of the key's scope: 403 naming it; nothing is built.
    outside = {"adapters": [{"name": "alpha", "weight": 1.0}, {"name": "mate", "weight": 1.0}], "method": "linear"}
    denied = await client.post("/v1/completions", json={"model": "tiny-base", "prompt": "x", "compose": outside},
                               headers=bearer(narrow))  # fmt: skip
    assert denied.status_code == 403 and denied.json()["error"]["param"] == "compose.adapters.1.name"
    assert "loraplex_composite_builds_total 1.0" in (await client.get("/metrics")).text


BAD_INLINE = [
    ({"model": "alpha", "compose": {"adapters": [{"name": "beta", "weight": 1}]}}, 400, "model"),
    ({"model": "tiny-base", "compose": {"adapters": []}}, 400, "compose.adapters"),
    ({"model": "tiny-base", "compose": {"adapters": [{"name": "alpha", "weight": 1}], "method": "x"}}, 400,
     "compose.method"),
    ({"model": "tiny-base", "compose": {"adapters": [{"name": "alpha"}]}}, 400, "compose.adapters.0.weight"),
    ({"model": "tiny-base", "compose": {"adapters": [{"name": "alpha", "weight": 1}, {"name": "beta", "weight": 1}],
                                        "method": "linear"}}, 400, "compose.method"),
    ({"model": "tiny-base", "compose": {"adapters": [{"name": "ghost", "weight": 1}]}}, 400,
     "compose.adapters.0.name"),
]  # fmt: skip


@pytest.mark.parametrize(("body", "status", "param"), BAD_INLINE)
async def test_bad_inline_compositions_are_refused_in_openai_shape(
    router: Router, body: dict[str, object], status: int, param: str
) -> None:
    client, engine, _ = router
    answer = await client.post("/v1/completions", json={"prompt": "x", **body})
    assert answer.status_code == status, answer.text
    assert answer.json()["error"]["param"] == param
    assert not engine.requests
