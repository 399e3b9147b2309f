"""4-bit base weights (NF4 / FP4, optional double quantization) with bitsandbytes, CPU and CUDA.

Usage::

    from cllora.model.quant import quantize_base, dequantize_base, base_weight_bytes

    model, tok = load_model(cfg)                 # frozen base
    inject_lora(model, r=16, alpha=32)           # before or after: both work
    names = quantize_base(model, quant_type="nf4", double_quant=True, compute_dtype=torch.float32)
    base_weight_bytes(model)                     # bytes of the linear base weights now
    dense = dequantize_base(copy.deepcopy(model))  # nn.Linear from the dequantized weights (tests)

:func:`quantize_base` is an explicit opt-in swap: every frozen ``nn.Linear`` of the decoder
(and the frozen ``base`` inside each :class:`~cllora.model.lora.LoRALinear`) becomes a
:class:`FrozenLinear4bit`; the LM head and the embeddings stay dense. The weights are quantized
on the device they are on (``Params4bit`` quantizes when moved to its device).

:class:`FrozenLinear4bit` is bitsandbytes' ``Linear4bit`` with two differences in ``forward``: the
decoder (below), and it never converts the weight to bitsandbytes' CPU inference layout. Upstream
``Linear4bit`` does so on the first forward in eval mode without grad on CPUs with AVX512-BF16 (an
evaluation pass, or ``generate()``), a one-way change of the stored weight; a federated client
trains again after every evaluation, so the weight must keep the layout that ``matmul_4bit``'s
backward expects. Gradients of the 4-bit model equal those of the dense model built from its
dequantized weights (tested fresh, after ``no_grad`` evaluation and after ``generate()``).

Decoding: cllora decodes bitsandbytes' flat 4-bit encoding itself
(:func:`cllora_kernels.nf4.dequantize_bnb_4bit`) wherever bitsandbytes' own decoder disagrees with
its encoder. From bitsandbytes 0.49 on, its native CPU ``dequantize_4bit`` (which ``matmul_4bit`` on
CPU uses forward and backward) indexes block scales within rows and so mis-scales blocks that
straddle a row boundary (for many layers whose ``in_features`` is no multiple of the blocksize):
such a layer would silently train against wrong base weights. At quantization each layer checks once
whether the installed ``dequantize_4bit`` reproduces the exact decoding of its own weight
(:attr:`FrozenLinear4bit.bnb_decodes_exactly`); where it does, bitsandbytes' kernels run as before;
where it does not, the layer's product and input gradient (and the LoRA 4-bit path's,
:class:`~cllora.model.lora.QuantLoRAFunction`) use the exact decoder. :func:`dequantized_weight` and
:func:`dequantize_base` always decode exactly.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from cllora_kernels.nf4 import dequantize_bnb_4bit
from torch import nn

from cllora.model.bnb import bnb  # first: bitsandbytes imported without its hub lookup
from cllora.model.lora import LoRALinear

QuantState = bnb.functional.QuantState

log = logging.getLogger(__name__)

QUANT_TYPES = ("nf4", "fp4")


class FrozenLinear4bit(bnb.nn.Linear4bit):
    """A frozen 4-bit linear layer: ``y = x dequant(W)^T + b`` in ``compute_dtype``.

    ``bnb_decodes_exactly`` says whether bitsandbytes' own decoder reproduces this weight's
    encoding (set by :func:`quantize_base`; True for layers built otherwise). When False every
    product of the layer decodes with :func:`cllora_kernels.nf4.dequantize_bnb_4bit` instead.
    """

    bnb_decodes_exactly: bool = True  # class default: layers made without _to_4bit (plan/step.py)

    def quant_state_for(self, x: torch.Tensor) -> QuantState:
        """The weight's quantization state for a call on ``x``: sets ``compute_dtype`` to x's
        dtype on the first call if unset, refuses bitsandbytes' CPU inference layout. Also
        called by :class:`~cllora.model.lora.LoRALinear`, whose 4-bit path runs the product."""
        state = self.weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            raise RuntimeError("4-bit weight is in bitsandbytes' CPU inference layout")
        if self.compute_dtype is None:
            self.compute_dtype = x.dtype
        return state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self.quant_state_for(x)
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        x_c = x.to(self.compute_dtype)
        if self.bnb_decodes_exactly:
            out = bnb.matmul_4bit(x_c, self.weight, bias=bias, quant_state=state)
        else:
            out = ExactMatMul4bit.apply(x_c, self.weight, state, bias)
        return out.to(x.dtype)


class ExactMatMul4bit(torch.autograd.Function):
    """``x W_d^T + b`` with ``W_d`` from :func:`cllora_kernels.nf4.dequantize_bnb_4bit`: what
    ``bnb.matmul_4bit`` computes, with the exact decoder. Like bitsandbytes' ``MatMul4Bit`` it
    keeps the packed weight (not the decoded one) for the backward and decodes it again there:
    ``dL/dx = g W_d`` (decoded in the weight's dtype, cast to g's), ``dL/db = sum_rows g``.
    Inputs: x (..., K) in the compute dtype, the packed weight, its ``QuantState`` (N, K), b (N,)
    in x's dtype or None."""

    @staticmethod
    def forward(ctx, x, weight, quant_state, bias):
        w = dequantize_bnb_4bit(weight, quant_state, dtype=x.dtype)  # (N, K)
        ctx.weight, ctx.state = weight, quant_state  # frozen, as MatMul4Bit keeps them
        ctx.bias_dtype = None if bias is None else bias.dtype
        return F.linear(x, w, bias)

    @staticmethod
    def backward(ctx, grad_y):
        need_x, _, _, need_bias = ctx.needs_input_grad
        grad_x = grad_bias = None
        if need_x:
            grad_x = grad_y @ dequantize_bnb_4bit(ctx.weight, ctx.state).to(grad_y.dtype)
        if need_bias:
            grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0).to(ctx.bias_dtype)
        return grad_x, None, None, grad_bias


@torch.no_grad()
def bnb_decoder_is_exact(packed: torch.Tensor, quant_state: QuantState) -> bool:
    """Whether the installed bitsandbytes' ``dequantize_4bit`` decodes this packed weight exactly
    as its encoder wrote it (bit for bit equal to
    :func:`cllora_kernels.nf4.dequantize_bnb_4bit`, both in the state's dtype). Decodes the whole
    weight twice on its device: call it once per layer, at quantization."""
    theirs = bnb.functional.dequantize_4bit(packed, quant_state)
    return torch.equal(theirs, dequantize_bnb_4bit(packed, quant_state))


def _to_4bit(
    linear: nn.Linear, quant_type: str, double_quant: bool, compute_dtype: torch.dtype | None
) -> FrozenLinear4bit:
    device = linear.weight.device
    q = FrozenLinear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=compute_dtype,
        compress_statistics=double_quant,
        quant_type=quant_type,
        device="meta",
    )
    weight = linear.weight.detach()
    q.weight = bnb.nn.Params4bit(
        weight.to("cpu", copy=True),
        requires_grad=False,
        quant_type=quant_type,
        compress_statistics=double_quant,
        module=q,
    )
    q.weight = q.weight.to(device)  # Params4bit quantizes on its first move to a device
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    q.bnb_decodes_exactly = bnb_decoder_is_exact(q.weight.data, q.weight.quant_state)
    if not q.bnb_decodes_exactly:
        log.debug(
            "4-bit %d -> %d (%s): bitsandbytes' dequantize_4bit disagrees with its encoding "
            "here; the layer computes with cllora's exact decoder",
            q.in_features, q.out_features, quant_type,
        )  # fmt: skip
    return q


def quantize_base(
    model: nn.Module,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = None,
) -> list[str]:
    """Replace the frozen base linears by 4-bit ones; returns the replaced module names.

    ``compute_dtype`` is the matmul dtype (default: the input's dtype at the first call).
    The LM head (``get_output_embeddings()``) and trainable linears are left alone.
    """
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if get_out is not None else None
    replaced = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is not nn.Linear or child is head or child.weight.requires_grad:
                continue
            q = _to_4bit(child, quant_type, double_quant, compute_dtype)
            setattr(module, child_name, q)
            full = f"{name}.{child_name}" if name else child_name
            replaced.append(full)
    if not replaced:
        raise ValueError("no frozen nn.Linear to quantize (already quantized?)")
    return sorted(replaced)


def dequantized_weight(module: bnb.nn.Linear4bit) -> torch.Tensor:
    """The dense (out, in) weight of a 4-bit layer, in the weight's dtype, as bitsandbytes
    encoded it (:func:`cllora_kernels.nf4.dequantize_bnb_4bit`): what a
    :class:`FrozenLinear4bit` computes with, whichever decoder its products use."""
    return dequantize_bnb_4bit(module.weight.data, module.weight.quant_state)


def dequantize_base(model: nn.Module) -> nn.Module:
    """Replace every 4-bit linear (in place) by an ``nn.Linear`` holding its dequantized weight."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if not isinstance(child, bnb.nn.Linear4bit):
                continue
            w = dequantized_weight(child)  # (out, in)
            dtype = child.compute_dtype or w.dtype
            dense = nn.Linear(
                child.in_features, child.out_features, bias=child.bias is not None,
                device=w.device, dtype=dtype,
            )  # fmt: skip
            dense.weight = nn.Parameter(w.to(dtype), requires_grad=False)
            if child.bias is not None:
                dense.bias = nn.Parameter(child.bias.detach().to(dtype), requires_grad=False)
            setattr(module, child_name, dense)
    return model


def base_weight_bytes(model: nn.Module) -> int:
    """Bytes of the decoder's base linear weights (4-bit payload plus quantization state, or
    dense); the LM head is not counted."""
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if get_out is not None else None
    total = 0
    for m in model.modules():
        if isinstance(m, LoRALinear) or m is head:
            continue
        if isinstance(m, bnb.nn.Linear4bit):
            total += m.weight.data.numel() * m.weight.data.element_size()
            qs = m.weight.quant_state
            total += qs.absmax.numel() * qs.absmax.element_size()
            if qs.state2 is not None:
                total += qs.state2.absmax.numel() * qs.state2.absmax.element_size()
        elif type(m) is nn.Linear:
            total += m.weight.numel() * m.weight.element_size()
    return total
