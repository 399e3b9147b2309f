"""Our LoRA linear module and its injection into a transformers model.

Usage::

    from cllora.model.lora import inject_lora, lora_state_dict, set_lora_state

    replaced = inject_lora(model, r=16, alpha=32, dropout=0.05, target_modules="all-linear")
    state = lora_state_dict(model)        # {"model.layers.0.self_attn.q_proj.lora_A": (r, in), ...}
    set_lora_state(model, state)          # load an adapter (e.g. the aggregated global one)

Maths: ``y = x W^T + (alpha / r) * dropout(x) A^T B^T`` with ``A`` (r, in) initialised
Kaiming-uniform and ``B`` (out, r) zero, so at init the LoRA model computes exactly the base model.
The base ``W`` stays frozen; ``A`` and ``B`` are fp32 parameters whatever the base dtype.

How the forward runs (the measurements behind it: ``benchmarks/results/e2e-cpu.md``, "After the
LoRA, lean-kernel and allocator work"; ``benchmarks/results/plan-h200.md`` for the 4-bit path):

- **The LoRA products run in the activation dtype**: ``A`` and ``B`` (r x in, out x r: small) are
  cast to ``x.dtype``, never the (tokens x in) input to fp32. The matmuls accumulate in fp32
  inside cuBLAS / oneDNN either way; in fp32 training nothing changes, in bf16 it removes one fp32
  copy of every LoRA module's input (kept for backward: 2x the input's bytes per module, three
  times over for q/k/v). Gradients reach ``A`` and ``B`` in fp32 (the cast's backward). Unsloth
  does the same; PEFT's default upcasts the input to the adapter's fp32.
- **A dense base** (``nn.Linear``, no LoRA dropout in training, no autocast) goes through
  :class:`DenseLoRAFunction`: ``y = x W^T + b`` then ``y += s (x A^T) B^T`` in place (one
  ``addmm_``), and a backward that writes ``dx = dy W + s (dy B) A`` into one buffer. Autograd on
  the plain expression allocates and sweeps four (tokens x out) tensors per module in the forward
  (base, B product, the scaled copy, the sum) and three more in the backward; this keeps one and
  one. It saves ``x`` and the (tokens x r) ``x A^T`` only, as autograd would.
- **A 4-bit base** (:class:`cllora.model.quant.FrozenLinear4bit`, same conditions, the layer's
  compute dtype equal to x's) goes through :class:`QuantLoRAFunction`, the same scheme on
  bitsandbytes' public API: ``y = gemm_4bit(x) + b`` (``bnb.matmul_4bit``, grad disabled) then
  one ``addmm_``; the backward ``dx = dy dequant(W)`` (as bitsandbytes' ``MatMul4Bit`` computes
  it) then ``dx += s (dy B) A`` in place, where autograd on ``base(x) + update`` summed the two
  (tokens x in) input gradients out of place (an extra read of two and write of one per module).
  It saves ``x`` and ``x A^T`` as autograd would; the packed weight stays on ``ctx`` as
  ``MatMul4Bit`` keeps it (a frozen parameter: no saved-tensor hook sees it). Where the layer's
  ``bnb_decodes_exactly`` is False (bitsandbytes' decoder disagrees with its own encoding of
  that weight: see :mod:`cllora.model.quant`), the forward product and ``dequant(W)`` of the
  backward come from cllora's exact decoder (``cllora_kernels.nf4.dequantize_bnb_4bit``).
- **Anything else** (LoRA dropout in training, autocast, a base of another type or dtype) runs
  ``base(x)`` under autograd and adds the LoRA term with one out-of-place ``addmm`` (no separate
  scale and add passes): :func:`add_lora`. Dropout needs ``dropout(x)`` (or its mask) kept beside
  ``x`` for the backward, which the two Functions do not keep.

Adapter state dicts (what moves between clients and the server) hold only ``<module>.lora_A``
and ``<module>.lora_B`` tensors; :mod:`cllora.model.adapter` converts them to and from the PEFT
file format. ``all-linear`` targets every ``nn.Linear`` except the LM head, as PEFT does; a list
of names where any name matches no linear module is refused (:func:`find_targets`).
"""

from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F
from torch import nn

from cllora.config import ConfigError


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update ``(alpha/r) * B A``."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        if r < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {r}")
        self.base = base
        self.r = r
        self.alpha = float(alpha)
        self.scaling = self.alpha / r
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=device))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=device))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)

    def set_rank(self, r: int) -> None:
        """Re-allocate A (r, in) and B (out, r) at a new rank (zero; load values next) and set
        the scaling to alpha / r. Used to train clients of heterogeneous ranks on one model."""
        if r == self.r:
            return
        device = self.lora_A.device
        self.lora_A = nn.Parameter(torch.zeros(r, self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=device))
        self.r, self.scaling = r, self.alpha / r

    def reconfigure(self, r: int, alpha: float, dropout: float) -> None:
        """Take another adapter's rank, alpha and dropout (scaling alpha / r); A and B are
        re-allocated (zero; load values next) only if the rank changes."""
        self.set_rank(r)
        self.alpha = float(alpha)
        self.scaling = self.alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        # transformers occasionally reads `.weight` of projection modules (dtype/device probes).
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """One of three paths (module docstring): :class:`DenseLoRAFunction` for an
        ``nn.Linear`` base, :class:`QuantLoRAFunction` for a ``FrozenLinear4bit`` base, plain
        autograd (:func:`add_lora`) with LoRA dropout in training, under autocast (the
        products' dtypes are then autocast's business) or for any other base or dtype."""
        base, dropping = self.base, self.training and isinstance(self.dropout, nn.Dropout)
        fused = not dropping and not torch.is_autocast_enabled(x.device.type)
        if fused and type(base) is nn.Linear and base.weight.dtype == x.dtype:
            return dense_lora_linear(
                x, base.weight, base.bias, self.lora_A, self.lora_B, self.scaling
            )
        if fused and _is_frozen_4bit(base):
            state = base.quant_state_for(x)  # sets compute_dtype on the first call, if unset
            if base.compute_dtype == x.dtype:
                exact = base.bnb_decodes_exactly  # else cllora decodes (cllora.model.quant)
                return quant_lora_linear(
                    x, base.weight, state, base.bias, self.lora_A, self.lora_B, self.scaling, exact
                )
        return add_lora(base(x), self.dropout(x), self.lora_A, self.lora_B, self.scaling)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}, in={self.in_features}, out={self.out_features}"


class DenseLoRAFunction(torch.autograd.Function):
    """``x W^T + b + s (x A^T) B^T`` for a frozen dense ``W``, with one output buffer forward
    and one input-gradient buffer backward (see the module docstring). Inputs: x (M, K) in the
    compute dtype, W (N, K) and b (N,) in that dtype, A (r, K) and B (N, r) in any float dtype
    (cast to x's for the products; their gradients come back in their own dtype)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling: float):
        a, b = lora_A.to(x.dtype), lora_B.to(x.dtype)
        xa = x @ a.t()  # (M, r)
        y = F.linear(x, weight, bias)  # (M, N)
        y.addmm_(xa, b.t(), alpha=scaling)
        ctx.save_for_backward(x, weight, xa, a, b)
        ctx.scaling = scaling
        ctx.dtypes = (lora_A.dtype, lora_B.dtype)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, xa, a, b = ctx.saved_tensors
        need_x, need_w, need_b, need_la, need_lb = ctx.needs_input_grad[:5]
        s = ctx.scaling
        g = grad_y.contiguous()
        g_xa = (g @ b).mul_(s)  # (M, r): dL/d(x A^T)
        grad_x = grad_w = grad_bias = grad_a = grad_b = None
        if need_x:
            grad_x = g @ weight  # (M, K)
            grad_x.addmm_(g_xa, a)
        if need_w:  # a frozen base never asks; kept so the function is a correct linear
            grad_w = g.t() @ x
        if need_b:
            grad_bias = g.sum(0)
        if need_la:
            grad_a = (g_xa.t() @ x).to(ctx.dtypes[0])  # (r, K)
        if need_lb:
            grad_b = (g.t() @ xa).mul_(s).to(ctx.dtypes[1])  # (N, r)
        return grad_x, grad_w, grad_bias, grad_a, grad_b, None


def dense_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """``x W^T + b + scaling (x A^T) B^T`` for x (..., K) through :class:`DenseLoRAFunction`."""
    lead = x.shape[:-1]
    y = DenseLoRAFunction.apply(x.reshape(-1, x.shape[-1]), weight, bias, lora_A, lora_B, scaling)
    return y.view(*lead, y.shape[-1])


def _is_frozen_4bit(base: nn.Module) -> bool:
    """Whether ``base`` is exactly a :class:`cllora.model.quant.FrozenLinear4bit` (a subclass
    may compute otherwise). Looked up in ``sys.modules``: ``quant`` imports this module, and no
    such layer exists before ``quant`` is imported."""
    quant = sys.modules.get("cllora.model.quant")
    return quant is not None and type(base) is quant.FrozenLinear4bit


class QuantLoRAFunction(torch.autograd.Function):
    """``x W_d^T + b + s (x A^T) B^T`` for a frozen 4-bit ``W`` (``W_d = dequant(W)``, never
    materialised in the forward), with one output buffer forward and one input-gradient buffer
    backward, on bitsandbytes' public API.

    Inputs: x (M, K) in the layer's compute dtype, the packed weight and its ``QuantState``
    (shape (N, K)), b (N,) in any float dtype (cast to x's for the product), A (r, K) and
    B (N, r) in any float dtype (cast to x's for the products; their gradients come back in
    their own dtype). With ``g = dL/dy`` (M, N) and ``g_xa = s g B`` (M, r):

    - forward: ``y = gemm_4bit(x, W) + b`` (``bnb.matmul_4bit``), then ``y += s (x A^T) B^T``
      in place (one ``addmm_``); saved: ``x``, ``x A^T`` (M, r) and the small casts of A, B;
    - backward: ``dL/dx = g W_d + g_xa A`` (``W_d`` from ``dequantize_4bit``, as ``MatMul4Bit``'s
      backward; the LoRA term added in place), ``dL/dA = g_xa^T x``, ``dL/dB = s g^T (x A^T)``,
      ``dL/db = sum_rows g``; the packed weight gets no gradient (bitsandbytes has none).

    ``bnb_exact=False`` (the layer's ``bnb_decodes_exactly``) replaces bitsandbytes' decoding in
    both by ``cllora_kernels.nf4.dequantize_bnb_4bit``: ``y = x W_d^T + b`` with ``W_d`` decoded
    in x's dtype (as ``gemm_4bit`` decodes), and ``W_d`` of the backward in the weight's dtype.
    """

    @staticmethod
    def forward(ctx, x, weight, quant_state, bias, lora_A, lora_B, scaling: float, bnb_exact=True):
        a, b = lora_A.to(x.dtype), lora_B.to(x.dtype)
        xa = x @ a.t()  # (M, r)
        bias_x = None if bias is None else bias.to(x.dtype)
        y = _base_product(x, weight, quant_state, bias_x, bnb_exact)  # (M, N); grad is off here
        y.addmm_(xa, b.t(), alpha=scaling)
        ctx.save_for_backward(x, xa, a, b)
        ctx.weight, ctx.state = weight, quant_state  # frozen, as MatMul4Bit keeps them
        ctx.scaling, ctx.bnb_exact = scaling, bnb_exact
        ctx.dtypes = (lora_A.dtype, lora_B.dtype, None if bias is None else bias.dtype)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, xa, a, b = ctx.saved_tensors
        need_x, _, _, need_bias, need_la, need_lb = ctx.needs_input_grad[:6]
        s = ctx.scaling
        g = grad_y.contiguous()
        grad_x = grad_bias = grad_a = grad_b = None
        g_xa = (g @ b).mul_(s) if need_x or need_la else None  # (M, r): dL/d(x A^T)
        if need_x:
            w = _dequantize(ctx.weight, ctx.state, ctx.bnb_exact).to(g.dtype)  # (N, K)
            grad_x = g @ w  # (M, K)
            del w
            grad_x.addmm_(g_xa, a)
        if need_bias:
            grad_bias = g.sum(0).to(ctx.dtypes[2])
        if need_la:
            grad_a = (g_xa.t() @ x).to(ctx.dtypes[0])  # (r, K)
        if need_lb:
            grad_b = (g.t() @ xa).mul_(s).to(ctx.dtypes[1])  # (N, r)
        return grad_x, None, None, grad_bias, grad_a, grad_b, None, None


def _base_product(
    x: torch.Tensor,
    weight: torch.Tensor,
    quant_state: object,
    bias: torch.Tensor | None,
    bnb_exact: bool,
) -> torch.Tensor:
    """``x W_d^T + b`` for a packed 4-bit ``W``: ``bnb.matmul_4bit``, or with ``bnb_exact``
    False a matmul on the weight decoded exactly in x's dtype."""
    if bnb_exact:
        from cllora.model.bnb import bnb

        return bnb.matmul_4bit(x, weight, quant_state, bias=bias)
    from cllora_kernels.nf4 import dequantize_bnb_4bit

    return F.linear(x, dequantize_bnb_4bit(weight, quant_state, dtype=x.dtype), bias)


def _dequantize(weight: torch.Tensor, quant_state: object, bnb_exact: bool) -> torch.Tensor:
    """The (N, K) weight in its own dtype: bitsandbytes' ``dequantize_4bit`` where it is exact
    (``bnb_exact``), else ``cllora_kernels.nf4.dequantize_bnb_4bit``."""
    if bnb_exact:
        from cllora.model.bnb import bnb

        return bnb.functional.dequantize_4bit(weight.view(-1, 1), quant_state)
    from cllora_kernels.nf4 import dequantize_bnb_4bit

    return dequantize_bnb_4bit(weight, quant_state)


def quant_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    quant_state: object,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    bnb_exact: bool = True,
) -> torch.Tensor:
    """``x dequant(W)^T + b + scaling (x A^T) B^T`` for x (..., K) through
    :class:`QuantLoRAFunction` (``weight`` a packed 4-bit weight, ``quant_state`` its
    bitsandbytes ``QuantState``; ``bnb_exact``: whether bitsandbytes' decoder is exact for this
    weight, as ``FrozenLinear4bit.bnb_decodes_exactly`` records, else cllora's decodes)."""
    lead = x.shape[:-1]
    y = QuantLoRAFunction.apply(
        x.reshape(-1, x.shape[-1]), weight, quant_state, bias, lora_A, lora_B, scaling, bnb_exact
    )
    return y.view(*lead, y.shape[-1])


def add_lora(
    y: torch.Tensor, x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float
) -> torch.Tensor:
    """``y + scaling (x A^T) B^T`` under plain autograd, for any base output ``y`` (..., N):
    the products in x's dtype, the sum in y's, one ``addmm`` for the B product, scale and add."""
    xa = F.linear(x, lora_A.to(x.dtype)).to(y.dtype)  # (..., r)
    out = torch.addmm(
        y.reshape(-1, y.shape[-1]), xa.reshape(-1, xa.shape[-1]), lora_B.to(y.dtype).t(),
        alpha=scaling,
    )  # fmt: skip
    return out.view(y.shape)


def _is_lm_head(model: nn.Module, module: nn.Module) -> bool:
    get_out = getattr(model, "get_output_embeddings", None)
    return get_out is not None and get_out() is module


def find_targets(
    model: nn.Module, target_modules: str | list[str], what: str = "lora.target_modules"
) -> list[str]:
    """Names of the ``nn.Linear`` modules LoRA goes into (sorted, LM head never included).

    A target matches a module whose name is it or ends with ``.<target>`` (``q_proj``,
    ``self_attn.q_proj``). A list where any name matches nothing (a typo beside valid names, the
    LM head, a module that is not linear) raises a :class:`~cllora.config.ConfigError` naming the
    unmatched names and the linear module names the model has; ``what`` says where the names
    came from (the config key, or an adapter file). A single name may be given as a string.
    """
    linears = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not _is_lm_head(model, module)
    ]
    if target_modules == "all-linear":
        chosen, unmatched = linears, ([] if linears else ["all-linear"])
    else:
        names = [target_modules] if isinstance(target_modules, str) else list(target_modules)
        chosen = [n for n in linears if any(_matches(n, t) for t in names)]
        unmatched = [t for t in names if not any(_matches(n, t) for n in linears)]
    if unmatched:
        raise _unmatched_targets(what, target_modules, unmatched, linears)
    return sorted(chosen)


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def _unmatched_targets(
    what: str, target_modules: str | list[str], unmatched: list[str], linears: list[str]
) -> ConfigError:
    given = target_modules if isinstance(target_modules, str) else f"[{', '.join(target_modules)}]"
    leaves = sorted({n.rsplit(".", 1)[-1] for n in linears})
    return ConfigError(
        f"{what}={given}: {', '.join(unmatched)} "
        f"{'matches' if len(unmatched) == 1 else 'match'} no linear module of the model (the LM "
        f"head is never adapted); its linear modules are {', '.join(leaves) or 'none'}: use "
        "names from that list, or all-linear"
    )


def inject_lora(
    model: nn.Module,
    r: int,
    alpha: float,
    dropout: float = 0.0,
    target_modules: str | list[str] = "all-linear",
    what: str = "lora.target_modules",
) -> list[str]:
    """Replace each targeted ``nn.Linear`` by a :class:`LoRALinear`; freeze everything else.

    Returns the names of the replaced modules. Raises if the model already has LoRA, and a
    :class:`~cllora.config.ConfigError` if a target matches nothing (see :func:`find_targets`;
    ``what`` names the targets' source in that message).
    """
    if lora_modules(model):
        raise ValueError("the model already has LoRA modules; load a fresh base model")
    for p in model.parameters():
        p.requires_grad_(False)
    targets = find_targets(model, target_modules, what)
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(getattr(parent, child), r, alpha, dropout))
    return targets


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """``{module name: LoRALinear}`` in model order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable adapter parameters (A and B of every LoRA module)."""
    return [p for m in lora_modules(model).values() for p in (m.lora_A, m.lora_B)]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the adapter: ``{"<module>.lora_A": A, "<module>.lora_B": B}``."""
    state = {}
    for name, m in lora_modules(model).items():
        state[f"{name}.lora_A"] = m.lora_A.detach().clone()
        state[f"{name}.lora_B"] = m.lora_B.detach().clone()
    return state


def set_lora_state(model: nn.Module, state: dict[str, torch.Tensor], resize: bool = False) -> None:
    """Copy an adapter state dict into the model's LoRA modules (keys and shapes must match).

    ``resize=True`` first sets each module to the rank of its tensors in ``state`` (scaling
    alpha / rank), for adapters of another rank than the model's (heterogeneous clients).
    """
    modules = lora_modules(model)
    if resize:
        for name, m in modules.items():
            key = f"{name}.lora_A"
            if key in state:
                m.set_rank(state[key].shape[0])
    expected = {f"{n}.{part}" for n in modules for part in ("lora_A", "lora_B")}
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise ValueError(
            "adapter does not match the model's LoRA modules: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    bad = []
    for name, m in modules.items():
        for part in ("lora_A", "lora_B"):
            key, param = f"{name}.{part}", getattr(m, part)
            if state[key].shape != param.shape:
                bad.append(
                    f"{key}: adapter {tuple(state[key].shape)} vs model {tuple(param.shape)}"
                )
    if bad:
        raise ValueError("adapter tensor shapes do not match the model: " + "; ".join(bad[:5]))
    with torch.no_grad():
        for name, m in modules.items():
            m.lora_A.copy_(state[f"{name}.lora_A"])
            m.lora_B.copy_(state[f"{name}.lora_B"])


def state_nbytes(state: dict[str, torch.Tensor]) -> int:
    """Bytes of an adapter state dict as sent over the wire (tensor payload only)."""
    return sum(t.numel() * t.element_size() for t in state.values())
