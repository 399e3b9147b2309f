"""The engine options of a run (model.attn=varlen, train.packing, checkpointing, kernels, loss,
4-bit base, presets) wired through `cllora run`: same results where the maths is the same, clear
errors where a combination cannot work."""

from __future__ import annotations

import math

import pytest
import torch

from cllora.cli import main
from cllora.config import ConfigError, ModelConfig, load_config
from cllora.fed.server import run_experiment
from cllora.model.load import load_model
from cllora.model.setup import build_model
from tests.conftest import tiny_run_overrides

ENGINE = {
    "model__attn": "varlen",
    "train__packing": "true",
    "train__checkpointing": "true",
    "train__checkpoint_policy": "keep_attention",
    "model__kernels": "true",
    "train__loss": "chunked",
    "train__loss_chunk": 7,
}


def _losses(result) -> list[float]:
    return [row["global_loss"] for row in result.rows]


def test_engine_options_give_the_plain_runs_losses(tmp_path):
    """Packing + varlen attention + selective checkpointing + swapped kernels + chunked loss is
    the same computation as padding + SDPA + plain loss: every round's global losses agree."""
    plain = run_experiment(load_config(None, tiny_run_overrides(tmp_path, run_name="plain")))
    cfg = load_config(None, tiny_run_overrides(tmp_path, run_name="engine", **ENGINE))
    engine = run_experiment(cfg)
    assert len(_losses(plain)) == len(_losses(engine)) == 3
    for a, b in zip(_losses(plain), _losses(engine), strict=True):
        assert a == pytest.approx(b, rel=1e-4)
    assert _losses(engine)[-1] < _losses(engine)[0]


def test_build_model_switches_on_what_the_config_says(tmp_path):
    cfg = load_config(None, tiny_run_overrides(tmp_path, **ENGINE, model__quant="nf4"))
    model, _, engine = build_model(cfg)
    assert engine["device"] == "cpu" and engine["quant"] == "nf4"
    assert engine["quantized_modules"] == engine["lora_modules"] == 14  # 2 layers x 7 linears
    assert engine["kernels"] == {"lora_linear": 14, "rms_norm": 5, "swiglu_mlp": 2}
    assert model.config._attn_implementation == "cllora_varlen"
    assert model.is_activation_checkpointing
    assert engine["checkpointing"] == "every 1 layer(s), attention kept"


def test_kernels_auto_on_cpu_swaps_in_the_lean_norm_and_mlp(tmp_path):
    """auto on CPU: RMSNorm and SwiGLU become cllora_kernels.lean Functions; the fused LoRA
    linear stays off (model.kernels=true only); false swaps nothing."""
    model, _, engine = build_model(load_config(None, tiny_run_overrides(tmp_path)))
    layers = model.config.num_hidden_layers
    assert engine["kernels"] == {"rms_norm": 2 * layers + 1, "swiglu_mlp": layers}
    x = torch.randn(1, 3, model.config.hidden_size, requires_grad=True)
    assert type(model.model.norm(x).grad_fn).__name__ == "RMSNormBackward"
    cfg = load_config(None, tiny_run_overrides(tmp_path, model__kernels="false"))
    assert "kernels" not in build_model(cfg)[2]


def test_a_4bit_run_trains(tmp_path):
    cfg = load_config(None, tiny_run_overrides(tmp_path, model__quant="nf4"))
    losses = _losses(run_experiment(cfg))
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.packing=true", "needs model.attn=varlen"),
        ("model.attn_backend=sdpa_mask", "applies to model.attn=varlen only"),
        ("model.kernels=sometimes", "model.kernels"),
        ("train.loss=cheap", "train.loss"),
        ("train.checkpoint_every=0", "train.checkpoint_every"),
        ("train.checkpoint_policy=some", "train.checkpoint_policy"),
    ],
)
def test_bad_engine_settings_are_clear_errors(tmp_path, capsys, override, message):
    argv = ["run", *tiny_run_overrides(tmp_path), override]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing trained, nothing written


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="no CUDA device"):
        build_model(load_config(None, tiny_run_overrides(tmp_path, model__device="cuda")))


def test_a_preset_loads_as_a_model_name():
    model, tok = load_model(ModelConfig(name="smollm2-360m-shape", dtype="fp32"), seed=3)
    assert model.config.hidden_size == 960 and model.config.num_hidden_layers == 32
    assert len(tok) <= model.config.vocab_size
    again, _ = load_model(ModelConfig(name="smollm2-360m-shape", dtype="fp32"), seed=3)
    w = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(model.state_dict()[w], again.state_dict()[w])  # seeded
