"""``exact``: the rank-r truncated SVD of ``sum_k w_k s_k B_k A_k``, re-factored into the global
rank (exact when that sum has rank <= r, the best rank-r approximation otherwise).

Usage: ``cllora run fed.strategy=exact`` (any mix of ``lora.client_ranks``). Computed from the
stacked factors, never the dense (out, in) product (:mod:`cllora.fed.lora_algebra`); the
discarded energy is in each ``round`` record's ``discarded_energy_total``.
"""

from __future__ import annotations

from cllora.fed.algorithms.base import Algorithm


class Exact(Algorithm):
    name = "exact"
    reads_each_uplink = "the truncated SVD of the stacked factors of every client"
