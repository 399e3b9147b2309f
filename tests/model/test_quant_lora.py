"""The 4-bit LoRA path (:class:`cllora.model.lora.QuantLoRAFunction`) against the composition it
replaced (autograd of ``base(x) + s dropout(x) A^T B^T``, :func:`cllora.model.lora.add_lora`),
on real bitsandbytes 4-bit layers on CPU: outputs and the gradients of x, A and B, in fp32 and
bf16, with and without bias; the fallbacks (dropout in training, another compute dtype); what
it keeps for the backward; a tiny 4-bit model's loss and LoRA gradients; and that the path
computes with the exact decoding of the 4-bit weight (the 48 -> 40 layers here have blocks
straddling rows, which bitsandbytes' native CPU decoder mis-scales from 0.49 on)."""

from __future__ import annotations

import copy
from unittest import mock

import pytest
import torch

from cllora.config import ModelConfig
from cllora.model import lora
from cllora.model.load import load_model
from cllora.model.lora import LoRALinear, add_lora, inject_lora, lora_modules, lora_parameters
from cllora.model.loss import lm_loss_sum
from cllora.model.quant import _to_4bit, dequantize_base, quantize_base


def _layer(dtype: torch.dtype, bias: bool, dropout: float = 0.0, compute=None) -> LoRALinear:
    """A LoRA layer (r=4) over a 48 -> 40 NF4 base, B non-zero so the update shows."""
    g = torch.Generator().manual_seed(0)
    dense = torch.nn.Linear(48, 40, bias=bias).to(dtype)
    m = LoRALinear(_to_4bit(dense, "nf4", True, compute or dtype), r=4, alpha=8.0, dropout=dropout)
    with torch.no_grad():
        m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g))
    return m


def _path(y: torch.Tensor) -> str:
    """The autograd node that made ``y`` (under the 3-D view)."""
    node = y.grad_fn
    if type(node).__name__ == "ViewBackward0":
        node = node.next_functions[0][0]
    return type(node).__name__


def _run(m: LoRALinear, x: torch.Tensor, dy: torch.Tensor, old: bool, seed: int = 0):
    """Output and gradients (x, A, B) of ``m`` on ``x``: the module's own path, or with
    ``old`` the composition the 4-bit path replaced (the same dropout draws under ``seed``)."""
    x = x.detach().requires_grad_(x.requires_grad)
    for p in (m.lora_A, m.lora_B):
        p.grad = None
    torch.manual_seed(seed)
    y = add_lora(m.base(x), m.dropout(x), m.lora_A, m.lora_B, m.scaling) if old else m(x)
    y.backward(dy)
    return y.detach(), x.grad, m.lora_A.grad.clone(), m.lora_B.grad.clone(), _path(y)


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm())


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("bias", [False, True])
def test_quant_lora_path_equals_the_composition(dtype, tol, bias):
    """Output and the x, A, B gradients equal the old composition's (fp32: to rounding; bf16:
    the new path rounds the two input-gradient terms once, in ``addmm_``, instead of twice); A
    and B get fp32 gradients, the frozen 4-bit weight and bias none."""
    m = _layer(dtype, bias)
    g = torch.Generator().manual_seed(1)
    # a non-contiguous 3-D (B, T, H) input, as attention outputs are
    x = torch.randn(7, 2, 48, generator=g).to(dtype).transpose(0, 1).requires_grad_()
    dy = torch.randn(2, 7, 40, generator=g).to(dtype)
    new, old = _run(m, x, dy, old=False), _run(m, x, dy, old=True)
    assert new[-1] == "QuantLoRAFunctionBackward" and old[-1] != new[-1]
    assert new[0].dtype == dtype and new[0].shape == (2, 7, 40)
    for got, want in zip(new[:4], old[:4], strict=True):
        assert got.dtype == want.dtype and _rel(got, want) < tol
    assert new[2].dtype == new[3].dtype == torch.float32
    assert m.base.weight.grad is None and (m.base.bias is None or m.base.bias.grad is None)


@pytest.mark.parametrize("bias", [False, True])
def test_quant_lora_path_equals_dense_lora_on_the_exact_weight(bias):
    """The 4-bit LoRA path on a 48 -> 40 NF4 base (blocksize 64: blocks straddle rows) gives the
    output and x, A, B gradients of the same LoRA layer over an ``nn.Linear`` holding the exact
    decoded weight (``dequantize_base``), whichever decoder the base layer runs."""
    m = _layer(torch.float32, bias)
    dense = dequantize_base(copy.deepcopy(m))
    assert type(dense.base) is torch.nn.Linear
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 7, 48, generator=g, requires_grad=True)
    dy = torch.randn(2, 7, 40, generator=g)
    new, ref = _run(m, x, dy, old=False), _run(dense, x, dy, old=False)
    assert new[-1] == "QuantLoRAFunctionBackward"
    for got, want in zip(new[:4], ref[:4], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_quant_lora_x_without_grad():
    """An input that needs no gradient (the first layer's, an embedding under no_grad): A and B
    gradients as the composition's, no input gradient computed."""
    m = _layer(torch.float32, bias=True)
    x = torch.randn(3, 5, 48, generator=torch.Generator().manual_seed(2))
    dy = torch.randn(3, 5, 40, generator=torch.Generator().manual_seed(3))
    new, old = _run(m, x, dy, old=False), _run(m, x, dy, old=True)
    assert new[1] is None and old[1] is None and new[-1] == "QuantLoRAFunctionBackward"
    for got, want in zip((new[0], new[2], new[3]), (old[0], old[2], old[3]), strict=True):
        assert _rel(got, want) < 1e-6


def test_dropout_and_other_dtypes_keep_the_composition():
    """LoRA dropout in training falls back to the composition, as on a dense base (seeded:
    the same draws, the same values); in eval the dropout is the identity and the Function
    runs; a compute dtype other than x's (the layer casts x) also falls back."""
    m = _layer(torch.float32, bias=False, dropout=0.3)
    x = torch.randn(2, 6, 48, generator=torch.Generator().manual_seed(4)).requires_grad_()
    dy = torch.randn(2, 6, 40, generator=torch.Generator().manual_seed(5))
    m.train()
    new, old = _run(m, x, dy, old=False, seed=7), _run(m, x, dy, old=True, seed=7)
    assert new[-1] == old[-1] != "QuantLoRAFunctionBackward"
    for got, want in zip(new[:4], old[:4], strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    m.eval()
    assert _run(m, x, dy, old=False)[-1] == "QuantLoRAFunctionBackward"
    cast = _layer(torch.float32, bias=False, compute=torch.bfloat16)  # x fp32, product bf16
    y = cast(x)
    assert _path(y) != "QuantLoRAFunctionBackward" and y.dtype == torch.float32


def test_quant_lora_keeps_only_x_and_the_rank_product():
    """What the 4-bit path keeps for the backward: x and the (tokens x r) x A^T (plus the
    small casts of A and B), not a (tokens x out) tensor; the packed weight is not a saved
    tensor (it stays on the node, as in bitsandbytes' own MatMul4Bit)."""
    m = _layer(torch.float32, bias=True)
    x = torch.randn(50, 48, requires_grad=True)
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        m(x)
    extra = sum(n for p, n in saved.items() if p != x.untyped_storage().data_ptr())
    assert x.untyped_storage().data_ptr() in saved
    assert extra <= 50 * 4 * 4 + (4 * 48 + 40 * 4) * 4 < 50 * 40 * 4


def test_tiny_4bit_model_loss_and_grads_unchanged():
    """A tiny 4-bit Llama (every decoder linear NF4, LoRA on all): loss and every LoRA gradient
    of a step equal the old composition's; the frozen base gets no gradient."""
    model, _ = load_model(ModelConfig(name="tiny-llama", dtype="fp32"))
    inject_lora(model, r=4, alpha=8, dropout=0.0)
    torch.manual_seed(0)
    for m in lora_modules(model).values():
        torch.nn.init.normal_(m.lora_B, std=0.05)
    quantize_base(model, "nf4", True, compute_dtype=torch.float32)
    ids = torch.randint(3, 2000, (2, 24), generator=torch.Generator().manual_seed(0))

    def step(m: torch.nn.Module) -> tuple[torch.Tensor, list[torch.Tensor]]:
        m.train()
        loss, n = lm_loss_sum(m, ids, torch.ones_like(ids), ids)
        (loss / n).backward()
        return loss.detach(), [p.grad for p in lora_parameters(m)]

    old_model = copy.deepcopy(model)
    seen: list[str] = []
    hook = lora.QuantLoRAFunction.apply

    def apply(*args):
        seen.append("quant")
        return hook(*args)

    with mock.patch.object(lora.QuantLoRAFunction, "apply", apply):
        loss, grads = step(model)
    assert len(seen) == len(lora_modules(model)) == 14
    with mock.patch.object(lora, "_is_frozen_4bit", lambda base: False):
        old_loss, old_grads = step(old_model)
    torch.testing.assert_close(loss, old_loss, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads, old_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    frozen = [p for n, p in model.named_parameters() if "lora_" not in n]
    assert frozen and all(p.grad is None and not p.requires_grad for p in frozen)
