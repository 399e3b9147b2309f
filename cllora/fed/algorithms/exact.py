"""``exact``: the rank-r truncated SVD of ``sum_k w_k s_k B_k A_k``, re-factored into the global
rank (exact when that sum has rank <= r, the best rank-r approximation otherwise).

Usage: ``cllora run fed.strategy=exact`` (any mix of ``lora.client_ranks``). Computed from the
stacked factors, never the dense (out, in) product (:func:`cllora.fed.strategy.exact_aggregate`,
:mod:`cllora.fed.lora_algebra`); the discarded energy is in each ``round`` record's
``discarded_energy_total``.
"""

from __future__ import annotations

from cllora.fed.algorithms.base import Algorithm, ClientResult, State
from cllora.fed.strategy import AggregateResult, exact_aggregate


class Exact(Algorithm):
    name = "exact"
    reads_each_uplink = "the truncated SVD of the stacked factors of every client"

    def aggregate(self, global_state: State, results: list[ClientResult]) -> AggregateResult:
        return exact_aggregate(
            global_state,
            [r.uplink.adapter for r in results],
            [r.weight for r in results],
            *self.scalings(results),
        )
