"""Adapters that carry PEFT's options beyond plain LoRA, made by PEFT itself with seeded weights: what the real-stack
tests serve against transformers + PEFT (tests/integration/test_peft_options.py) and what `make bench-options` times
(loadtests/options_bench.py)."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_peft_adapter(model_dir: Path, dest: Path, seed: int, **settings: object) -> Path:
    """A PEFT adapter with seeded weights that change the output: A ~ N(0, 1/in), B ~ N(0, 0.3²/rank); an
    embedding's A (rank, vocabulary) ~ N(0, 1) and B ~ N(0, 0.02²/rank), a change of the size of the embedding's;
    B's bias (lora_bias) ~ N(0, 0.05²); DoRA's magnitude (use_dora: PEFT sets it to the row norms of W + sBA for its
    own initial A and B, replaced here) scaled per channel by 1 + 0.1·N(0, 1) clamped to [0.9, 1.1], as training
    moves it: g = m/||W + sBA|| of the saved weights spans about 0.6 to 1.1 (seed 84)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with warnings.catch_warnings():  # about tied embeddings, saving the embedding with its LoRA, 1-D lora_B biases
        warnings.simplefilter("ignore", UserWarning)
        model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", **settings))  # type: ignore[arg-type]
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in model.named_parameters():
                noise = torch.randn(param.shape, generator=generator)
                if "lora_embedding_A" in name:
                    param.copy_(noise)
                elif "lora_embedding_B" in name:
                    param.copy_(0.02 * noise / param.shape[1] ** 0.5)
                elif "lora_A" in name:
                    param.copy_(noise / param.shape[1] ** 0.5)
                elif "lora_B" in name and name.endswith(".bias"):
                    param.copy_(0.05 * noise)
                elif "lora_B" in name:
                    param.copy_(0.3 * noise / param.shape[1] ** 0.5)
                elif "lora_magnitude_vector" in name:
                    param.mul_(1 + 0.1 * noise.clamp(-1, 1))
        model.save_pretrained(str(dest))
    return dest
