"""PEFT's lora_bias through vLLM's own LoRA loader and layers (serve/vllm_lora_bias.py), against PEFT itself.

vLLM's packed q/k/v, gate/up and row-parallel LoRA layers, built on one process group without an engine, are given
an adapter PEFT made with `lora_bias=True` and a plain one, each in a slot, and one batch mixing their tokens with
base tokens: every row must equal what PEFT's module gives that row.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from serve.vllm_lora_bias import give_buffer
from tests.unit.lora_layers import (
    HIDDEN,
    INTER,
    PACKED,
    PROJECTIONS,
    SLOTS,
    Block,
    load,
    pack,
    process_group,
    punica,
    vllm_layers,
)

__all__ = ["process_group"]  # a fixture of these tests
ADAPTERS = {"biased": (1, True, 31), "plain": (2, False, 32)}
"""name: (vLLM's LoRA id, lora_bias, seed); each in the slot of its id - 1."""
TOKENS = [1, 1, 2, 0, 1, 0, 2, 1]
"""The LoRA id of each token of the batch (0: the base model)."""


@pytest.fixture(scope="module")
def peft_block(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, dict[str, Path]]:
    """A PEFT model over `Block` with both adapters (seeded, init_lora_weights=False: B and its bias not zero), and
    each adapter saved by PEFT to its own folder."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    block = Block()
    model = None
    folders = {}
    root = tmp_path_factory.mktemp("lora-bias")
    # PEFT warns of lora_bias on a layer without a bias (it could not merge it) and of its saved 1-D biases (as if
    # ZeRO-3 shards): neither matters here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, (_, bias, seed) in ADAPTERS.items():
            torch.manual_seed(seed)
            config = LoraConfig(r=4, lora_alpha=12, target_modules=list(PROJECTIONS), lora_bias=bias,
                                rank_pattern={"down_proj": 6}, init_lora_weights=False)  # fmt: skip
            if model is None:
                model = get_peft_model(block, config, adapter_name=name)
            else:
                model.add_adapter(name, config)
            if bias:
                with torch.no_grad():  # PEFT leaves a bias at zero even then: give it values
                    for param_name, param in model.named_parameters():
                        if param_name.endswith(f"lora_B.{name}.bias"):
                            param.copy_(torch.randn(param.shape))
        for name in ADAPTERS:
            model.save_pretrained(root, selected_adapters=[name])
            folders[name] = root / name if (root / name).is_dir() else root
    model.eval()
    return model, folders


def activate(layers: dict[str, Any], slot: int, lora_model: Any) -> None:
    """What vLLM's LoRAModelManager does to put an adapter in a slot (packing, then set_lora), with the plugin's
    bias write (its `activate_adapter` wrapper)."""
    from serve.vllm_lora_bias import write_slot

    for name, layer in layers.items():
        weights = pack(lora_model, name)
        layer.set_lora(slot, weights.lora_a, weights.lora_b)
        write_slot(layer, slot, weights, name)


def peft_rows(model: Any, name: str, x: torch.Tensor) -> torch.Tensor:
    """PEFT's output of the packed layer `name` for inputs `x`, row by row with each token's adapter."""
    rows = []
    modules = model.base_model.model
    for row, lora_id in zip(x, TOKENS, strict=True):
        adapter = next((n for n, (i, _, _) in ADAPTERS.items() if i == lora_id), None)
        inputs = row[None]
        with torch.no_grad():
            if adapter is None:
                with model.disable_adapter():
                    outs = [getattr(modules, part)(inputs) for part in PACKED[name]]
            else:
                model.set_adapter(adapter)
                outs = [getattr(modules, part)(inputs) for part in PACKED[name]]
        rows.append(torch.cat(outs, dim=1))
    return torch.cat(rows)


@pytest.mark.parametrize("ops", ["grouped", "vllm"])
def test_a_batch_of_a_bias_adapter_a_plain_one_and_base_rows_matches_peft(
    peft_block: tuple[Any, dict[str, Path]], process_group: None, ops: str
) -> None:
    model, folders = peft_block
    layers = vllm_layers(model.base_model.model, (give_buffer,))
    for name, (lora_id, _, _) in ADAPTERS.items():
        activate(layers, lora_id - 1, load(folders[name]))
    wrapper = punica(ops, TOKENS)
    x = torch.randn(len(TOKENS), max(HIDDEN, INTER), generator=torch.Generator().manual_seed(5))
    for name, layer in layers.items():
        layer.set_mapping(wrapper)
        inputs = x[:, :INTER] if name == "down_proj" else x[:, :HIDDEN]
        got = layer(inputs)[0]
        want = peft_rows(model, name, inputs)
        assert torch.allclose(got, want, atol=1e-5), (name, (got - want).abs().amax(dim=1))


def test_the_bias_is_what_tells_the_adapters_rows_from_a_plain_loras(
    peft_block: tuple[Any, dict[str, Path]], process_group: None
) -> None:
    """Guards the batch test: each layer's bias moves its adapter's rows well beyond the tolerance."""
    _, folders = peft_block
    lora_model = load(folders["biased"])
    for module in PROJECTIONS:
        lora = lora_model.loras[module]
        assert float(lora.output_bias.abs().max()) > 0.1, module


def test_the_loader_reads_each_bias_scaled_as_peft_adds_it(
    peft_block: tuple[Any, dict[str, Path]], process_group: None
) -> None:
    from safetensors.torch import load_file

    model, folders = peft_block
    saved = load_file(folders["biased"] / "adapter_model.safetensors")
    lora_model = load(folders["biased"])
    for module in PROJECTIONS:
        peft_layer = getattr(model.base_model.model, module)
        scaling = peft_layer.scaling["biased"]
        bias = saved[f"base_model.model.{module}.lora_B.bias"]
        assert torch.equal(lora_model.loras[module].output_bias, bias * scaling), module
    assert all(getattr(lora, "output_bias", None) is None for lora in load(folders["plain"]).loras.values())


def test_vllm_still_refuses_what_is_not_served_beside_lora_bias(
    peft_block: tuple[Any, dict[str, Path]], process_group: None
) -> None:
    from vllm.config.lora import LoRAConfig
    from vllm.lora.peft_helper import PEFTHelper

    config = LoRAConfig(max_loras=SLOTS, max_lora_rank=8)
    settings = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "lora_bias": True}
    PEFTHelper.from_dict(settings).validate_legal(config)
    with pytest.raises(ValueError, match="modules_to_save"):
        PEFTHelper.from_dict({**settings, "modules_to_save": ["lm_head"]}).validate_legal(config)


def test_a_bias_that_no_layer_can_add_fails_the_load(
    peft_block: tuple[Any, dict[str, Path]], process_group: None
) -> None:
    """Before the adapter takes a slot: a bias on a module that is not a linear LoRA layer, a bias of another width
    than the layer's output, a layer sharded by tensor parallelism."""
    from serve.vllm_lora_bias import output_vector

    model, folders = peft_block
    layers = vllm_layers(model.base_model.model, (give_buffer,))
    down = load(folders["biased"]).loras["down_proj"]
    with pytest.raises(ValueError, match="not a linear LoRA layer"):
        output_vector(None, down, "down_proj")
    with pytest.raises(ValueError, match="the layer's output has"):
        output_vector(layers["gate_up_proj"], down, "gate_up_proj")
    layers["down_proj"].tp_size = 2
    with pytest.raises(ValueError, match="tensor parallelism"):
        output_vector(layers["down_proj"], down, "down_proj")


def test_a_slot_given_a_plain_adapter_after_a_bias_one_adds_nothing(
    peft_block: tuple[Any, dict[str, Path]], process_group: None
) -> None:
    from serve.vllm_lora_bias import BUFFER, write_slot

    model, folders = peft_block
    layers = vllm_layers(model.base_model.model, (give_buffer,))
    activate(layers, 0, load(folders["biased"]))
    assert layers["down_proj"].__dict__[BUFFER][0].abs().max() > 0
    activate(layers, 0, load(folders["plain"]))
    for layer in layers.values():
        assert not layer.__dict__[BUFFER].any()
    write_slot(layers["down_proj"], 1, None)  # a slot with no LoRA on this layer
    assert not layers["down_proj"].__dict__[BUFFER].any()


def test_the_manager_writes_a_slots_biases_when_it_activates_an_adapter_there(
    peft_block: tuple[Any, dict[str, Path]], process_group: None
) -> None:
    """vLLM's LoRAModelManager.activate_adapter, wrapped by the plugin: after vLLM's own activation (here a stand-in
    that packs and calls set_lora, as vLLM does), the slot's row of every layer holds the adapter's vector."""
    from vllm.lora.model_manager import LoRAModelManager

    from serve.vllm_lora_bias import BUFFER, _writing_biases, output_vector

    model, folders = peft_block
    layers = vllm_layers(model.base_model.model, (give_buffer,))
    lora_model = load(folders["biased"])
    packed = {}
    for name in layers:
        packed[name] = pack(lora_model, name)
    lora_model.loras = packed
    manager = SimpleNamespace(lora_index_to_id=[None, 7, None], _registered_adapters={7: lora_model}, modules=layers,
                              _get_lora_layer_weights=lambda lora, name: lora.loras.get(name))  # fmt: skip
    for method in (LoRAModelManager._create_lora_modules, LoRAModelManager._create_merged_loras_inplace):
        assert getattr(method, "_loraplex_bias", False), method  # register() installed the manager's side
    assert _writing_biases(lambda self, lora_id: True)(manager, 7)
    for name, layer in layers.items():
        assert torch.equal(layer.__dict__[BUFFER][1], output_vector(layer, packed[name], name)), name
        assert not layer.__dict__[BUFFER][[0, 2, 3]].any(), name


def test_an_adapter_whose_biases_vllm_would_drop_while_packing_fails_its_load(
    peft_block: tuple[Any, dict[str, Path]], process_group: None
) -> None:
    """vLLM packs fused MoE experts into new weights (`pack_moe`) that do not carry the bias: counted before and
    after vLLM's merge, the load fails rather than serve the adapter without them."""
    from serve.vllm_lora_bias import _checking_biases

    model, folders = peft_block
    lora_model = load(folders["biased"])

    def merge_dropping(self: Any, lora: Any) -> None:
        lora.loras["down_proj"].output_bias = None

    manager = SimpleNamespace(modules=vllm_layers(model.base_model.model, (give_buffer,)))
    with pytest.raises(ValueError, match="packs in a way loraplex does not carry"):
        _checking_biases(merge_dropping)(manager, lora_model)
