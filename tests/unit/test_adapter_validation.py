"""Adapter validation and the registry, on real adapter folders checked against the real base model's shapes."""

from __future__ import annotations

import json
import re
import shutil
import struct
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from serve.adapters.safetensors_files import NO_OP_WARNING, base_linear_shapes
from serve.adapters.tensor_names import split
from serve.adapters.validation import DORA_OPTION, LORA_BIAS_OPTION, AdapterInvalid, AdapterMetadata, validate_adapter
from serve.demo.assets import DEFAULT_MODEL_NAME, build_default_model

ASSETS = Path(__file__).resolve().parents[2] / ".loraplex"
LAYER = "base_model.model.model.layers.0.self_attn"


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return build_default_model(ASSETS / "models" / DEFAULT_MODEL_NAME)


@pytest.fixture(scope="module")
def shapes(model_dir: Path) -> dict[str, list[int]]:
    return base_linear_shapes(model_dir)


def write_adapter(
    folder: Path, rank: int = 4, tensors: dict[str, torch.Tensor] | None = None, **config: object
) -> Path:
    """A minimal PEFT LoRA folder on q_proj of layer 0 (576 → 576 in SmolLM2-135M)."""
    folder.mkdir(parents=True, exist_ok=True)
    settings = {"peft_type": "LORA", "r": rank, "lora_alpha": 8, "target_modules": ["q_proj"], **config}
    (folder / "adapter_config.json").write_text(json.dumps(settings))
    default = {
        f"{LAYER}.q_proj.lora_A.weight": torch.zeros(rank, 576),
        f"{LAYER}.q_proj.lora_B.weight": torch.zeros(576, rank),
    }
    save_file(tensors if tensors is not None else default, str(folder / "adapter_model.safetensors"))
    return folder


def check(folder: Path, shapes: dict[str, list[int]], max_rank: int = 64, max_bytes: int = 10**9) -> object:
    return validate_adapter(folder, shapes, max_rank=max_rank, max_bytes=max_bytes)


def test_a_valid_adapter_is_described(tmp_path: Path, shapes: dict[str, list[int]]) -> None:
    meta = check(write_adapter(tmp_path / "ok"), shapes)
    assert (meta.rank, meta.target_modules) == (4, ("q_proj",))  # type: ignore[attr-defined]
    assert len(meta.content_hash) == 64  # type: ignore[attr-defined]


BAD_ADAPTERS = [
    ("no config", lambda f: (f / "adapter_config.json").unlink(), "adapter_config.json is missing"),
    ("broken config", lambda f: (f / "adapter_config.json").write_text("{"), "not valid JSON"),
    ("not lora", lambda f: write_adapter(f, peft_type="IA3"), "not a LoRA adapter"),
    ("rank too high", lambda f: write_adapter(f, rank=128, tensors={}), "exceeds this server's max_lora_rank"),
    ("pickled", lambda f: (f / "adapter_model.bin").write_bytes(b"x"), "pickled weights"),
    ("no weights", lambda f: (f / "adapter_model.safetensors").unlink(), "adapter_model.safetensors is missing"),
    ("wrong shape", lambda f: write_adapter(f, tensors={f"{LAYER}.q_proj.lora_A.weight": torch.zeros(4, 999)}),
     "wrong base model"),
    ("unknown module", lambda f: write_adapter(f, tensors={f"{LAYER}.nope.lora_A.weight": torch.zeros(4, 576)}),
     "does not have"),
    ("not lora tensors", lambda f: write_adapter(f, tensors={"model.embed_tokens.weight": torch.zeros(2, 2)}),
     "unsupported tensor"),
    ("garbage weights", lambda f: (f / "adapter_model.safetensors").write_bytes(b"\x08"), "not a safetensors"),
    ("truncated weights", lambda f: truncate(f / "adapter_model.safetensors", 100), "truncated or corrupt"),
    ("alpha not a number", lambda f: write_adapter(f, lora_alpha="x"), "no valid lora_alpha"),
    ("alpha negative", lambda f: write_adapter(f, lora_alpha=-2), "no valid lora_alpha"),
    ("header not an object", lambda f: header_of(f / "adapter_model.safetensors", b"[]"), "not a JSON object"),
    ("integer weights",
     lambda f: write_adapter(f, tensors={f"{LAYER}.q_proj.lora_A.weight": torch.zeros(4, 576, dtype=torch.int32)}),
     "must be floating point"),
]  # fmt: skip


def header_of(file: Path, header: bytes) -> None:
    """A safetensors file whose header is `header` (valid JSON of the wrong shape)."""
    file.write_bytes(struct.pack("<Q", len(header)) + header)


def truncate(file: Path, drop: int) -> None:
    data = file.read_bytes()
    file.write_bytes(data[:-drop])


@pytest.mark.parametrize(("case", "damage", "reason"), BAD_ADAPTERS, ids=[c[0] for c in BAD_ADAPTERS])
def test_bad_adapters_are_refused_with_the_reason(
    tmp_path: Path, shapes: dict[str, list[int]], case: str, damage: object, reason: str
) -> None:
    folder = write_adapter(tmp_path / "a")
    damage(folder)  # type: ignore[operator]
    with pytest.raises(AdapterInvalid, match=reason):
        check(folder, shapes, max_rank=64)


def test_oversized_adapter_is_refused(tmp_path: Path, shapes: dict[str, list[int]]) -> None:
    with pytest.raises(AdapterInvalid, match="the limit is 100"):
        check(write_adapter(tmp_path / "a"), shapes, max_bytes=100)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_an_adapter_whose_lora_b_is_zero_is_registered_with_a_warning(
    tmp_path: Path, shapes: dict[str, list[int]], dtype: torch.dtype
) -> None:
    """PEFT initializes lora_B to zeros: such an adapter answers as the base model does (vLLM issue #34186)."""
    a = torch.randn(4, 576).to(dtype)
    for b, expected in [
        (torch.zeros(576, 4), (NO_OP_WARNING,)),
        (-torch.zeros(576, 4), (NO_OP_WARNING,)),  # -0.0 is zero too
        (torch.zeros(576, 4).index_fill_(0, torch.tensor([575]), 1e-3), ()),  # one non-zero row: it does something
    ]:
        folder = write_adapter(tmp_path / f"b{len(expected)}-{b.sum()}", tensors={
            f"{LAYER}.q_proj.lora_A.weight": a, f"{LAYER}.q_proj.lora_B.weight": b.to(dtype)})  # fmt: skip
        meta = validate_adapter(folder, shapes, max_rank=64, max_bytes=10**9)
        assert meta.warnings == expected, (dtype, b.sum())


# Adapters as PEFT writes them, on the demo model: per-module rank and scale, LoRA on the input embedding.

PEFT_ADAPTERS = {
    # name: (LoraConfig settings, the rank recorded (the widest module's), the options recorded)
    "rank-pattern": (
        {"r": 8, "target_modules": ["q_proj", "v_proj", "down_proj"],
         "rank_pattern": {"down_proj": 16, "model.layers.0.self_attn.q_proj": 4}},
        16, ("rank_pattern: per-module rank",),
    ),
    "alpha-pattern": (
        {"r": 8, "target_modules": ["q_proj", "v_proj"], "alpha_pattern": {"v_proj": 4}},
        8, ("alpha_pattern: per-module scale",),
    ),
    "both-patterns-rslora": (
        {"r": 4, "target_modules": ["q_proj", "v_proj", "up_proj"], "rank_pattern": {"v_proj": 12, "up_proj": 2},
         "alpha_pattern": {"q_proj": 2}, "use_rslora": True},
        12, ("rank_pattern: per-module rank", "alpha_pattern: per-module scale", "use_rslora: scale alpha/sqrt(rank)"),
    ),
    "embed-tokens": (
        {"r": 8, "target_modules": ["embed_tokens", "q_proj"]},
        8, ("embed_tokens: LoRA",),
    ),
    "embed-tokens-rank-pattern": (
        {"r": 8, "target_modules": ["embed_tokens", "v_proj"], "rank_pattern": {"embed_tokens": 4}},
        8, ("rank_pattern: per-module rank", "embed_tokens: LoRA"),
    ),
    "lora-bias": ({"r": 8, "target_modules": ["q_proj", "v_proj", "down_proj"], "lora_bias": True}, 8,
                  (LORA_BIAS_OPTION,)),
    # PEFT's ensure_weight_tying adds a LoRA to the lm_head that SmolLM2 ties to its embedding: refused below.
    "embed-tokens-tied": ({"r": 8, "target_modules": ["embed_tokens", "q_proj"], "ensure_weight_tying": True}, 0, ()),
    "lm-head": ({"r": 8, "target_modules": ["lm_head", "q_proj"]}, 0, ()),
    "dora": ({"r": 8, "target_modules": ["q_proj", "v_proj"], "use_dora": True}, 8, (DORA_OPTION,)),
    # Options loraplex does not serve yet: refused by name (`NOT_SERVED_YET`).
    "modules-to-save": ({"r": 8, "target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}, 0, ()),
    "trainable-tokens": ({"r": 8, "target_modules": ["q_proj"], "trainable_token_indices": [0, 5]}, 0, ()),
    "added-tokens": ({"r": 8, "target_modules": ["q_proj"]}, 0, ()),  # on a base given 8 more tokens (`ADDED_TOKENS`)
}  # fmt: skip
ADDED_TOKENS = {"added-tokens": 8}
"""Tokens added to the tokenizer before training: the base model's embedding is resized by this many rows."""
ACCEPTED = [name for name, (_, rank, _) in PEFT_ADAPTERS.items() if rank]


@dataclass(frozen=True)
class Made:
    """A PEFT adapter's folder, and the rank and scale PEFT itself gives each of its modules."""

    folder: Path
    peft: dict[str, tuple[int, float]]


@pytest.fixture(scope="module")
def peft_made(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Made]:
    """Each of `PEFT_ADAPTERS` made by PEFT on the demo model (seeded, init_lora_weights=False: B is not zero)."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("peft")
    made = {}
    for name, (settings, _, _) in PEFT_ADAPTERS.items():
        torch.manual_seed(sum(name.encode()))
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        if name in ADDED_TOKENS:
            base.resize_token_embeddings(base.config.vocab_size + ADDED_TOKENS[name])
        config = LoraConfig(lora_alpha=16, init_lora_weights=False, task_type="CAUSAL_LM", **settings)  # type: ignore[arg-type]
        with warnings.catch_warnings():  # about tied embeddings, and saving the embedding with its LoRA
            warnings.simplefilter("ignore", UserWarning)
            model = get_peft_model(base, config)
            model.save_pretrained(root / name)
        peft = {
            module.removeprefix("base_model.model."): (layer.r["default"], layer.scaling["default"])
            for module, layer in model.named_modules()
            if isinstance(layer, LoraLayer) and "default" in layer.r
        }
        made[name] = Made(root / name, peft)
    return made


def check_peft(folder: Path, shapes: dict[str, list[int]], model_dir: Path) -> AdapterMetadata:
    return validate_adapter(folder, shapes, max_rank=64, max_bytes=10**9, base_model=model_dir)


@pytest.mark.parametrize("name", ACCEPTED)
def test_peft_adapters_with_per_module_rank_and_scale_or_embedding_lora_are_accepted(
    name: str, peft_made: dict[str, Made], shapes: dict[str, list[int]], model_dir: Path
) -> None:
    settings, rank, options = PEFT_ADAPTERS[name]
    meta = check_peft(peft_made[name].folder, shapes, model_dir)
    targets = {m if m != "model.layers.0.self_attn.q_proj" else "q_proj" for m in settings["target_modules"]}  # type: ignore[union-attr]
    assert (meta.rank, meta.target_modules, meta.options) == (rank, tuple(sorted(targets)), options)
    assert meta.warnings == ()


@pytest.mark.parametrize("name", ACCEPTED)
def test_vllm_ranks_and_scales_each_module_as_peft_does(name: str, peft_made: dict[str, Made]) -> None:
    """What makes rank_pattern, alpha_pattern and use_rslora servable: vLLM 0.32's reading of the config
    (`PEFTHelper.get_rank_and_scaling`, per checkpoint module) equals PEFT's own, module by module."""
    from vllm.lora.peft_helper import PEFTHelper

    made = peft_made[name]
    helper = PEFTHelper.from_local_dir(str(made.folder), max_position_embeddings=None)
    assert len(made.peft) >= 30  # every layer's modules at least
    for module, (rank, scaling) in made.peft.items():
        assert helper.get_rank_and_scaling(module) == pytest.approx((rank, scaling)), module


def edit_config(folder: Path, **changes: object) -> None:
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(config))


def edit_tensors(folder: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(folder / "adapter_model.safetensors")
    change(tensors)
    save_file(tensors, str(folder / "adapter_model.safetensors"))


EMBED = "base_model.model.model.embed_tokens"


def as_linear_lora(tensors: dict[str, torch.Tensor]) -> None:
    """The embedding's LoRA under a linear layer's names, (hidden, rank) as A and (rank, vocabulary) as B."""
    tensors[f"{EMBED}.lora_A.weight"] = tensors.pop(f"{EMBED}.lora_embedding_B").T.contiguous()
    tensors[f"{EMBED}.lora_B.weight"] = tensors.pop(f"{EMBED}.lora_embedding_A").T.contiguous()


REFUSED_PEFT = [
    # (case, adapter, change, the field named in `param`, the reason)
    ("rank_pattern dropped", "rank-pattern", lambda f: edit_config(f, rank_pattern={}),
     "r", r"down_proj.lora_A.weight has rank 16, but adapter_config.json gives \S+.mlp.down_proj rank 8 \(r\)"),
    ("rank_pattern wrong", "rank-pattern", lambda f: edit_config(f, rank_pattern={"down_proj": 32}),
     "rank_pattern", r"has rank 16, but .* rank 32 \(rank_pattern\['down_proj'\]\)"),
    ("rank_pattern above the bound", "rank-pattern", lambda f: edit_config(f, rank_pattern={"nothing": 65}),
     "rank_pattern", "'nothing' rank 65, which exceeds this server's max_lora_rank 64"),
    ("rank_pattern not a rank", "rank-pattern", lambda f: edit_config(f, rank_pattern={"down_proj": 1.5}),
     "rank_pattern", "must be a positive integer"),
    ("rank_pattern not a map", "rank-pattern", lambda f: edit_config(f, rank_pattern=[16]),
     "rank_pattern", "must map module names"),
    ("rank_pattern bad key", "rank-pattern", lambda f: edit_config(f, rank_pattern={"down_proj(": 16}),
     "rank_pattern", "not a regular expression"),
    ("alpha_pattern negative", "alpha-pattern", lambda f: edit_config(f, alpha_pattern={"v_proj": -4}),
     "alpha_pattern", "must be a positive number"),
    ("use_rslora not a flag", "both-patterns-rslora", lambda f: edit_config(f, use_rslora="yes"),
     "use_rslora", "true or false"),
    ("embedding weights trained", "embed-tokens",
     lambda f: edit_tensors(f, lambda t: t[f"{EMBED}.base_layer.weight"][5].add_(1.0)),
     "target_modules", "differ from the base model's; PEFT would load them"),
    ("vocabulary resized", "embed-tokens",
     lambda f: edit_tensors(f, lambda t: t.update({f"{EMBED}.lora_embedding_A": torch.zeros(8, 49153)})),
     "vocab_size", r"lora_embedding_A is sized for a vocabulary of 49153 tokens, the base model's has 49152: the "
     "adapter's tokenizer added tokens .* not served yet"),
    ("half an embedding LoRA", "embed-tokens", lambda f: edit_tensors(f, lambda t: t.pop(f"{EMBED}.lora_embedding_B")),
     "source", "model.embed_tokens has lora_embedding_A but no lora_embedding_B"),
    ("linear LoRA on the embedding", "embed-tokens",
     lambda f: edit_tensors(f, as_linear_lora),
     "source", "is an embedding .* so vLLM would misread"),
    ("tied lm_head LoRA", "embed-tokens-tied", lambda f: None,
     "ensure_weight_tying", "a LoRA on lm_head, which this base model ties to its embedding"),
    ("lm_head LoRA", "lm-head", lambda f: None, "target_modules", "ties to its embedding"),
    ("lora_bias of the wrong shape", "lora-bias",
     lambda f: edit_tensors(f, lambda t: t.update({f"{LAYER}.v_proj.lora_B.bias": torch.ones(576)})),
     "lora_bias", r"v_proj.lora_B.bias has shape \[576\], the base model needs \[192\]"),
    ("lora_bias without its config", "lora-bias", lambda f: edit_config(f, lora_bias=False),
     "lora_bias", r"tensors such as '\S+lora_B.bias' carry a bias .* PEFT would ignore them"),
    ("lora_bias not a flag", "lora-bias", lambda f: edit_config(f, lora_bias="yes"), "lora_bias", "true or false"),
    ("a lora_bias missing", "lora-bias", lambda f: edit_tensors(f, lambda t: t.pop(f"{LAYER}.q_proj.lora_B.bias")),
     "lora_bias", r"sets lora_bias, but \S+q_proj has no lora_B.bias"),
    ("a bias without its LoRA", "lora-bias",
     lambda f: edit_tensors(f, lambda t: t.update({f"{LAYER}.k_proj.lora_B.bias": torch.ones(192)})),
     "lora_bias", r"k_proj has a lora_B.bias but no LoRA"),
    ("a bias on lora_A", "lora-bias",
     lambda f: edit_tensors(f, lambda t: t.update({f"{LAYER}.q_proj.lora_A.bias": torch.ones(8)})),
     "source", r"unsupported tensor '\S+q_proj.lora_A.bias'"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "name", "change", "param", "reason"), REFUSED_PEFT, ids=[c[0] for c in REFUSED_PEFT])
def test_malformed_peft_options_are_refused_naming_the_field(
    tmp_path: Path, peft_made: dict[str, Made], shapes: dict[str, list[int]], model_dir: Path,
    case: str, name: str, change: Callable[[Path], None], param: str, reason: str,
) -> None:  # fmt: skip
    folder = Path(shutil.copytree(peft_made[name].folder, tmp_path / name))
    change(folder)
    with pytest.raises(AdapterInvalid, match=reason) as refused:
        check_peft(folder, shapes, model_dir)
    assert refused.value.param == param


def test_saved_embedding_weights_are_refused_when_no_base_model_folder_is_given_to_compare_them(
    peft_made: dict[str, Made], shapes: dict[str, list[int]]
) -> None:
    with pytest.raises(AdapterInvalid, match="no base model folder to compare it with"):
        validate_adapter(peft_made["embed-tokens"].folder, shapes, max_rank=64, max_bytes=10**9)


def test_an_embedding_lora_whose_b_is_zero_is_registered_with_a_warning(
    tmp_path: Path, peft_made: dict[str, Made], shapes: dict[str, list[int]], model_dir: Path
) -> None:
    folder = Path(shutil.copytree(peft_made["embed-tokens"].folder, tmp_path / "zero"))
    edit_tensors(folder, lambda t: [t[k].zero_() for k in t if k.endswith((".lora_B.weight", ".lora_embedding_B"))])
    assert check_peft(folder, shapes, model_dir).warnings == (NO_OP_WARNING,)


# Options PEFT writes that loraplex does not serve yet: each refused by the name of its field, made by PEFT itself.

NOT_SERVED_YET = [
    # (adapter, change, the field named in `param`, words of the message)
    ("modules-to-save", lambda f: None, "modules_to_save",
     r"modules_to_save: whole modules .* not served yet \(adapter_config.json has modules_to_save=\[\"lm_head\"\]"),
    ("modules-to-save", lambda f: edit_tensors(f, lambda t: t.update({
        "base_model.model.lm_head.modules_to_save.default.weight": t.pop("base_model.model.lm_head.weight")})),
     "modules_to_save", r"not served yet .*modules_to_save.default.weight"),  # an older PEFT's names
    ("trainable-tokens", lambda f: None, "trainable_token_indices",
     r"trainable_token_indices: trained rows of the embedding .* not served yet .*trainable_tokens_delta"),
    ("added-tokens", lambda f: None, "vocab_size",
     r"vocab_size: \S+ is sized for a vocabulary of 49160 tokens, the base model's has 49152: the adapter's "
     r"tokenizer added tokens \(a resized vocabulary\), which is not served yet"),
    ("rank-pattern", lambda f: edit_config(f, layer_replication=[[0, 20], [10, 30]]), "layer_replication",
     "layer_replication: layers repeated .* not served yet"),
    ("rank-pattern", lambda f: edit_config(f, alora_invocation_tokens=[1, 2]), "alora_invocation_tokens",
     "alora_invocation_tokens: activated LoRA .* not served yet"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "change", "param", "words"), NOT_SERVED_YET,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(NOT_SERVED_YET)])  # fmt: skip
def test_options_not_served_yet_are_refused_by_name(
    tmp_path: Path, peft_made: dict[str, Made], shapes: dict[str, list[int]], model_dir: Path,
    name: str, change: Callable[[Path], None], param: str, words: str,
) -> None:  # fmt: skip
    folder = Path(shutil.copytree(peft_made[name].folder, tmp_path / name))
    change(folder)
    with pytest.raises(AdapterInvalid, match=words) as refused:
        check_peft(folder, shapes, model_dir)
    assert refused.value.param == param


# Tensor names under the prefixes PEFT and other trainers write: each must land on a module vLLM applies it to.


def pair(module: str, rank: int = 4) -> dict[str, torch.Tensor]:
    """A LoRA pair on q_proj (576 → 576) under the module name `module`, B not zero."""
    return {f"{module}.lora_A.weight": torch.ones(rank, 576), f"{module}.lora_B.weight": torch.ones(576, rank)}


Q = "model.layers.0.self_attn.q_proj"
SERVED_NAMES = [
    # (layout, the module name the tensors are saved under)
    ("PEFT", f"base_model.model.{Q}"),
    ("without PEFT's prefix", Q),
    ("PEFT's prefix twice (vLLM drops both)", f"base_model.model.base_model.model.{Q}"),
]  # fmt: skip


@pytest.mark.parametrize(("layout", "module"), SERVED_NAMES, ids=[c[0] for c in SERVED_NAMES])
def test_tensor_names_vllm_applies_to_the_base_models_modules_are_accepted(
    tmp_path: Path, shapes: dict[str, list[int]], layout: str, module: str
) -> None:
    meta = check(write_adapter(tmp_path / "a", tensors=pair(module)), shapes)
    assert (meta.target_modules, meta.options, meta.warnings) == (("q_proj",), (), ())  # type: ignore[attr-defined]


MISPLACED_NAMES = [
    # (layout, the tensors, the first tensor the refusal names, how many it counts)
    ("PEFT's prefix on the inner model", pair("base_model.model.layers.0.self_attn.q_proj"),
     "base_model.model.layers.0.self_attn.q_proj.lora_A.weight", 2),
    ("the inner model's names", pair("layers.0.self_attn.q_proj"), "layers.0.self_attn.q_proj.lora_A.weight", 2),
    ("a wrapper's language_model.", pair(f"language_model.{Q}"), f"language_model.{Q}.lora_A.weight", 2),
    ("PEFT over a wrapper", pair(f"base_model.model.language_model.{Q}"),
     f"base_model.model.language_model.{Q}.lora_A.weight", 2),
    ("model. twice", pair(f"base_model.model.model.{Q}"), f"base_model.model.model.{Q}.lora_A.weight", 2),
    ("some layers only", {**pair(f"base_model.model.{Q}"), **pair("language_model.model.layers.1.self_attn.q_proj"),
                          **pair("language_model.model.layers.2.self_attn.q_proj")},
     "language_model.model.layers.1.self_attn.q_proj.lora_A.weight", 4),
]  # fmt: skip


@pytest.mark.parametrize(("layout", "tensors", "first", "count"), MISPLACED_NAMES, ids=[c[0] for c in MISPLACED_NAMES])
def test_tensors_vllm_would_load_and_apply_to_no_module_are_refused_naming_them(
    tmp_path: Path, shapes: dict[str, list[int]], layout: str, tensors: dict[str, torch.Tensor], first: str, count: int
) -> None:
    """vLLM 0.32 checks only a tensor name's last segment at load and looks the LoRA up by whole module name when it
    runs: these would load and change nothing (vLLM issues #34186, #48019, #55193)."""
    with pytest.raises(AdapterInvalid) as refused:
        check(write_adapter(tmp_path / "a", tensors=tensors), shapes)
    message = str(refused.value)
    assert message.startswith(f"{count} tensors are named under a prefix vLLM 0.32 does not map onto this base model")
    assert f"{first!r} is read as module" in message and "apply them to no module" in message
    target = re.search(r"the base model's is '([^']+)'", message)
    assert target is not None and target.group(1) in shapes
    assert f"PEFT's layout names 'base_model.model.{target.group(1)}.lora_A.weight'" in message
    listed = message.split("(the tensors: ")[1]
    assert first in listed and f"'base_model.model.{Q}." not in listed  # the well-named ones stay out
    assert refused.value.param == "source"


def test_two_tensors_vllm_reads_as_one_are_refused_naming_both(tmp_path: Path, shapes: dict[str, list[int]]) -> None:
    """vLLM keeps the last of two tensors it reads under one name: the other would be dropped without a word."""
    tensors = {**pair(f"base_model.model.{Q}"), f"{Q}.lora_B.weight": torch.full((576, 4), 2.0)}
    with pytest.raises(AdapterInvalid, match=rf"'base_model.model.{Q}.lora_B.weight' and '{Q}.lora_B.weight' are both "
                                             rf"lora_B of {Q} .* apply one and drop the other") as refused:  # fmt: skip
        check(write_adapter(tmp_path / "a", tensors=tensors), shapes)
    assert refused.value.param == "source"


@pytest.mark.parametrize(
    "name",
    [f"base_model.model.{Q}.lora_A.weight", f"{Q}.lora_B.weight",
     f"base_model.model.base_model.model.{Q}.lora_A.weight", f"language_model.{Q}.lora_B.weight",
     f"base_model.model.language_model.{Q}.lora_A.weight", f"base_model.model.{Q}.base_model.model.lora_A.weight",
     "base_model.model.model.embed_tokens.lora_embedding_A", "model.embed_tokens.lora_embedding_B"],
)  # fmt: skip
def test_loraplex_reads_tensor_names_as_vllm_does(name: str) -> None:
    from vllm.lora.utils import parse_fine_tuned_lora_name

    module, is_lora_a = parse_fine_tuned_lora_name(name)
    assert split(name) == (module, ("lora_embedding_A" if "embedding" in name else "lora_A") if is_lora_a else
                           ("lora_embedding_B" if "embedding" in name else "lora_B"))  # fmt: skip
