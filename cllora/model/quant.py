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

:class:`FrozenLinear4bit` is bitsandbytes' ``Linear4bit`` with one difference in ``forward``: it
never converts the weight to bitsandbytes' CPU inference layout. Upstream ``Linear4bit`` does so
on the first forward in eval mode without grad on CPUs with AVX512-BF16 (an evaluation pass, or
``generate()``), a one-way change of the stored weight; a federated client trains again after
every evaluation, so the weight must keep the layout that ``matmul_4bit``'s backward expects.
Gradients of the 4-bit model equal those of the dense model built from its dequantized weights
(tested fresh, after ``no_grad`` evaluation and after ``generate()``).
"""

from __future__ import annotations

import torch
from torch import nn

from cllora.model.bnb import bnb  # first: bitsandbytes imported without its hub lookup
from cllora.model.lora import LoRALinear

QuantState = bnb.functional.QuantState

QUANT_TYPES = ("nf4", "fp4")


class FrozenLinear4bit(bnb.nn.Linear4bit):
    """A frozen 4-bit linear layer: ``y = x dequant(W)^T + b`` in ``compute_dtype``."""

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
        out = bnb.matmul_4bit(x.to(self.compute_dtype), self.weight, bias=bias, quant_state=state)
        return out.to(x.dtype)


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
    """The dense (out, in) weight a 4-bit layer computes with."""
    return bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)


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
