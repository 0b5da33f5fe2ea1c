"""PEFT's DoRA through vLLM's own LoRA loader and layers (serve/vllm_dora.py), against PEFT itself, and DoRA at
registration (serve/adapters/lora_extras.py).

vLLM's packed q/k/v (with a bias, as Qwen2's), gate/up and row-parallel LoRA layers, built on one process group
without an engine, are given an adapter PEFT made with `use_dora=True` (its magnitudes moved away from the row norms,
as training moves them) and a plain one, each in a slot, and one batch mixing their tokens with base tokens: every
row must equal what PEFT's module gives that row.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from serve import vllm_dora, vllm_lora_bias
from serve.adapters.safetensors_files import NO_OP_WARNING, base_linear_shapes
from serve.adapters.validation import DORA_OPTION, AdapterInvalid, validate_adapter
from serve.demo.assets import DEFAULT_MODEL_NAME, build_default_model
from tests.unit.lora_layers import (
    HIDDEN,
    INTER,
    PACKED,
    PROJECTIONS,
    Block,
    load,
    pack,
    process_group,
    punica,
    vllm_layers,
)

__all__ = ["process_group"]  # a fixture of these tests

ADAPTERS = {"dora": (1, True, 41), "plain": (2, False, 42)}
"""name: (vLLM's LoRA id, use_dora, seed); each in the slot of its id - 1."""
TOKENS = [1, 1, 2, 0, 1, 0, 2, 1]
"""The LoRA id of each token of the batch (0: the base model)."""
BUFFERS = (vllm_lora_bias.give_buffer, vllm_dora.give_buffer)
"""What the plugin's manager gives every linear LoRA layer."""


@pytest.fixture(scope="module")
def peft_block(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, dict[str, Path]]:
    """A PEFT model over `Block` (q/k/v with a bias) with both adapters (seeded, init_lora_weights=False: B not zero;
    each DoRA magnitude scaled per channel by 0.5 to 1.5, so g is not 1), each saved by PEFT to its own folder."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    block = Block(qkv_bias=True)
    model = None
    folders = {}
    root = tmp_path_factory.mktemp("dora")
    with warnings.catch_warnings():  # PEFT warns of its saved 1-D magnitudes (as if ZeRO-3 shards)
        warnings.simplefilter("ignore")
        for name, (_, dora, seed) in ADAPTERS.items():
            torch.manual_seed(seed)
            config = LoraConfig(r=4, lora_alpha=12, target_modules=list(PROJECTIONS), use_dora=dora,
                                rank_pattern={"down_proj": 6}, init_lora_weights=False)  # fmt: skip
            if model is None:
                model = get_peft_model(block, config, adapter_name=name)
            else:
                model.add_adapter(name, config)
            with torch.no_grad():
                for param_name, param in model.named_parameters():
                    if param_name.endswith(f"lora_magnitude_vector.{name}.weight"):
                        param.mul_(0.5 + torch.rand(param.shape))
        for name in ADAPTERS:
            model.save_pretrained(root, selected_adapters=[name])
            folders[name] = root / name if (root / name).is_dir() else root
    model.eval()
    return model, folders


def activate(layers: dict[str, Any], slot: int, lora_model: Any) -> dict[str, Any]:
    """What vLLM's LoRAModelManager does to put an adapter in a slot, with the plugin's steps: packing and scaling,
    then g folded (its merge wrapper), set_lora, and the slot's scales written (its activation wrapper). Returns the
    packed weights."""
    packed = {}
    for name, layer in layers.items():
        weights = packed[name] = pack(lora_model, name)
        if getattr(weights, "dora_magnitude", None) is not None:
            vllm_dora.fold_magnitudes(layer, weights, name)
        layer.set_lora(slot, weights.lora_a, weights.lora_b)
        vllm_lora_bias.write_slot(layer, slot, weights, name)
        vllm_dora.write_slot(layer, slot, weights, name)
    return packed


def peft_rows(model: Any, name: str, x: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """PEFT's output of vLLM's layer `name` for inputs `x`, row by row with each token's adapter."""
    rows = []
    modules = model.base_model.model
    for row, lora_id in zip(x, tokens, strict=True):
        adapter = next((n for n, (i, _, _) in ADAPTERS.items() if i == lora_id), None)
        with torch.no_grad():
            if adapter is None:
                with model.disable_adapter():
                    outs = [getattr(modules, part)(row[None]) for part in PACKED[name]]
            else:
                model.set_adapter(adapter)
                outs = [getattr(modules, part)(row[None]) for part in PACKED[name]]
        rows.append(torch.cat(outs, dim=1))
    return torch.cat(rows)


def inputs_of(name: str, tokens: int = len(TOKENS)) -> torch.Tensor:
    x = torch.randn(tokens, max(HIDDEN, INTER), generator=torch.Generator().manual_seed(5))
    return x[:, :INTER] if name == "down_proj" else x[:, :HIDDEN]


def loaded_layers(model: Any, folders: dict[str, Path]) -> dict[str, Any]:
    layers = vllm_layers(model.base_model.model, BUFFERS)
    for name, (lora_id, _, _) in ADAPTERS.items():
        activate(layers, lora_id - 1, load(folders[name]))
    return layers


@pytest.mark.parametrize("ops", ["grouped", "vllm"])
def test_a_batch_of_a_dora_adapter_a_plain_one_and_base_rows_matches_peft(
    peft_block: tuple[Any, dict[str, Path]], process_group: None, ops: str
) -> None:
    model, folders = peft_block
    layers = loaded_layers(model, folders)
    wrapper = punica(ops, TOKENS)
    for name, layer in layers.items():
        layer.set_mapping(wrapper)
        got = layer(inputs_of(name))[0]
        want = peft_rows(model, name, inputs_of(name), TOKENS)
        assert torch.allclose(got, want, atol=1e-5), (name, (got - want).abs().amax(dim=1))


def test_a_layer_whose_lora_runs_after_its_own_forward_matches_peft(
    peft_block: tuple[Any, dict[str, Path]], process_group: None
) -> None:
    """vLLM's ReplicatedLinear LoRA layer applies the base layer's own forward (bias added inside it), then LoRA
    (`_apply_base_forward`): down_proj (with a bias) as one, in the same mixed batch."""
    from vllm.config.lora import LoRAConfig
    from vllm.lora.layers import ReplicatedLinearWithLoRA
    from vllm.model_executor.layers.linear import ReplicatedLinear

    model, folders = peft_block
    peft_down = model.base_model.model.down_proj.base_layer
    base = ReplicatedLinear(INTER, HIDDEN, bias=True, prefix="down_proj")
    with torch.no_grad():
        base.weight.copy_(peft_down.weight)
        base.bias.copy_(peft_down.bias)
    base.quant_method.process_weights_after_loading(base)
    layer = ReplicatedLinearWithLoRA(base)
    layer.create_lora_weights(3, LoRAConfig(max_loras=3, max_lora_rank=8, lora_dtype=torch.float32))
    for give in BUFFERS:
        give(layer, 3)
    for name, (lora_id, _, _) in ADAPTERS.items():
        activate({"down_proj": layer}, lora_id - 1, load(folders[name]))
    layer.set_mapping(punica("grouped", TOKENS))
    got = layer(inputs_of("down_proj"))[0]
    want = peft_rows(model, "down_proj", inputs_of("down_proj"), TOKENS)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().amax(dim=1)


def test_the_magnitude_is_what_tells_the_adapters_rows_from_a_plain_loras(
    peft_block: tuple[Any, dict[str, Path]], process_group: None
) -> None:
    """Guards the batch test: with g = 1 (its magnitudes ignored) the DoRA adapter's rows would be far off PEFT's."""
    model, folders = peft_block
    layers = loaded_layers(model, folders)
    dora_rows = [i for i, lora_id in enumerate(TOKENS) if lora_id == 1]
    for name, layer in layers.items():
        layer.set_mapping(punica("grouped", TOKENS))
        plain_lora = pack(load(folders["dora"]), name)  # the DoRA slot as plain LoRA: B not scaled, no base term
        layer.set_lora(0, plain_lora.lora_a, plain_lora.lora_b)
        layer.__dict__[vllm_dora.BUFFER][0].zero_()
        plain = layer(inputs_of(name))[0]
        want = peft_rows(model, name, inputs_of(name), TOKENS)
        assert (plain - want)[dora_rows].abs().amax() > 0.05, name


def test_g_from_the_recorded_norms_and_the_layers_forward_equals_pefts(
    peft_block: tuple[Any, dict[str, Path]], process_group: None
) -> None:
    """g = m / ||W + s B A|| per output channel, computed without the base weight (which vLLM's CPU GEMM dropped),
    equals PEFT's own magnitude over PEFT's own weight norm; B is folded as g * s B."""
    model, folders = peft_block
    layers = vllm_layers(model.base_model.model, BUFFERS)
    packed = activate(layers, 0, load(folders["dora"]))
    plain = {name: pack(load(folders["dora"]), name) for name in layers}
    for name in layers:
        want = []
        for part in PACKED[name]:
            peft_layer = getattr(model.base_model.model, part)
            dora = peft_layer.lora_magnitude_vector["dora"]
            with torch.no_grad():
                lora_weight = peft_layer.lora_B["dora"].weight @ peft_layer.lora_A["dora"].weight
                norm = dora.get_weight_norm(peft_layer.base_layer.weight, lora_weight, peft_layer.scaling["dora"])
            want.append(dora.weight / norm)
        g = packed[name].output_scale + 1
        assert torch.allclose(g, torch.cat(want), atol=1e-6, rtol=1e-5), name
        assert (g - 1).abs().max() > 0.1, name  # the magnitudes were moved away from the norms
        folded = packed[name].lora_b if isinstance(packed[name].lora_b, list) else [packed[name].lora_b]
        unfolded = plain[name].lora_b if isinstance(plain[name].lora_b, list) else [plain[name].lora_b]
        assert torch.allclose(torch.cat(folded), g[:, None] * torch.cat(unfolded), atol=1e-6), name


def test_the_row_norms_are_recorded_before_vllms_cpu_gemm_may_drop_the_weight(
    peft_block: tuple[Any, dict[str, Path]], process_group: None
) -> None:
    model, _ = peft_block
    block = model.base_model.model
    layers = vllm_layers(block, BUFFERS)
    for name, layer in layers.items():
        weight = torch.cat([getattr(block, part).base_layer.weight for part in PACKED[name]])
        recorded = layer.base_layer.__dict__[vllm_dora.ROW_NORMS]
        assert torch.allclose(recorded, weight.detach().pow(2).sum(dim=1), rtol=1e-5), name


def test_a_magnitude_that_no_layer_can_apply_fails_the_load(
    peft_block: tuple[Any, dict[str, Path]], process_group: None
) -> None:
    """Before the adapter takes a slot: a magnitude on a module that is not a linear LoRA layer, on a layer of
    another width, sharded by tensor parallelism, run on vLLM's dual CUDA streams, or whose norms were not recorded."""
    model, folders = peft_block

    def fold(layer: Any, name: str = "down_proj", module: str = "down_proj") -> None:
        vllm_dora.fold_magnitudes(layer, pack(load(folders["dora"]), module), name)

    layers = vllm_layers(model.base_model.model, BUFFERS)
    with pytest.raises(ValueError, match="not a linear LoRA layer"):
        fold(None)
    with pytest.raises(ValueError, match="magnitudes for 1 slices, the layer has 2"):
        fold(layers["gate_up_proj"], "gate_up_proj")
    for attribute, value, words in [("tp_size", 2, "tensor parallelism"),
                                    ("_enable_aux_cuda_stream", True, "VLLM_LORA_ENABLE_DUAL_STREAM")]:  # fmt: skip
        layer = vllm_layers(model.base_model.model, BUFFERS)["down_proj"]
        setattr(layer, attribute, value)
        with pytest.raises(ValueError, match=words):
            fold(layer)
    del layers["down_proj"].base_layer.__dict__[vllm_dora.ROW_NORMS]
    with pytest.raises(ValueError, match="recorded only for unquantized linear layers"):
        fold(layers["down_proj"])


def test_a_slot_given_a_plain_adapter_after_a_dora_one_scales_nothing(
    peft_block: tuple[Any, dict[str, Path]], process_group: None
) -> None:
    model, folders = peft_block
    layers = vllm_layers(model.base_model.model, BUFFERS)
    activate(layers, 0, load(folders["dora"]))
    assert layers["qkv_proj"].__dict__[vllm_dora.BUFFER][0].abs().max() > 0
    activate(layers, 0, load(folders["plain"]))
    for name, layer in layers.items():
        assert not layer.__dict__[vllm_dora.BUFFER].any(), name
        assert not layer.__dict__[vllm_dora.HELD], name
    for name, layer in layers.items():  # LoRA id 1 is in slot 0: the plain adapter's rows, as PEFT's (id 2)
        layer.set_mapping(punica("grouped", [1, 0, 1]))
        want = peft_rows(model, name, inputs_of(name, 3), [2, 0, 2])
        assert torch.allclose(layer(inputs_of(name, 3))[0], want, atol=1e-5), name


def test_the_manager_folds_g_when_it_merges_and_writes_a_slots_scales_when_it_activates(
    peft_block: tuple[Any, dict[str, Path]], process_group: None
) -> None:
    """vLLM's LoRAModelManager, wrapped by the plugin: after vLLM's own merge (here a stand-in that packs, as vLLM
    does), each packed layer's g is folded; after its activation, the slot's row of every layer holds g - 1."""
    from vllm.lora.model_manager import LoRAModelManager

    from serve.vllm_dora import BUFFER, _folding_magnitudes, _writing_scales

    model, folders = peft_block
    layers = vllm_layers(model.base_model.model, BUFFERS)
    lora_model = load(folders["dora"])

    def merge(self: Any, lora: Any) -> None:
        lora.loras = {name: pack(lora, name) for name in layers}

    for method in (LoRAModelManager._create_lora_modules, LoRAModelManager._create_merged_loras_inplace):
        assert getattr(method, "_loraplex_dora", False), method  # register() installed the manager's side
    manager = SimpleNamespace(lora_index_to_id=[None, 7, None], _registered_adapters={7: lora_model}, modules=layers,
                              _get_lora_layer_weights=lambda lora, name: lora.loras.get(name))  # fmt: skip
    _folding_magnitudes(merge)(manager, lora_model)
    assert _writing_scales(lambda self, lora_id: True)(manager, 7)
    for name, layer in layers.items():
        scale = lora_model.loras[name].output_scale
        assert scale.abs().max() > 0.1 and torch.equal(layer.__dict__[BUFFER][1], scale), name
        assert not layer.__dict__[BUFFER][[0, 2, 3]].any(), name


def test_an_adapter_whose_magnitudes_vllm_would_drop_while_packing_fails_its_load(
    peft_block: tuple[Any, dict[str, Path]], process_group: None
) -> None:
    """vLLM packs fused MoE experts into new weights (`pack_moe`) that do not carry the magnitudes: counted before
    and after vLLM's merge, the load fails rather than serve the adapter as plain LoRA."""
    model, folders = peft_block
    lora_model = load(folders["dora"])

    def merge_dropping(self: Any, lora: Any) -> None:
        lora.loras["down_proj"].dora_magnitude = None

    manager = SimpleNamespace(modules=vllm_layers(model.base_model.model, BUFFERS))
    with pytest.raises(ValueError, match="packs in a way loraplex does not carry"):
        vllm_dora._folding_magnitudes(merge_dropping)(manager, lora_model)


def test_the_loader_reads_each_magnitude_beside_its_lora(
    peft_block: tuple[Any, dict[str, Path]], process_group: None
) -> None:
    _, folders = peft_block
    saved = load_file(folders["dora"] / "adapter_model.safetensors")
    lora_model = load(folders["dora"])
    for module in PROJECTIONS:
        magnitude = saved[f"base_model.model.{module}.lora_magnitude_vector"]
        assert torch.equal(lora_model.loras[module].dora_magnitude, magnitude), module
    assert all(getattr(lora, "dora_magnitude", None) is None for lora in load(folders["plain"]).loras.values())


def test_vllm_now_takes_dora_and_still_refuses_what_is_not_served() -> None:
    from vllm.config.lora import LoRAConfig
    from vllm.lora.peft_helper import PEFTHelper

    from serve.vllm_patches import register

    register()
    config = LoRAConfig(max_loras=2, max_lora_rank=8)
    settings = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "use_dora": True}
    PEFTHelper.from_dict(settings).validate_legal(config)
    with pytest.raises(ValueError, match="modules_to_save"):
        PEFTHelper.from_dict({**settings, "modules_to_save": ["lm_head"]}).validate_legal(config)


# Registration: DoRA adapters made by PEFT on the demo model.

ASSETS = Path(__file__).resolve().parents[2] / ".loraplex"
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LAYER = "base_model.model.model.layers.0.self_attn"


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return build_default_model(ASSETS / "models" / DEFAULT_MODEL_NAME)


@pytest.fixture(scope="module")
def dora_folders(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """PEFT DoRA adapters on the demo model: on every linear layer, and on the embedding and q_proj."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("dora-peft")
    targets = {"all-linear": ALL_LINEAR, "embedding": ["embed_tokens", "q_proj"]}
    for name, modules in targets.items():
        torch.manual_seed(3)
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        config = LoraConfig(r=8, lora_alpha=16, target_modules=modules, use_dora=True, init_lora_weights=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            get_peft_model(base, config).save_pretrained(root / name)
    return {name: root / name for name in targets}


def check(folder: Path, model_dir: Path) -> Any:
    return validate_adapter(folder, base_linear_shapes(model_dir), max_rank=64, max_bytes=10**9, base_model=model_dir)


def edit(folder: Path, dest: Path, config: dict[str, object] | None = None, tensors: Any = None) -> Path:
    shutil.copytree(folder, dest)
    if config is not None:
        settings = json.loads((dest / "adapter_config.json").read_text())
        (dest / "adapter_config.json").write_text(json.dumps({**settings, **config}))
    if tensors is not None:
        saved = load_file(dest / "adapter_model.safetensors")
        tensors(saved)
        save_file(saved, str(dest / "adapter_model.safetensors"))
    return dest


def test_a_dora_adapter_on_every_linear_layer_is_accepted_and_its_record_says_how_it_is_served(
    dora_folders: dict[str, Path], model_dir: Path
) -> None:
    meta = check(dora_folders["all-linear"], model_dir)
    assert meta.options == (DORA_OPTION,) and meta.target_modules == tuple(sorted(ALL_LINEAR))
    assert meta.warnings == ()


def test_a_dora_adapter_whose_b_is_zero_gets_no_no_op_warning(
    dora_folders: dict[str, Path], model_dir: Path, tmp_path: Path
) -> None:
    """Its magnitudes still scale the base output: the warning that it answers as the base model would be false."""
    folder = edit(dora_folders["all-linear"], tmp_path / "zero", tensors=lambda t: [
        t[k].zero_() for k in t if k.endswith(".lora_B.weight")])  # fmt: skip
    assert NO_OP_WARNING not in check(folder, model_dir).warnings


def drop(tensor: str) -> Any:
    return lambda tensors: tensors.pop(tensor)


REFUSED = [
    # (case, adapter, config changes, tensor changes, param, the reason)
    ("DoRA on the embedding", "embedding", None, None, "use_dora",
     r"use_dora: DoRA on embed_tokens \(\S+embed_tokens.lora_magnitude_vector\) is not served"),
    ("DoRA on the embedding, its magnitude not saved", "embedding", None,
     drop("base_model.model.model.embed_tokens.lora_magnitude_vector"), "use_dora",
     r"use_dora: DoRA on embed_tokens \(model.embed_tokens\) is not served"),
    ("DoRA with lora_bias", "all-linear", {"lora_bias": True}, None, "use_dora", "PEFT refuses the pair"),
    ("magnitudes without use_dora", "all-linear", {"use_dora": False}, None, "use_dora",
     r"carry DoRA magnitudes, but adapter_config.json does not set use_dora: PEFT would ignore them"),
    ("use_dora not a flag", "all-linear", {"use_dora": "yes"}, None, "use_dora", "true or false"),
    ("a magnitude missing", "all-linear", None, drop(f"{LAYER}.k_proj.lora_magnitude_vector"), "use_dora",
     r"sets use_dora, but \S+k_proj has no lora_magnitude_vector"),
    ("a magnitude of the wrong shape", "all-linear", None,
     lambda t: t.update({f"{LAYER}.k_proj.lora_magnitude_vector": torch.ones(576)}), "use_dora",
     r"k_proj.lora_magnitude_vector has shape \[576\], the base model needs \[192\]"),
    ("a magnitude without its LoRA", "all-linear", None,
     lambda t: [t.pop(f"{LAYER}.k_proj.lora_{x}.weight") for x in "AB"], "use_dora",
     r"k_proj has a lora_magnitude_vector but no LoRA"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "name", "config", "tensors", "param", "reason"), REFUSED, ids=[c[0] for c in REFUSED])
def test_dora_that_would_not_be_served_as_peft_serves_it_is_refused_naming_use_dora(
    dora_folders: dict[str, Path], model_dir: Path, tmp_path: Path,
    case: str, name: str, config: dict[str, object] | None, tensors: Any, param: str, reason: str,
) -> None:  # fmt: skip
    folder = edit(dora_folders[name], tmp_path / name, config, tensors)
    with pytest.raises(AdapterInvalid, match=reason) as refused:
        check(folder, model_dir)
    assert refused.value.param == param
