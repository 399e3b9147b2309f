"""4-bit base: LoRA gradients equal those of the dense model built from the dequantized weights,
fresh, after a no_grad evaluation pass and after generate(); NF4 and FP4, with and without
double quantization."""

from __future__ import annotations

import copy

import bitsandbytes as bnb
import pytest
import torch

from cllora.config import ModelConfig
from cllora.model.load import load_model
from cllora.model.lora import inject_lora, lora_modules, lora_parameters
from cllora.model.loss import lm_loss_sum
from cllora.model.quant import base_weight_bytes, dequantize_base, quantize_base


@pytest.fixture(scope="module")
def base():
    model, _ = load_model(ModelConfig(name="tiny-llama", dtype="fp32"))
    return model


def _grads(model, ids):
    for p in lora_parameters(model):
        p.grad = None
    model.train()
    loss, n = lm_loss_sum(model, ids, torch.ones_like(ids), ids)
    (loss / n).backward()
    model.eval()
    return loss.detach(), [p.grad.clone() for p in lora_parameters(model)]


def _assert_same(q_model, dense, ids):
    lq, gq = _grads(q_model, ids)
    ld, gd = _grads(dense, ids)
    torch.testing.assert_close(lq, ld, rtol=1e-5, atol=1e-5)
    for a, b in zip(gq, gd, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    ("quant_type", "double_quant"), [("nf4", True), ("nf4", False), ("fp4", True)]
)
def test_lora_grads_match_dequantized_dense(base, quant_type, double_quant):
    model = copy.deepcopy(base)
    inject_lora(model, r=4, alpha=8, dropout=0.0)
    torch.manual_seed(0)
    for m in lora_modules(model).values():
        torch.nn.init.normal_(m.lora_B, std=0.05)
    dense_bytes = base_weight_bytes(model)
    names = quantize_base(model, quant_type, double_quant, compute_dtype=torch.float32)
    assert len(names) == 14 and all(n.endswith(".base") for n in names)
    assert all(isinstance(m.base, bnb.nn.Linear4bit) for m in lora_modules(model).values())
    assert base_weight_bytes(model) < dense_bytes / 5
    assert type(model.lm_head) is torch.nn.Linear  # the head stays dense
    dense = dequantize_base(copy.deepcopy(model))
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in dense.modules())
    ids = torch.randint(3, 2000, (2, 24), generator=torch.Generator().manual_seed(0))
    _assert_same(model, dense, ids)  # fresh
    with torch.no_grad():  # an evaluation pass (the federated loop evaluates between rounds)
        model(ids)
        dense(ids)
    _assert_same(model, dense, ids)
    model.generate(ids[:1, :6], max_new_tokens=4, do_sample=False)
    _assert_same(model, dense, ids)


def test_quantize_before_lora_and_refusals(base):
    model = copy.deepcopy(base)
    quantize_base(model, "nf4")
    with pytest.raises(ValueError, match="no frozen"):
        quantize_base(model, "nf4")
    with pytest.raises(ValueError, match="quant_type"):
        quantize_base(copy.deepcopy(base), "int3")
    assert isinstance(model.model.layers[0].mlp.up_proj, bnb.nn.Linear4bit)
    inject_lora(model, r=2, alpha=4)  # LoRA over an already 4-bit base
    assert all(isinstance(m.base, bnb.nn.Linear4bit) for m in lora_modules(model).values())
    ids = torch.randint(3, 2000, (1, 9), generator=torch.Generator().manual_seed(1))
    _, grads = _grads(model, ids)
    assert all(torch.isfinite(g).all() for g in grads)
