"""``fedavg`` (McMahan et al., 2017) on LoRA factors: ``A = sum_k w_k A_k``, ``B = sum_k w_k B_k``.

Usage: ``cllora run fed.strategy=fedavg`` (the default). Averaging the factors is not averaging
the updates (``mean(B) mean(A) != mean(B A)``): ``exact`` and ``fedex`` do the latter. Mixed
ranks are zero-padded to the largest (:func:`cllora.fed.strategy.fedavg_factors`).
"""

from __future__ import annotations

from cllora.fed.algorithms.base import Algorithm


class FedAvg(Algorithm):
    name = "fedavg"
    mean_of_uplinks = True
