"""4-bit base: LoRA gradients equal those of the dense model built from the dequantized weights,
fresh, after a no_grad evaluation pass and after generate(); NF4 and FP4, with and without
double quantization. The dequantized weights are the exact decoding of bitsandbytes' encoding
(``cllora_kernels.nf4.dequantize_bnb_4bit``): each layer records whether bitsandbytes' own
decoder agrees with it (its native CPU decoder does not from 0.49 on, for blocks straddling rows)
and computes with the exact one where it does not."""

from __future__ import annotations

import copy

import bitsandbytes as bnb
import pytest
import torch
import torch.nn.functional as F
from bitsandbytes.functional import dequantize_4bit
from cllora_kernels.nf4 import dequantize_bnb_4bit

from cllora.config import ModelConfig
from cllora.model.load import load_model
from cllora.model.lora import inject_lora, lora_modules, lora_parameters
from cllora.model.loss import lm_loss_sum
from cllora.model.quant import (
    FrozenLinear4bit,
    _to_4bit,
    base_weight_bytes,
    dequantize_base,
    dequantized_weight,
    quantize_base,
)


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
    # down_proj's input (intermediate 176) is no multiple of the blocksize 64: blocks straddle rows
    assert any(m.base.in_features % 64 for m in lora_modules(model).values())
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


@pytest.mark.parametrize(("out_f", "in_f"), [(16, 16), (40, 48), (24, 128)])
@pytest.mark.parametrize(("quant_type", "double_quant"), [("nf4", True), ("fp4", False)])
def test_layer_records_whether_bitsandbytes_decodes_exactly(out_f, in_f, quant_type, double_quant):
    """Each layer's ``bnb_decodes_exactly`` is whether bitsandbytes' ``dequantize_4bit`` gives the
    exact decoding of the layer's weight bit for bit: False on a bitsandbytes whose CPU decoder
    mis-scales blocks straddling rows (16 -> 16 and 48 -> 40 at blocksize 64 on 0.49-0.50), True
    where it decodes right; either way ``dequantized_weight`` is the exact decoding. Layers made
    without ``_to_4bit`` (the planner's, via ``__new__``) default to bitsandbytes' path."""
    torch.manual_seed(0)
    q = _to_4bit(torch.nn.Linear(in_f, out_f), quant_type, double_quant, torch.float32)
    exact = dequantize_bnb_4bit(q.weight.data, q.weight.quant_state)
    theirs = dequantize_4bit(q.weight.data, q.weight.quant_state)
    assert q.bnb_decodes_exactly == torch.equal(theirs, exact)
    assert torch.equal(dequantized_weight(q), exact) and exact.shape == (out_f, in_f)
    assert FrozenLinear4bit.__new__(FrozenLinear4bit).bnb_decodes_exactly is True


@pytest.mark.parametrize(("quant_type", "double_quant"), [("nf4", True), ("fp4", False)])
@pytest.mark.parametrize("bias", [False, True])
def test_layer_computes_with_the_exact_weight(quant_type, double_quant, bias):
    """A 48 -> 40 layer (blocksize 64: every block straddles rows): output and dL/dx (and dL/db)
    equal ``F.linear`` on the exact decoded weight, whichever decoder the layer runs."""
    torch.manual_seed(1)
    q = _to_4bit(torch.nn.Linear(48, 40, bias=bias), quant_type, double_quant, torch.float32)
    if bias:
        q.bias.requires_grad_(True)
    w = dequantize_bnb_4bit(q.weight.data, q.weight.quant_state)
    x = torch.randn(3, 5, 48, requires_grad=True)
    dy = torch.randn(3, 5, 40)
    y = q(x)
    grads = torch.autograd.grad(y, [x, q.bias] if bias else [x], dy)
    y_ref = F.linear(x, w, q.bias)
    grads_ref = torch.autograd.grad(y_ref, [x, q.bias] if bias else [x], dy)
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
