"""The engine each engine replica runs (vLLM or the simulated engine) and how its LoRA slots are sized."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from serve.adapters.safetensors_files import AdapterInvalid, base_linear_shapes
from serve.config._base import _Strict

# vLLM sizes its LoRA buffers by max_lora_rank and accepts only these bounds.
LoraRank = Literal[1, 8, 16, 32, 64, 128, 256, 320, 512]


class SimulatedEngineConfig(_Strict):
    """A stand-in engine with no model: it answers in the wire protocol at a set step rate.

    For measuring the serving path at GPU token rates on any machine, and for router tests that need
    no model. Like a real engine it runs steps: each step gives every running sequence
    `tokens_per_step` tokens; at most `EngineConfig.max_num_seqs` sequences run, the rest wait.
    """

    step_ms: float = Field(default=20.0, gt=0, description="Duration of one engine step (decode), in milliseconds.")
    tokens_per_step: int = Field(default=1, ge=1, description="Tokens each running sequence gets per step.")
    prefill_ms: float = Field(
        default=0.0, ge=0, description="Extra time before a sequence's first token (prompt processing)."
    )
    adapter_load_ms: float = Field(
        default=0.0, ge=0, description="Time to load an adapter the engine does not hold yet."
    )
    default_max_tokens: int = Field(
        default=16, ge=1, description="Tokens generated when a request sets no max_tokens (a real engine stops at EOS)."
    )
    lora_slots: bool = Field(
        default=False,
        description=(
            "Model the engine's LoRA slots: a step runs requests of at most `EngineConfig.max_loras` adapters "
            "(4 when unset), admitted as vLLM's scheduler admits them, under the slot policy (`slot_wait_s`)."
        ),
    )


GPU_LORA_SLOTS = 4
CPU_LORA_SLOTS = (4, 16)
CPU_LORA_BUFFER_BYTES = 2 * 1024**3


def lora_slot_bytes(model_dir: Path, max_rank: int, dtype_bytes: int) -> int:
    """Bytes of one LoRA slot's buffers in vLLM: A (rank x in) and B (out x rank) for every linear layer of the
    decoder layers, at the rank bound; 0 when the model's weights cannot be read (no folder, a simulated engine)."""
    try:
        shapes = base_linear_shapes(model_dir)
    except (OSError, AdapterInvalid):
        return 0
    return sum((out + into) * max_rank * dtype_bytes for name, (out, into) in shapes.items() if ".layers." in name)


class EngineConfig(_Strict):
    """Settings of the engine that each engine replica runs: vLLM, or the simulated engine."""

    kind: Literal["vllm", "simulated"] = Field(
        default="vllm",
        description="`vllm`: the real engine. `simulated`: no model, tokens at a set rate (`simulated`), for "
        "measuring the serving path and testing routing.",
    )
    simulated: SimulatedEngineConfig = Field(
        default_factory=SimulatedEngineConfig, description="Step rate and sizes of the simulated engine."
    )
    model: str = Field(
        description="Path of a Hugging Face-format causal LM folder (with the simulated engine, only its name is used)."
    )
    served_model_name: str | None = Field(
        default=None,
        description="Public id of the base model; defaults to the model folder's name.",
    )
    max_loras: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Adapters that can take part in one engine step (the engine's LoRA slots). None: 4 on a GPU; on a "
            "CPU, as many as fit in 2 GiB of LoRA buffers, 4 to 16 (16 for the demo model at rank bound 64): "
            "there slots cost host memory only, and a request whose adapter finds no free slot waits."
        ),
    )
    max_lora_rank: LoraRank = Field(
        default=64,
        description=(
            "Largest adapter rank accepted. vLLM sizes its LoRA buffers by this bound, so on CPU it "
            "dominates the cost of adapter requests: 64 admits most published adapters; lower it "
            "(e.g. 16) when every adapter you serve is small."
        ),
    )
    max_cpu_loras: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Unpinned adapters kept in the engine's CPU cache (LRU). Default: 4 x max_loras with the slot policy "
            "on (slot_wait_s), so an adapter that gave its slot up is still in memory when it gets one back; "
            "max_loras with it off."
        ),
    )
    max_pinned_loras: int = Field(
        default=2,
        ge=0,
        description=(
            "Adapters that may be pinned (a version being rolled out of a pinned adapter counts as one more). The "
            "engine's adapter cache holds them beside max_cpu_loras unpinned ones (and one spare for a version "
            "switch), so a step of max_loras other adapters never evicts one of its own; a pin beyond this, counted "
            "in the registry's store (another registry's pins too), is refused (409)."
        ),
    )
    slot_wait_s: float | None = Field(
        default=0.25,
        gt=0,
        description=(
            "Bound on an adapter's wait for one of the engine's max_loras slots for a request's first token, in "
            "seconds: past it, its requests go first and, when no slot is free, the holder with the fewest running "
            "requests gives its slot up (those requests pause, keeping their KV cache, and go on later; "
            "serve/slots.py). A request then waits at most slot_wait_s + slot_hold_s for its first token while fewer "
            "adapters are overdue than there are slots. None: vLLM's own rule (first come, first served; a running "
            "request keeps its slot until it ends)."
        ),
    )
    slot_hold_s: float = Field(
        default=1.0,
        ge=0,
        description="Least time an adapter keeps a slot it gained before the slot policy may take it for another.",
    )
    slot_pause_s: float | None = Field(
        default=2.0,
        gt=0,
        description=(
            "Least time the requests an adapter had paused stay paused before it claims a slot back (they have "
            "answered already: a pause delays their next token, not their first); longer pauses, fewer slot "
            "switches. None: slot_wait_s."
        ),
    )
    max_model_len: int = Field(default=2048, ge=16, description="Longest prompt plus completion, in tokens.")
    max_num_seqs: int = Field(default=64, ge=1, description="Sequences the engine batches in one step.")
    dtype: Literal["checkpoint", "auto", "float32", "bfloat16", "float16"] = Field(
        default="auto",
        description=(
            "Weights and activations type. `auto`: vLLM's own choice on a GPU (the checkpoint's half type), "
            "float32 on a CPU, where vLLM's bfloat16 with LoRA enabled streamed 3.5x slower here. `checkpoint` "
            "uses the dtype the model's config.json declares (float32 for the demo model), so outputs match "
            "transformers + PEFT exactly."
        ),
    )
    kv_cache_gib: float = Field(default=2.0, gt=0, description="KV cache size in GiB on CPU (VLLM_CPU_KVCACHE_SPACE).")
    gpu_memory_utilization: float = Field(
        default=0.5, gt=0, le=1, description="Fraction of accelerator memory the engine may use."
    )
    cpu_threads_bind: str = Field(
        default="auto",
        description="CPU cores of the engine's worker (VLLM_CPU_OMP_THREADS_BIND): `auto`, `nobind` or ids like `0-3`.",
    )
    cpu_lora_ops: Literal["grouped", "vllm"] = Field(
        default="grouped",
        description=(
            "LoRA work in the engine, through loraplex's vLLM plugin (serve/vllm_patches.py). `grouped`: on a CPU, "
            "one product per adapter slot in the batch at the adapter's own rank (serve/cpu_lora.py), and on any "
            "device, activating an adapter zeroes only what its slot's previous adapter wrote. `vllm`: vLLM's own "
            "CPU ops and full slot resets. Same results either way; the fix of vLLM's CPU ops for base-model rows "
            "applies to both (docs/cpu.md)."
        ),
    )
    spawn_cpus: list[int] | None = Field(
        default=None,
        description=(
            "CPUs the engine's own processes may use when its replica was confined to fewer; `loraplex serve` sets "
            "it when it keeps Ray's processes off vLLM's cores (--infra-cpus). None: the replica's CPUs."
        ),
    )
    tool_call_parser: str | None = Field(
        default=None,
        min_length=1,
        description=(
            "vLLM's tool-call parser for this model's chat format (e.g. `hermes`, `llama3_json`, `mistral`): chat and "
            "Responses requests may then send `tools` with `tool_choice` auto, required or a named function. None: "
            "tools are refused (vLLM's `--enable-auto-tool-choice --tool-call-parser`)."
        ),
    )
    tool_call_parsers: list[str] = Field(
        default_factory=list,
        description=(
            "More tool-call parsers, for adapters whose chat format differs from the base model's: an adapter "
            "registered with `tool_call_parser` set to one of these (or to `tool_call_parser`) gets tools with that "
            "parser. Each is built when the engine starts, so a name vLLM does not know stops it at start."
        ),
    )
    enforce_eager: bool = Field(default=True, description="Skip graph capture; faster start-up on CPU.")
    seed: int = Field(default=0, description="Engine seed, for reproducible sampling with a request seed.")

    @model_validator(mode="after")
    def _cpu_tier_holds_engine_slots(self) -> EngineConfig:
        if self.max_cpu_loras is not None and self.max_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError("max_cpu_loras must be at least max_loras")
        return self

    def lora_slots(self, on_cpu: bool) -> int:
        """`max_loras`, or its default for the device: on a CPU, the slots whose LoRA buffers fit in
        `CPU_LORA_BUFFER_BYTES` (vLLM sizes every slot's buffers by `max_lora_rank`), within 4..16."""
        if self.max_loras is not None:
            return self.max_loras
        if not on_cpu:
            return GPU_LORA_SLOTS
        dtype_bytes = 2 if self.dtype in ("bfloat16", "float16") else 4
        per_slot = lora_slot_bytes(Path(self.model), self.max_lora_rank, dtype_bytes)
        fitting = CPU_LORA_BUFFER_BYTES // per_slot if per_slot else CPU_LORA_SLOTS[1]
        slots = max(CPU_LORA_SLOTS[0], min(CPU_LORA_SLOTS[1], int(fitting)))
        if self.max_cpu_loras is not None:
            slots = min(slots, self.max_cpu_loras)
        return slots

    def slot_policy_config(self) -> dict[str, dict[str, float | None]]:
        """vLLM's `additional_config` for loraplex's slot policy (serve/vllm_slots.py); empty when it is off."""
        if self.slot_wait_s is None:
            return {}
        policy = {"wait_s": self.slot_wait_s, "hold_s": self.slot_hold_s, "pause_s": self.slot_pause_s}
        return {"loraplex_slots": policy}

    def tool_parsers(self) -> tuple[str, ...]:
        """Every tool-call parser the engine loads: the server's, then the adapters' others."""
        named = [self.tool_call_parser, *self.tool_call_parsers] if self.tool_call_parser else self.tool_call_parsers
        return tuple(dict.fromkeys(named))

    def unpinned_cache_entries(self, slots: int) -> int:
        """`max_cpu_loras`, or its default for an engine with `slots` LoRA slots."""
        return self.max_cpu_loras or (4 * slots if self.slot_wait_s is not None else slots)

    def cpu_cache_entries(self, slots: int) -> int:
        """The engine's adapter cache size: the unpinned adapters (`unpinned_cache_entries`), the pinned ones
        allowed, and one spare for a pinned adapter's version switch (its new version is pinned before the old
        one leaves)."""
        return self.unpinned_cache_entries(slots) + (self.max_pinned_loras + 1 if self.max_pinned_loras else 0)

    def engine_dtype(self) -> str:
        """The dtype passed to vLLM: `checkpoint` resolved from the model's config.json."""
        if self.dtype != "checkpoint":
            return self.dtype
        config_file = Path(self.model) / "config.json"
        if not config_file.is_file():
            return "auto"
        declared = json.loads(config_file.read_text())
        value = declared.get("dtype") or declared.get("torch_dtype")
        return value if value in ("float32", "bfloat16", "float16") else "auto"

    @property
    def model_id(self) -> str:
        """The id clients use for the base model."""
        return self.served_model_name or Path(self.model).name
