"""``fedprox`` (Li et al., 2020): FedAvg whose clients add ``mu/2 ||theta - theta_global||^2``.

Usage: ``cllora run fed.strategy=fedprox fed.prox_mu=0.01``. The proximal term runs over the
adapter (A and B; :class:`ProximalTerm`, a :class:`~cllora.fed.local_rule.LocalRule`); the
server aggregates as FedAvg (the round record's ``strategy`` says ``fedavg``). ``prox_mu=0`` is
FedAvg exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cllora.fed.algorithms.base import Algorithm, Downlink
from cllora.fed.local_rule import LocalRule


class ProximalTerm(LocalRule):
    """``mu/2 * sum ||p - p_start||^2`` over the trained tensors, added to every step's loss."""

    def __init__(self, mu: float) -> None:
        if not mu >= 0:
            raise ValueError(f"the proximal mu must be >= 0, got {mu}")
        self.mu = mu
        self.anchors: list[torch.Tensor] = []

    def start(self, names: Sequence[str], params: Sequence[torch.Tensor]) -> None:
        self.anchors = [p.detach().clone() for p in params] if self.mu > 0 else []

    def penalty(self, params: Sequence[torch.Tensor]) -> torch.Tensor | None:
        if not self.anchors:
            return None
        prox = sum(((p - a) ** 2).sum() for p, a in zip(params, self.anchors, strict=True))
        return 0.5 * self.mu * prox


class FedProx(Algorithm):
    name = "fedprox"
    mean_of_uplinks = True
    settings = ("prox_mu",)

    def local_rules(self, index: int, down: Downlink) -> list[LocalRule]:
        return [ProximalTerm(self.cfg.fed.prox_mu)]
