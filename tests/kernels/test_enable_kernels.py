"""Model-level check: a tiny Llama/Qwen2/Mistral with ``enable_kernels`` (Triton kernels in the
interpreter) gives the same loss and LoRA gradients as the unswapped model; the fused LM-head
loss equals the plain one; LoRA dropout and NF4 bases take the documented paths."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import cllora_kernels as ck
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cllora.config import ModelConfig
from cllora.model.kernels import (
    FusedLoRALinear,
    KernelRMSNorm,
    KernelSwiGLUMLP,
    enable_kernels,
    fused_lm_loss_sum,
)
from cllora.model.load import TINY_FAMILIES, load_model
from cllora.model.lora import LoRALinear, inject_lora, lora_parameters, lora_state_dict

from .util import assert_close, randn


def _loss(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor, fused: bool) -> torch.Tensor:
    """Mean next-token loss over target positions, as cllora.model.loss computes it."""
    hidden = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state  # (B, T, H)
    targets = labels[:, 1:]
    mask = targets != -100
    picked = hidden[:, :-1][mask]  # (N, H)
    head = model.get_output_embeddings()
    if fused:
        loss_sum, n = fused_lm_loss_sum(picked, head.weight, targets[mask])
    else:
        loss_sum = F.cross_entropy(head(picked).float(), targets[mask], reduction="sum")
        n = int(mask.sum())
    return loss_sum / n


@pytest.mark.parametrize("family", [*TINY_FAMILIES, "llama-nf4"])
def test_enable_kernels_same_loss_and_lora_grads(family, gen):
    model, _ = load_model(ModelConfig(name=f"tiny-{family.split('-')[0]}", dtype="fp32"), seed=0)
    inject_lora(model, r=4, alpha=8, dropout=0.0)
    if family.endswith("nf4"):  # 4-bit bases: the kernel decodes NF4 in its tiles
        from cllora.model.quant import quantize_base

        quantize_base(model, quant_type="nf4", double_quant=True)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    fast = copy.deepcopy(model)
    replaced = enable_kernels(fast)
    n_layers = model.config.num_hidden_layers
    assert len(replaced["lora_linear"]) == 7 * n_layers
    assert len(replaced["rms_norm"]) == 2 * n_layers + 1
    assert len(replaced["swiglu_mlp"]) == n_layers and replaced["rope"] == []
    assert enable_kernels(fast) == {k: [] for k in replaced}  # idempotent
    assert fast.state_dict().keys() == model.state_dict().keys()
    assert lora_state_dict(fast).keys() == lora_state_dict(model).keys()

    ids = torch.randint(3, 4000, (2, 19), generator=gen)
    labels = ids.clone()
    labels[0, :7] = -100  # a prompt without loss
    loss = _loss(model, ids, labels, fused=False)
    grads = torch.autograd.grad(loss, lora_parameters(model))
    with ck.backend("triton"):
        loss_fast = _loss(fast, ids, labels, fused=True)
        grads_fast = torch.autograd.grad(loss_fast, lora_parameters(fast))
    assert_close(loss_fast, loss, 1e-5, 1e-5, "loss")
    for got, want in zip(grads_fast, grads, strict=True):
        assert_close(got, want, 1e-5, 1e-4, "LoRA grad")


def test_enable_kernels_module_types():
    model, _ = load_model(ModelConfig(name="tiny-llama", dtype="fp32"), seed=0)
    inject_lora(model, r=2, alpha=4)
    enable_kernels(model)
    layer = model.model.layers[0]
    assert isinstance(layer.mlp, KernelSwiGLUMLP) and isinstance(
        layer.input_layernorm, KernelRMSNorm
    )
    assert isinstance(layer.mlp.gate_proj, FusedLoRALinear)
    assert isinstance(layer.self_attn.q_proj, LoRALinear)  # still a LoRALinear for cllora


def test_unsupported_model_left_alone():
    model = nn.Sequential(nn.Linear(4, 4))
    model.config = SimpleNamespace(model_type="gpt2")
    assert enable_kernels(model) == {
        "lora_linear": [],
        "rms_norm": [],
        "swiglu_mlp": [],
        "rope": [],
    }


def test_lora_dropout_falls_back_when_training(gen):
    lora = LoRALinear(nn.Linear(12, 10), r=3, alpha=6, dropout=0.5)
    with torch.no_grad():
        lora.lora_B.normal_(generator=gen)
    fused = FusedLoRALinear.from_lora(lora)
    x = randn(gen, 4, 12)
    torch.manual_seed(0)
    y_train = lora(x)
    torch.manual_seed(0)
    with ck.backend("triton"):
        assert torch.equal(fused(x), y_train)  # unfused path, same dropout mask
        fused.eval()
        lora.eval()
        assert_close(fused(x), lora(x), 1e-5, 1e-5, "eval (fused)")


def test_fused_lora_on_nf4_base(gen):
    bnb = pytest.importorskip("bitsandbytes")
    base = bnb.nn.Linear4bit(40, 24, quant_type="nf4", compress_statistics=True)
    base.load_state_dict(nn.Linear(40, 24).state_dict())
    base = base.to("cpu")  # quantize
    lora = LoRALinear(base, r=4, alpha=8)
    with torch.no_grad():
        lora.lora_B.normal_(generator=gen)
    fused = FusedLoRALinear.from_lora(lora)
    x = randn(gen, 2, 5, 40, grad=True)
    y = lora(x)
    with ck.backend("triton"):
        y_fused = fused(x)
    assert_close(y_fused, y, 1e-4, 1e-4, "y")
    dy = randn(gen, *y.shape)
    params = (x, lora.lora_A, lora.lora_B)
    for got, want in zip(
        torch.autograd.grad(y_fused, params, dy), torch.autograd.grad(y, params, dy), strict=True
    ):
        assert_close(got, want, 1e-4, 1e-4, "grad")


def test_fused_lm_loss_sum_matches_cross_entropy(gen):
    hidden, weight = randn(gen, 23, 16, grad=True), randn(gen, 50, 16)
    targets = torch.randint(0, 50, (23,), generator=gen)
    targets[3:9] = -100
    loss_sum, n = fused_lm_loss_sum(hidden, weight, targets, chunk_size=8)
    expected = F.cross_entropy(hidden @ weight.T, targets, reduction="sum")
    assert n == 17
    assert_close(loss_sum, expected, 1e-4, 1e-5, "loss")
    (g,), (g_ref,) = (torch.autograd.grad(x, hidden) for x in (loss_sum, expected))
    assert_close(g, g_ref, 1e-5, 1e-5, "dh")
    empty, n0 = fused_lm_loss_sum(hidden, weight, torch.full((23,), -100))
    assert n0 == 0 and empty.item() == 0.0
