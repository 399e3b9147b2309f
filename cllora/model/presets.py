"""Real model architectures with random weights, for benchmarks at scale without downloads.

Usage::

    from cllora.model.presets import PRESETS, build_preset

    model = build_preset("llama-3.1-8b", dtype=torch.bfloat16, device="cuda", seed=0)
    model = build_preset("smollm2-135m-shape", num_hidden_layers=4)   # override any config field

Each preset is the architecture part of the model's published ``config.json`` written out as a
dict (shapes, heads, RoPE, vocabulary, tying); weights are randomly initialised (seeded), frozen,
and the model comes back in eval mode like :func:`cllora.model.load.load_model`. Throughput and
memory of a training step depend on the shapes only, so these stand in for the real models.
Building on ``device="meta"`` first and materialising on the target device avoids a CPU copy of
an 8B model.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
    "rope_theta": 500000.0,
}

PRESETS: dict[str, dict[str, Any]] = {
    "llama-3.1-8b": dict(
        model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        max_position_embeddings=131072, rms_norm_eps=1e-5, rope_parameters=_LLAMA3_ROPE,
        tie_word_embeddings=False, hidden_act="silu",
    ),
    "qwen2.5-7b": dict(
        model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
        num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
        max_position_embeddings=131072, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        tie_word_embeddings=False, hidden_act="silu", use_sliding_window=False,
    ),
    "mistral-7b-v0.3": dict(
        model_type="mistral", vocab_size=32768, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        max_position_embeddings=32768, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        tie_word_embeddings=False, hidden_act="silu", sliding_window=None,
    ),
    "smollm2-1.7b-shape": dict(
        model_type="llama", vocab_size=49152, hidden_size=2048, intermediate_size=8192,
        num_hidden_layers=24, num_attention_heads=32, num_key_value_heads=32,
        max_position_embeddings=8192, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 130000.0},
        tie_word_embeddings=True, hidden_act="silu",
    ),
    "smollm2-360m-shape": dict(
        model_type="llama", vocab_size=49152, hidden_size=960, intermediate_size=2560,
        num_hidden_layers=32, num_attention_heads=15, num_key_value_heads=5,
        max_position_embeddings=8192, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        tie_word_embeddings=True, hidden_act="silu",
    ),
    "smollm2-135m-shape": dict(
        model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
        num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        max_position_embeddings=8192, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        tie_word_embeddings=True, hidden_act="silu",
    ),
}  # fmt: skip


def preset_config(name: str, **overrides: Any) -> Any:
    """The transformers config of a preset, with ``overrides`` applied (e.g. fewer layers)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; use one of {sorted(PRESETS)}")
    values = {**PRESETS[name], **overrides}
    model_type = values.pop("model_type")
    return AutoConfig.for_model(model_type, **values)


def build_preset(
    name: str,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    attn: str = "sdpa",
    **overrides: Any,
) -> PreTrainedModel:
    """A randomly initialised (seeded), frozen, eval-mode model of the preset's architecture."""
    config = preset_config(name, **overrides)
    config._attn_implementation = attn
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
