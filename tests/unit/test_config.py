"""Configuration models, the CLI's adapter flag and the engine's vLLM arguments."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import typer
from pydantic import ValidationError
from safetensors.torch import save_file

from serve.cli.main import parse_adapter
from serve.config import AdapterConfig, ApiKeyConfig, AppConfig, EngineConfig, load_config, lora_slot_bytes
from serve.demo.assets import prepare
from serve.engines.vllm_engine import vllm_cli_args
from serve.engines.vllm_routes import StreamUsage
from serve.wire import Usage

KEY = {"name": "k", "sha256": "0" * 64}
BAD_CONFIGS = [
    ({"engine": {"model": "/m"}, "adapters": [{"name": "../x", "path": "/a"}]}, "adapter name"),
    ({"engine": {"model": "/m"}, "adapters": [{"name": "a", "path": "/1"}, {"name": "a", "path": "/2"}]}, "unique"),
    ({"engine": {"model": "/m", "max_loras": 4, "max_cpu_loras": 2}}, "max_cpu_loras"),
    ({"engine": {"model": "/m", "max_lora_rank": 7}}, "max_lora_rank"),
    ({"engine": {"model": "/m", "dtype": "int4"}}, "dtype"),
    ({"engine": {"model": "/m", "surprise": 1}}, "surprise"),
    ({"engine": {"model": "/m"}, "router": {"max_inflight": 200, "max_waiting": 100}}, "max_ongoing_requests"),
    ({"engine": {"model": "/m"}, "router": {"auth": {"keys": [{"name": "k", "sha256": "lpx-plain"}]}}}, "sha256"),
    ({"engine": {"model": "/m"}, "router": {"auth": {"keys": [KEY, KEY]}}}, "unique"),
    ({"engine": {"model": "/m"}, "router": {"auth": {"keys": [{**KEY, "name": "a b"}]}}}, "key name"),
    ({"engine": {"model": "/m"}, "router": {"auth": {"keys": [{**KEY, "weight": 0}]}}}, "weight"),
]


@pytest.mark.parametrize(("data", "mentions"), BAD_CONFIGS)
def test_bad_configs_are_refused_with_the_reason(data: dict[str, object], mentions: str) -> None:
    with pytest.raises(ValidationError, match=mentions):
        AppConfig.model_validate(data)


def test_defaults_are_deliberate() -> None:
    config = AppConfig.model_validate({"engine": {"model": "/models/my-base"}})
    assert config.engine.model_id == "my-base"
    assert config.engine.max_lora_rank == 64
    assert config.engine_deployment.num_replicas == 1


def test_yaml_config_with_overrides(tmp_path: Path) -> None:
    file = tmp_path / "c.yaml"
    file.write_text("engine:\n  model: /m\n  max_loras: 2\nadapters:\n  - {name: a, path: /a}\n")
    config = load_config(file, {"engine": {"max_lora_rank": 16}})
    assert (config.engine.max_loras, config.engine.max_lora_rank) == (2, 16)
    assert [a.name for a in config.adapters] == ["a"]


def test_checkpoint_dtype_follows_config_json(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"torch_dtype": "bfloat16"}')
    assert EngineConfig(model=str(tmp_path), dtype="checkpoint").engine_dtype() == "bfloat16"
    assert EngineConfig(model=str(tmp_path), dtype="float32").engine_dtype() == "float32"
    assert EngineConfig(model=str(tmp_path / "missing"), dtype="checkpoint").engine_dtype() == "auto"


def test_the_default_dtype_is_vllms_own_choice_on_a_gpu_and_float32_on_a_cpu(tmp_path: Path) -> None:
    from serve.engines.vllm_engine import serving_dtype

    (tmp_path / "config.json").write_text('{"torch_dtype": "bfloat16"}')
    default = EngineConfig(model=str(tmp_path))
    assert default.engine_dtype() == "auto"
    assert serving_dtype(default, on_cpu=False) == "auto"  # as `vllm serve`
    assert serving_dtype(default, on_cpu=True) == "float32"  # bfloat16 + LoRA was 3.5x slower on CPU
    assert serving_dtype(EngineConfig(model=str(tmp_path), dtype="bfloat16"), on_cpu=True) == "bfloat16"
    assert serving_dtype(EngineConfig(model=str(tmp_path), dtype="checkpoint"), on_cpu=True) == "bfloat16"


def test_vllm_args_register_adapters_under_their_public_ids(tmp_path: Path) -> None:
    config = EngineConfig(model=str(tmp_path / "base"), max_cpu_loras=8)
    args = vllm_cli_args(config, [AdapterConfig(name="x", path="/x")])
    assert args[args.index("--lora-modules") + 1] == "base:x=/x"
    # 8 unpinned adapters, the 2 pinned ones engine.max_pinned_loras allows, and a spare for a pinned version switch
    assert args[args.index("--max-cpu-loras") + 1] == "11"
    assert args[args.index("--max-lora-rank") + 1] == "64"
    parsers = EngineConfig(model=str(tmp_path), tool_call_parser="hermes", tool_call_parsers=["llama3_json", "hermes"])
    assert parsers.tool_parsers() == ("hermes", "llama3_json")
    assert EngineConfig(model=str(tmp_path), tool_call_parsers=["mistral"]).tool_parsers() == ("mistral",)
    assert "--tool-call-parser" not in vllm_cli_args(EngineConfig(model=str(tmp_path), tool_call_parsers=["x"]), [])
    # Unpinned entries by default: 4 x max_loras under the slot policy (an adapter that gave its slot up stays in
    # memory), max_loras without it.
    unpinned = vllm_cli_args(EngineConfig(model=str(tmp_path), max_loras=4, max_pinned_loras=0), [])
    assert unpinned[unpinned.index("--max-cpu-loras") + 1] == "16"
    fcfs = vllm_cli_args(EngineConfig(model=str(tmp_path), max_loras=4, max_pinned_loras=0, slot_wait_s=None), [])
    assert fcfs[fcfs.index("--max-cpu-loras") + 1] == "4"
    assert "--additional-config" not in fcfs
    assert json.loads(unpinned[unpinned.index("--additional-config") + 1]) == {
        "loraplex_slots": {"wait_s": 0.25, "hold_s": 1.0, "pause_s": 2.0}
    }


def test_a_tool_call_parser_turns_on_vllm_tools(tmp_path: Path) -> None:
    assert "--enable-auto-tool-choice" not in vllm_cli_args(EngineConfig(model=str(tmp_path)), [])
    args = vllm_cli_args(EngineConfig(model=str(tmp_path), tool_call_parser="hermes"), [])
    assert args[args.index("--enable-auto-tool-choice") + 1 :][:2] == ["--tool-call-parser", "hermes"]


def sse_event(kind: str, data: dict[str, object]) -> str:
    return f"event: {kind}\ndata: {json.dumps(data)}\n\n"


def test_usage_is_read_from_each_apis_stream() -> None:
    responses = StreamUsage("responses")
    created = sse_event("response.created", {"type": "response.created", "response": {"usage": None}})
    assert responses.read(created) is None
    usage = {"input_tokens": 4, "output_tokens": 9}
    done = sse_event("response.completed", {"type": "response.completed", "response": {"usage": usage}})
    assert responses.read(done) == Usage(4, 9)
    messages = StreamUsage("messages")
    start = {"type": "message_start", "message": {"usage": {"input_tokens": 7, "output_tokens": 1}}}
    assert messages.read(sse_event("message_start", start)) is None
    delta = {"type": "message_delta", "usage": {"output_tokens": 12}}
    assert messages.read(sse_event("message_delta", delta)) == Usage(7, 12)


def test_adapter_flag() -> None:
    assert parse_adapter("a=/tmp")["name"] == "a"
    with pytest.raises(typer.BadParameter):
        parse_adapter("just-a-path")


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        ('data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":5}}\n\n', (3, 5)),
        ('data: {"choices":[{"text":"usage"}]}\n\n', None),
        ("data: [DONE]\n\n", None),
        ('data: {"choices":[{"text":"x"}],"usage":{"prompt_tokens":3,"completion_tokens":1}}\n\n', None),
    ],
)
def test_the_final_usage_event_of_an_openai_stream_is_recognised(event: str, expected: tuple[int, int] | None) -> None:
    usage = StreamUsage("openai").read(event)
    assert (None if usage is None else (usage.prompt_tokens, usage.completion_tokens)) == expected


def test_app_binds_one_shared_rate_limiter_into_the_router(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from serve.app import LIMITER_DEPLOYMENT, build_app

    monkeypatch.chdir(tmp_path)
    config = AppConfig.model_validate(
        {"engine": {"model": str(tmp_path)}, "router": {"auth": {"keys_file": "keys.yaml", "audit_file": "a.jsonl"}}}
    )
    router = build_app(config)._bound_deployment  # binding builds the graph; it starts nothing
    _, _, limiter, _, router_config, *_ = router.init_args
    assert limiter._bound_deployment.name == LIMITER_DEPLOYMENT
    assert limiter._bound_deployment.num_replicas == 1
    assert router_config.auth.keys_file == str(tmp_path / "keys.yaml")
    assert router_config.auth.audit_file == str(tmp_path / "a.jsonl")


def test_an_open_server_starts_no_rate_limiter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No keys means no limits to share: no limiter process idling beside the router."""
    from serve.app import build_app

    monkeypatch.chdir(tmp_path)
    router = build_app(AppConfig.model_validate({"engine": {"model": str(tmp_path)}}))._bound_deployment
    _, _, limiter, *_ = router.init_args
    assert limiter is None


def test_bookkeeping_deployments_keep_no_access_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from serve.app import SERVING_PATH_ENV, build_app

    monkeypatch.chdir(tmp_path)
    config = AppConfig.model_validate({"engine": {"model": str(tmp_path)}, "router": {"auth": {"keys_file": "k.yaml"}}})
    _, registry, limiter, *_ = build_app(config)._bound_deployment.init_args
    for bound in (registry, limiter):
        deployment = bound._bound_deployment
        assert deployment._deployment_config.logging_config["enable_access_log"] is False, deployment.name
        assert SERVING_PATH_ENV.items() <= deployment.ray_actor_options["runtime_env"]["env_vars"].items()


@pytest.mark.parametrize(("engine", "ops"), [({}, "grouped"), ({"cpu_lora_ops": "vllm"}, "vllm")])
def test_cpu_lora_ops_reach_the_engine_through_its_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, engine: dict[str, str], ops: str
) -> None:
    """loraplex's vLLM plugin runs in every vLLM process, which inherit the engine replica's environment."""
    from serve.app import build_app
    from serve.vllm_patches import CPU_LORA_OPS_ENV

    monkeypatch.chdir(tmp_path)
    config = AppConfig.model_validate({"engine": {"model": str(tmp_path), **engine}})
    bound, *_ = build_app(config)._bound_deployment.init_args
    assert bound._bound_deployment.ray_actor_options["runtime_env"]["env_vars"][CPU_LORA_OPS_ENV] == ops


@pytest.mark.parametrize("name", ["alpha\n", ".", "..", "a/b", ""])
def test_adapter_names_must_match_whole_and_not_be_dot_names(name: str) -> None:
    with pytest.raises(ValueError):
        AdapterConfig(name=name, path="/a")


def test_key_names_and_hashes_must_match_whole() -> None:
    with pytest.raises(ValueError):
        ApiKeyConfig(name="ops\n", sha256="0" * 64)
    with pytest.raises(ValueError):
        ApiKeyConfig(name="ops", sha256="0" * 64 + "\n")


def test_the_s3_secret_is_never_rendered_but_reaches_the_s3_client() -> None:
    from serve.adapters.resolver import make_resolver

    secret = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"
    config = AppConfig.model_validate(
        {"engine": {"model": "/m"}, "registry": {"s3_access_key_id": "AKID", "s3_secret_access_key": secret}}
    )
    for rendered in (repr(config), str(config), config.model_dump_json(), json.dumps(config.model_dump(mode="json"))):
        assert secret not in rendered and "**********" in rendered
    assert AppConfig.model_validate(config.model_dump()) == config  # the CLI's merge keeps it
    s3 = make_resolver(config).s3
    assert s3.secret_access_key == secret and secret not in repr(s3)


def test_lora_slots_default_to_what_fits_in_memory_on_a_cpu(tmp_path: Path) -> None:
    """On a CPU a slot costs host memory only (vLLM sizes every slot by max_lora_rank); on a GPU, 4."""
    model, _ = prepare(Path(__file__).resolve().parents[2] / ".loraplex")
    per_slot = lora_slot_bytes(model, 64, 4)
    assert 70e6 < per_slot < 90e6  # SmolLM2-135M at rank bound 64, float32: ~78 MB
    engine = EngineConfig(model=str(model))
    assert (engine.lora_slots(on_cpu=True), engine.lora_slots(on_cpu=False)) == (16, 4)
    assert EngineConfig(model=str(model), max_loras=2).lora_slots(on_cpu=True) == 2
    assert EngineConfig(model=str(model), max_cpu_loras=6).lora_slots(on_cpu=True) == 6
    big = tmp_path / "big"  # a projection 2.2M wide: one slot's buffers are ~560 MB at rank 64, 3 fit in 2 GiB
    big.mkdir()
    save_file({"model.layers.0.mlp.up_proj.weight": torch.zeros(2_200_000, 1, dtype=torch.bfloat16)},
              str(big / "model.safetensors"))  # fmt: skip
    assert EngineConfig(model=str(big)).lora_slots(on_cpu=True) == 4  # never fewer than 4
