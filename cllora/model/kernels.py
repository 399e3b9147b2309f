"""Opt-in kernel swaps for a loaded transformers model, and the fused LM-head loss.

Usage::

    from cllora.model.kernels import enable_kernels, fused_lm_loss_sum

    inject_lora(model, r=16, alpha=32)      # first: the LoRA modules are what gets fused
    replaced = enable_kernels(model)        # {"lora_linear": [names], "rms_norm": [...],
                                            #  "swiglu_mlp": [...], "rope": []}
    loss_sum, n = fused_lm_loss_sum(hidden, model.get_output_embeddings().weight, targets)

Nothing happens at import time: :func:`enable_kernels` is an explicit call that replaces modules
of the model (Llama, Qwen2 and Mistral families) by our own modules holding the *same* parameter
objects (so optimizers, adapter state dicts and checkpoints see no difference) and returns the
names it replaced. Each swapped module calls :mod:`cllora_kernels`, whose dispatch runs the Triton
kernels on CUDA tensors and the torch references on CPU (``cllora_kernels.backend("triton")``
forces Triton, e.g. in the interpreter).

What is swapped:

- ``LoRALinear`` -> :class:`FusedLoRALinear`: base product and LoRA term in one kernel; the base
  may be an ``nn.Linear`` or a bitsandbytes NF4 ``Linear4bit`` such as
  ``cllora.model.quant.FrozenLinear4bit`` (decoded inside the kernel; FP4 falls back). The
  fused path has no dropout: while training with LoRA dropout > 0 the module falls back to the
  unfused ``LoRALinear.forward`` (in eval, dropout is the identity and the fused path runs).
- ``*RMSNorm`` with ``variance_epsilon`` -> :class:`KernelRMSNorm`.
- ``*MLP`` with ``gate_proj``/``up_proj``/``down_proj`` and a SiLU activation ->
  :class:`KernelSwiGLUMLP` (``silu(gate) * up`` in one kernel, recomputed in backward).
- RoPE: **not swapped**. transformers computes cos/sin once per forward and every attention layer
  calls the module-level ``apply_rotary_pos_emb`` function; replacing it would mean patching
  transformers' modeling modules, which we do not do. ``cllora_kernels.rope`` (positions in,
  packed sequences supported) is there for an attention path of our own to call.
"""

from __future__ import annotations

import cllora_kernels as ck
import torch
from torch import nn

from cllora.data.formatting import IGNORE_INDEX
from cllora.model.lora import LoRALinear

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
_SILU = ("silu", "swish")


def _base_weight(base: nn.Module) -> tuple[torch.Tensor | ck.NF4Weight, torch.Tensor | None] | None:
    """The base layer's weight for the fused kernel (dense or NF4), or None if unsupported."""
    state = getattr(getattr(base, "weight", None), "quant_state", None)
    if state is not None:  # bitsandbytes Linear4bit (a subclass of nn.Linear): NF4 only
        cpu_layout = getattr(base.weight, "packing_format_for_cpu", False)  # bnb's inference repack
        if getattr(state, "quant_type", None) != "nf4" or cpu_layout:
            return None
        return ck.NF4Weight.from_bnb(base.weight, state), getattr(base, "bias", None)
    if type(base) is nn.Linear:
        return base.weight, base.bias
    return None


class FusedLoRALinear(LoRALinear):
    """A :class:`LoRALinear` whose forward is one fused ``x W^T + s (x A^T) B^T`` kernel."""

    @classmethod
    def from_lora(cls, module: LoRALinear) -> FusedLoRALinear:
        """Same parameters, buffers, submodules and hooks as ``module`` (shared, not copied)."""
        new = cls.__new__(cls)
        new.__dict__ = dict(module.__dict__)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dropout = self.dropout
        if self.training and isinstance(dropout, nn.Dropout) and dropout.p > 0:
            return super().forward(x)  # dropout on the LoRA input: not on the fused path
        base = _base_weight(self.base)
        if base is None:
            return super().forward(x)
        weight, bias = base
        return ck.lora_linear(x, weight, self.lora_A, self.lora_B, self.scaling, bias)


class KernelRMSNorm(nn.Module):
    """Llama-style RMSNorm (``weight * x / rms(x)``, fp32 maths) through ``cllora_kernels``."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.weight = norm.weight  # (H,), the same Parameter
        self.variance_epsilon = float(norm.variance_epsilon)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ck.rms_norm(x, self.weight, self.variance_epsilon)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class KernelSwiGLUMLP(nn.Module):
    """``down(silu(gate(x)) * up(x))`` with the SwiGLU product in one kernel; the projections
    are the original modules (``nn.Linear``, ``LoRALinear`` or ``FusedLoRALinear``)."""

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(ck.swiglu(self.gate_proj(x), self.up_proj(x)))


def kernels_supported(model: nn.Module) -> bool:
    """Whether :func:`enable_kernels` knows this model's family."""
    return getattr(getattr(model, "config", None), "model_type", None) in SUPPORTED_MODEL_TYPES


def _is_rms_norm(module: nn.Module) -> bool:
    return (
        type(module).__name__.endswith("RMSNorm")
        and hasattr(module, "variance_epsilon")
        and getattr(module, "weight", None) is not None
        and module.weight.dim() == 1
    )


def _is_swiglu_mlp(module: nn.Module, hidden_act: str | None) -> bool:
    parts = ("gate_proj", "up_proj", "down_proj")
    return (
        type(module).__name__.endswith("MLP")
        and all(hasattr(module, p) for p in parts)
        and hidden_act in _SILU
    )


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def enable_kernels(
    model: nn.Module, lora: bool = True, rms_norm: bool = True, swiglu: bool = True
) -> dict[str, list[str]]:
    """Swap the supported modules of ``model`` in place; return ``{kind: [module names]}``.

    Kinds: ``lora_linear``, ``rms_norm``, ``swiglu_mlp`` and ``rope`` (always empty, see the
    module docstring). Models outside :data:`SUPPORTED_MODEL_TYPES` are left alone (all lists
    empty). Idempotent: modules swapped before are not swapped again. Call it after
    ``inject_lora`` (LoRA modules injected later are plain ``LoRALinear``; call it again).
    """
    replaced: dict[str, list[str]] = {
        "lora_linear": [],
        "rms_norm": [],
        "swiglu_mlp": [],
        "rope": [],
    }
    if not kernels_supported(model):
        return replaced
    hidden_act = getattr(model.config, "hidden_act", None)
    for name, module in list(model.named_modules()):
        if not name:
            continue
        if lora and type(module) is LoRALinear:
            _swap(model, name, FusedLoRALinear.from_lora(module))
            replaced["lora_linear"].append(name)
        elif rms_norm and _is_rms_norm(module) and not isinstance(module, KernelRMSNorm):
            _swap(model, name, KernelRMSNorm(module))
            replaced["rms_norm"].append(name)
        elif swiglu and _is_swiglu_mlp(module, hidden_act) and type(module) is not KernelSwiGLUMLP:
            _swap(model, name, KernelSwiGLUMLP(module))
            replaced["swiglu_mlp"].append(name)
    return replaced


def fused_lm_loss_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy of ``hidden (N, H) @ weight (V, H)^T`` against ``targets (N,)`` and
    the number of non-ignored targets, never forming the (N, V) logits at once.

    Chunked over tokens with dL/dhidden computed in the same pass (Triton on CUDA, the chunked
    torch reference on CPU). ``weight`` gets a gradient only if it requires one (frozen LM head
    in LoRA training: no work). Drop-in for
    ``F.cross_entropy(lm_head(hidden).float(), targets, reduction="sum")``.
    """
    n = int((targets != ignore_index).sum())
    if n == 0:
        return hidden.sum() * 0.0, 0
    loss = ck.linear_cross_entropy(hidden, weight, targets, ignore_index, "sum", chunk_size)
    return loss, n
