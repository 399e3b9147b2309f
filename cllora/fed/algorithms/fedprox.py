"""``fedprox`` (Li et al., 2020): FedAvg whose clients add ``mu/2 ||theta - theta_global||^2``.

Usage: ``cllora run fed.strategy=fedprox fed.prox_mu=0.01``. The proximal term runs over the
adapter (A and B); the server aggregates as FedAvg. ``prox_mu=0`` is FedAvg exactly.
"""

from __future__ import annotations

from cllora.fed.algorithms.base import Algorithm, Downlink, LocalRule
from cllora.fed.strategy import AggregateResult


class FedProx(Algorithm):
    name = "fedprox"
    mean_of_uplinks = True

    def local_rule(self, index: int, down: Downlink) -> LocalRule:
        return LocalRule(prox_mu=self.cfg.fed.prox_mu)

    def aggregate(self, global_state, results) -> AggregateResult:
        return self._aggregate_as("fedavg", global_state, results)
