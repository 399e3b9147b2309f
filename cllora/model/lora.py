"""Our LoRA linear module and its injection into a transformers model.

Usage::

    from cllora.model.lora import inject_lora, lora_state_dict, set_lora_state

    replaced = inject_lora(model, r=16, alpha=32, dropout=0.05, target_modules="all-linear")
    state = lora_state_dict(model)        # {"model.layers.0.self_attn.q_proj.lora_A": (r, in), ...}
    set_lora_state(model, state)          # load an adapter (e.g. the aggregated global one)

Maths: ``y = x W^T + (alpha / r) * dropout(x) A^T B^T`` with ``A`` (r, in) initialised
Kaiming-uniform and ``B`` (out, r) zero, so at init the LoRA model computes exactly the base model.
The base ``W`` stays frozen; ``A`` and ``B`` are fp32 whatever the base dtype (the LoRA branch
runs in fp32 and is cast back to the base output dtype).

Adapter state dicts (what moves between clients and the server) hold only ``<module>.lora_A``
and ``<module>.lora_B`` tensors; :mod:`cllora.model.adapter` converts them to and from the PEFT
file format. ``all-linear`` targets every ``nn.Linear`` except the LM head, as PEFT does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


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
        y = self.base(x)  # (..., out)
        h = self.dropout(x).to(self.lora_A.dtype)
        update = F.linear(F.linear(h, self.lora_A), self.lora_B)  # (..., r) -> (..., out)
        return y + (update * self.scaling).to(y.dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}, in={self.in_features}, out={self.out_features}"


def _is_lm_head(model: nn.Module, module: nn.Module) -> bool:
    get_out = getattr(model, "get_output_embeddings", None)
    return get_out is not None and get_out() is module


def find_targets(model: nn.Module, target_modules: str | list[str]) -> list[str]:
    """Names of the ``nn.Linear`` modules LoRA goes into (sorted, LM head never included)."""
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or _is_lm_head(model, module):
            continue
        if target_modules == "all-linear" or any(
            name == t or name.endswith("." + t) for t in target_modules
        ):
            names.append(name)
    if not names:
        available = sorted(
            {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        )
        raise ValueError(
            f"lora.target_modules={target_modules!r} matches no linear layer of the model; "
            f"linear layers here: {', '.join(available)}"
        )
    return sorted(names)


def inject_lora(
    model: nn.Module,
    r: int,
    alpha: float,
    dropout: float = 0.0,
    target_modules: str | list[str] = "all-linear",
) -> list[str]:
    """Replace each targeted ``nn.Linear`` by a :class:`LoRALinear`; freeze everything else.

    Returns the names of the replaced modules. Raises if the model already has LoRA.
    """
    if lora_modules(model):
        raise ValueError("the model already has LoRA modules; load a fresh base model")
    for p in model.parameters():
        p.requires_grad_(False)
    targets = find_targets(model, target_modules)
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
