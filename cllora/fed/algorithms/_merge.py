"""What ``fedex`` and ``flora`` share: updates folded into the frozen base weights.

Usage::

    from cllora.fed.algorithms._merge import export_state, fold_into_base, stack_factors
    P, Q = stack_factors([B1, B2], [A1, A2], [c1, c2])   # P @ Q == c1 B1 A1 + c2 B2 A2
    fold_into_base(model, deltas)      # each LoRA module's base weight := W0 + delta (idempotent)
    state, rank = export_state(global_state, deltas, alpha)   # one PEFT LoRA for all of it

Both algorithms keep a global model ``W0 + D + s B A`` per LoRA module: ``W0`` the original
frozen base weight, ``D`` (out, in) the accumulated dense fp32 delta the algorithm folded in,
``B A`` the global adapter. :class:`MergingAlgorithm` holds what is common to them:

- **State**: ``state["delta"][<module>]`` is ``D`` (fp32, on the adapter's device), checkpointed
  with the server state, so ``--resume`` rebuilds the very same base. ``state["round"]`` counts
  the merges, ``state["merge_ranks"][t]`` is the rank of the stacked factors merged in round
  ``t + 1``, ``state["synced"][<client index>]`` the number of merges a client has received.
- **The shared model**: :func:`fold_into_base` writes ``(W0.float() + D).to(W0.dtype)`` into the
  base weight, from a copy of ``W0`` taken the first time it folds (a plain attribute of the
  :class:`~cllora.model.lora.LoRALinear`): applying it again, or on a fresh model after
  ``--resume``, gives bitwise the same weight (no sum of rounded increments). Cost: one copy of
  the adapted base weights and one fp32 (out, in) delta per module, in memory and in every
  checkpoint. In a bf16 base the folded weight is rounded to bf16 (exact in fp32).
- **A 4-bit base** (``model.quant`` nf4 / fp4) is refused: a dense delta cannot be folded into
  bitsandbytes' 4-bit blocks losslessly, and re-quantizing every round would drift from the
  maths; keeping ``D`` as a dense side term of the forward would give up the memory 4-bit exists
  for.
- **Bytes down**: a client needs, besides the adapter, every merge it has not received yet (in a
  real deployment its base copy must follow the server's). Each client is counted, per module,
  ``min(out * in, R * (out + in))`` fp32 numbers: the merges since its last participation as
  stacked factors (``R`` the sum of their ranks), or their dense sum when that is smaller. A
  client that never trained needs every merge so far. Nothing of it counts up.
- **Export**: ``adapter/`` is one PEFT LoRA adapter reproducing ``s B A + D`` on the original
  base: ``[s/s_e B, U_D sqrt(S_D/s_e)]`` and ``[A; sqrt(S_D/s_e) V_D^T]`` from the SVD of ``D``
  (singular values above ``max(out, in) * eps_fp32 * S_max``, so exact to fp32 precision), every
  module zero-padded to one rank ``R_e`` (PEFT's config has one ``r``), ``s_e = alpha / R_e``.
  ``R_e`` can reach ``r + min(out, in)`` after many rounds: the adapter is then as large as the
  dense deltas.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cllora.config import Config, ConfigError
from cllora.fed.algorithms.base import Algorithm, ClientResult, Downlink, State
from cllora.fed.lora_algebra import A_SUFFIX, B_SUFFIX, modules_of
from cllora.model.lora import lora_modules, set_lora_state

ORIGINAL = "_cllora_original_weight"  # the LoRALinear attribute holding W0
DELTA_BYTES = 4  # the merges travel in fp32


@dataclass
class MergeDownlink(Downlink):
    """A downlink that also carries the merges the client has not received (counted, not
    materialised: the in-process clients share the server's folded base)."""

    merge_nbytes: int = 0

    def nbytes(self) -> int:
        return super().nbytes() + (self.merge_nbytes if self.counted else 0)


def stack_factors(
    Bs: Sequence[torch.Tensor], As: Sequence[torch.Tensor], coefs: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``P = [c_1 B_1, ..., c_K B_K]`` (out, sum r_k) and ``Q = [A_1; ...; A_K]``
    (sum r_k, in): ``P @ Q = sum_k c_k B_k A_k`` (any signs, any mix of ranks)."""
    if not Bs or len(Bs) != len(As) or len(As) != len(coefs):
        raise ValueError(
            f"need matching non-empty factor lists, got {len(Bs)}, {len(As)}, {len(coefs)}"
        )
    P = torch.cat([b.float() * float(c) for b, c in zip(Bs, coefs, strict=True)], dim=1)
    Q = torch.cat([a.float() for a in As], dim=0)
    return P, Q


def module_shapes(state: State) -> dict[str, tuple[int, int]]:
    """``{module: (out, in)}`` of an adapter."""
    return {
        m: (state[m + B_SUFFIX].shape[0], state[m + A_SUFFIX].shape[1]) for m in modules_of(state)
    }


def catch_up_nbytes(shapes: dict[str, tuple[int, int]], ranks: Sequence[int]) -> int:
    """Bytes of the merges of ``ranks`` (their stacked ranks) sent to one client: per module the
    stacked factors or the dense sum, whichever is smaller."""
    total = sum(ranks)
    if total == 0:
        return 0
    return DELTA_BYTES * sum(min(o * i, total * (o + i)) for o, i in shapes.values())


def fold_into_base(model: torch.nn.Module, deltas: dict[str, torch.Tensor]) -> None:
    """Set every LoRA module's base weight to ``W0 + deltas[module]`` (``W0`` where it has
    none); ``W0`` is copied the first time. Idempotent; see the module doc."""
    for name, m in lora_modules(model).items():
        d, original = deltas.get(name), getattr(m, ORIGINAL, None)
        if original is None and d is None:
            continue
        weight = m.base.weight
        if type(m.base) is not torch.nn.Linear or not weight.is_floating_point():
            raise ValueError(f"{name}: cannot fold a dense delta into a {type(m.base).__name__}")
        if original is None:
            original = weight.detach().clone()
            setattr(m, ORIGINAL, original)
        with torch.no_grad():
            if d is None:
                weight.copy_(original)
            else:
                weight.copy_((original.float() + d.to(original.device)).to(original.dtype))


def numerical_rank(S: torch.Tensor, shape: tuple[int, int]) -> int:
    """Singular values above ``max(shape) * eps_fp32 * S_max`` (lora_algebra.refactor's)."""
    if S.numel() == 0 or float(S.max()) == 0.0:
        return 0
    tol = float(S.max()) * max(shape) * torch.finfo(torch.float32).eps
    return int((tol < S).sum())


def export_state(
    global_state: State, deltas: dict[str, torch.Tensor], alpha: float
) -> tuple[State, int]:
    """A LoRA adapter of one rank ``R_e`` whose ``(alpha / R_e) B_e A_e`` is, per module,
    ``(alpha / r) B A + D`` (exact to fp32 precision); returns it and ``R_e``."""
    mods = modules_of(global_state)
    svds, extra = {}, 0
    for m in mods:
        d = deltas.get(m)
        if d is not None:
            U, S, Vh = torch.linalg.svd(d.float(), full_matrices=False)
            k = numerical_rank(S, tuple(d.shape))
            svds[m] = (U[:, :k], S[:k], Vh[:k])
            extra = max(extra, k)
    ranks = {global_state[m + A_SUFFIX].shape[0] for m in mods}
    if len(ranks) != 1:
        raise ValueError(f"the global adapter mixes ranks {sorted(ranks)}")
    r = ranks.pop()
    rank = r + extra
    s_e = alpha / rank
    out: State = {}
    for m in mods:
        A, B = global_state[m + A_SUFFIX].float(), global_state[m + B_SUFFIX].float()
        o, i = B.shape[0], A.shape[1]
        A_d, B_d = A.new_zeros(extra, i), B.new_zeros(o, extra)
        if m in svds:
            U, S, Vh = svds[m]
            root = (S / s_e).sqrt().to(A.device)
            k = S.numel()
            A_d[:k], B_d[:, :k] = root[:, None] * Vh.to(A.device), U.to(A.device) * root
        out[m + A_SUFFIX] = torch.cat([A, A_d], dim=0)
        out[m + B_SUFFIX] = torch.cat([B * ((alpha / r) / s_e), B_d], dim=1)
    return out, rank


def save_export(
    model: torch.nn.Module, directory: Path, base_model: str, state: State, rank: int, note: str
) -> Path:
    """:func:`cllora.model.adapter.save_adapter` of ``state`` with ``r = rank`` in its config
    and ``note`` in its README."""
    from cllora.model.adapter import CONFIG_NAME, README_NAME, adapter_readme, save_adapter

    path = save_adapter(model, directory, base_model=base_model, state=state)
    cfg = json.loads((path / CONFIG_NAME).read_text())
    cfg["r"] = rank
    (path / CONFIG_NAME).write_text(json.dumps(cfg, indent=2) + "\n")
    readme = adapter_readme(base_model, cfg["base_model_name_or_path"], cfg)
    (path / README_NAME).write_text(readme + "\n" + note + "\n")
    return path


class MergingAlgorithm(Algorithm):
    """An algorithm whose global model is ``W0 + D + s B A`` (see the module doc); subclasses
    aggregate and call :meth:`merge` with the round's stacked factors."""

    changes_base = True

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.state = self._fresh_state()

    @staticmethod
    def _fresh_state() -> dict[str, Any]:
        return {"delta": {}, "round": 0, "merge_ranks": [], "synced": {}}

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        if cfg.model.quant != "none":
            raise ConfigError(
                f"fed.strategy={cls.name} folds dense updates into the base weights every round, "
                f"which a 4-bit base (model.quant={cfg.model.quant}) cannot hold losslessly: use "
                "model.quant=none"
            )

    # -- one round -----------------------------------------------------------------------

    def adapter_downlink(self, index: int, global_state: State) -> Downlink:
        """The adapter part of the downlink (FedAvg's: the global adapter at the client's rank)."""
        return super().downlink(index, global_state)

    def downlink(self, index: int, global_state: State) -> MergeDownlink:
        """:meth:`adapter_downlink` plus the bytes of the merges the client has not received."""
        down = self.adapter_downlink(index, global_state)
        missed = self.state["merge_ranks"][self.state["synced"].get(str(index), 0) :]
        merge = catch_up_nbytes(module_shapes(global_state), missed)
        return MergeDownlink(down.adapter, down.extra, down.counted, merge_nbytes=merge)

    def merge(
        self, results: list[ClientResult], stacks: dict[str, tuple[torch.Tensor, torch.Tensor]]
    ) -> dict[str, float]:
        """Add ``P @ Q`` of every module's stacked factors to its delta; the round's clients
        are synced up to the previous merge. Returns the norms for the round record."""
        delta = self.state["delta"]
        sq = 0.0
        for m, (P, Q) in stacks.items():
            update = P @ Q
            sq += float(update.double().pow(2).sum())
            delta[m] = update if m not in delta else delta[m].add_(update)
        for r in results:
            self.state["synced"][str(r.index)] = self.state["round"]
        self.state["round"] += 1
        rank = max((P.shape[1] for P, _ in stacks.values()), default=0)
        self.state["merge_ranks"].append(rank)
        total = sum(float(d.double().pow(2).sum()) for d in delta.values())
        return {"merged_rank": rank, "merged_norm": math.sqrt(sq), "delta_norm": math.sqrt(total)}

    # -- the global model ------------------------------------------------------------------

    def apply_global(self, model: torch.nn.Module, global_state: State) -> None:
        """The global adapter into the LoRA modules and ``W0 + D`` into their base weights."""
        set_lora_state(model, global_state, resize=True)
        fold_into_base(model, self.state["delta"])

    def export(self, model: torch.nn.Module, global_state: State, directory: Path) -> Path:
        """One PEFT LoRA adapter that reproduces the global model on the original base."""
        state, rank = export_state(global_state, self.state["delta"], self.cfg.lora.alpha)
        note = (
            f"Exported by fed.strategy={self.name}: the global adapter stacked with the SVD of "
            f"the updates {self.name} folded into the base weights (rank {rank} in all), so on "
            "the original base it reproduces the global model to fp32 precision."
        )
        return save_export(model, directory, self.cfg.model.name, state, rank, note)

    # -- state -----------------------------------------------------------------------------

    def load_state_dict(self, state: dict[str, Any], model: torch.nn.Module | None = None) -> None:
        """Restore the state and fold its delta into ``model``'s base (when given)."""
        self.state = {**self._fresh_state(), **state}
        self.state["delta"] = dict(self.state["delta"])
        self.state["synced"] = {str(k): int(v) for k, v in self.state["synced"].items()}
        self.state["merge_ranks"] = [int(v) for v in self.state["merge_ranks"]]
        self.state["round"] = int(self.state["round"])
        if model is not None:
            fold_into_base(model, self.state["delta"])
