"""vLLM's linear LoRA layers built on one process group without an engine, for tests of loraplex's plugin against PEFT.

A decoder block's linear layers as PEFT sees them (`Block`), the same weights in vLLM's packed q/k/v, gate/up and
row-parallel LoRA layers (`vllm_layers`), an adapter put in a slot as vLLM's manager does (`activate`), and a CPU
punica wrapper told each token's LoRA id (`punica`).
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from serve.vllm_patches import register

HIDDEN, HEAD, HEADS, KV_HEADS, INTER = 24, 8, 4, 2, 40
SLOTS = 3
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj")
PACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj"),
          "down_proj": ("down_proj",)}  # fmt: skip
"""vLLM's layer → the modules PEFT sees in it, in the order of its output slices."""


class Block(nn.Module):
    """The linear layers of a decoder block, as PEFT sees them (vLLM packs q/k/v and gate/up); `qkv_bias`: q/k/v
    have a bias, as Qwen2's do."""

    def __init__(self, qkv_bias: bool = False) -> None:
        super().__init__()
        self.q_proj = nn.Linear(HIDDEN, HEADS * HEAD, bias=qkv_bias)
        self.k_proj = nn.Linear(HIDDEN, KV_HEADS * HEAD, bias=qkv_bias)
        self.v_proj = nn.Linear(HIDDEN, KV_HEADS * HEAD, bias=qkv_bias)
        self.gate_proj = nn.Linear(HIDDEN, INTER, bias=False)
        self.up_proj = nn.Linear(HIDDEN, INTER, bias=False)
        self.down_proj = nn.Linear(INTER, HIDDEN, bias=True)


@pytest.fixture(scope="module")
def process_group() -> Iterator[None]:
    """vLLM's parallel state for one process (its linear layers read their tensor-parallel rank from it)."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.distributed.parallel_state import model_parallel_is_initialized

    register()  # loraplex's vLLM plugin, as in every vLLM process
    with set_current_vllm_config(VllmConfig()):
        if not model_parallel_is_initialized():
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
            init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                         distributed_init_method=f"tcp://127.0.0.1:{port}")  # fmt: skip
            initialize_model_parallel(1, 1)
        yield


def load(folder: Path) -> Any:
    """vLLM's LoRAModel for a PEFT folder, read as its worker reads it (the plugin's patches in place)."""
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper

    helper = PEFTHelper.from_local_dir(str(folder), max_position_embeddings=None)
    return LoRAModel.from_local_checkpoint(str(folder), set(PROJECTIONS), helper, lora_model_id=1, device="cpu",
                                           dtype=torch.float32)  # fmt: skip


def vllm_layers(block: Block, buffers: tuple[Callable[[Any, int], None], ...]) -> dict[str, Any]:
    """vLLM's LoRA layers over `block`'s weights: qkv_proj, gate_up_proj (packed) and down_proj, loaded as vLLM's
    loader leaves them (the CPU GEMM picked, the weight dropped), each given `buffers` as the plugin's manager gives
    every linear LoRA layer its per-slot buffers."""
    from vllm.config.lora import LoRAConfig
    from vllm.lora.layers import (
        MergedColumnParallelLinearWithLoRA,
        MergedQKVParallelLinearWithLoRA,
        RowParallelLinearWithLoRA,
    )
    from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear

    qkv_bias = block.q_proj.bias is not None
    qkv = QKVParallelLinear(HIDDEN, HEAD, HEADS, KV_HEADS, bias=qkv_bias, prefix="qkv_proj")
    gate_up = MergedColumnParallelLinear(HIDDEN, [INTER, INTER], bias=False, prefix="gate_up_proj")
    down = RowParallelLinear(INTER, HIDDEN, bias=True, prefix="down_proj")
    with torch.no_grad():
        qkv.weight.copy_(torch.cat([block.q_proj.weight, block.k_proj.weight, block.v_proj.weight]))
        if qkv_bias:
            qkv.bias.copy_(torch.cat([block.q_proj.bias, block.k_proj.bias, block.v_proj.bias]))
        gate_up.weight.copy_(torch.cat([block.gate_proj.weight, block.up_proj.weight]))
        down.weight.copy_(block.down_proj.weight)
        down.bias.copy_(block.down_proj.bias)
    for base in (qkv, gate_up, down):
        base.quant_method.process_weights_after_loading(base)  # what vLLM's loader does: picks the CPU GEMM
    layers = {"qkv_proj": MergedQKVParallelLinearWithLoRA(qkv), "gate_up_proj": MergedColumnParallelLinearWithLoRA(
        gate_up), "down_proj": RowParallelLinearWithLoRA(down)}  # fmt: skip
    config = LoRAConfig(max_loras=SLOTS, max_lora_rank=8, lora_dtype=torch.float32)
    for layer in layers.values():
        layer.create_lora_weights(SLOTS, config)
        for give in buffers:
            give(layer, SLOTS)
    return layers


def pack(lora_model: Any, name: str) -> Any:
    """The weights of vLLM's layer `name` in `lora_model`, packed and scaled as vLLM's manager does."""
    from vllm.lora.lora_weights import PackedLoRALayerWeights

    parts = [lora_model.loras[part] for part in PACKED[name]]
    return PackedLoRALayerWeights.pack(parts) if len(parts) > 1 else parts[0].optimize()


def punica(kind: str, tokens: list[int]) -> Any:
    """A CPU punica wrapper (loraplex's `grouped` or vLLM's own) told each token's LoRA id (0: base), as vLLM's
    manager tells it every step; LoRA id i is in slot i - 1."""
    from vllm.lora.layers import LoRAMapping

    from serve.cpu_lora import GroupedPunicaWrapperCPU, PunicaWrapperCPU

    wrapper = (GroupedPunicaWrapperCPU if kind == "grouped" else PunicaWrapperCPU)(64, 16, "cpu")
    mapping = LoRAMapping(index_mapping=tuple(tokens), prompt_mapping=tuple(tokens), is_prefill=True)
    wrapper.update_metadata(mapping, [1, 2, None], SLOTS + 1, 100)
    return wrapper
