"""``hetlora`` (HetLoRA, Cho et al., 2024): mixed client ranks, norm-weighted zero-padded averaging.

Usage: ``cllora run fed.strategy=hetlora lora.client_ranks=[2,4,8]`` (without
``lora.client_ranks`` every client has ``lora.r`` and this is FedAvg with norm weights).

Maths, with global rank ``R = max(lora.r, client ranks)``, client k of rank ``r_k`` and scaling
``s_k = alpha / r_k`` (the global's ``s = alpha / R``), ``w_k`` the run's weights:

- downlink (truncation, as the paper): client k gets the first ``r_k`` rows of every global A and
  the first ``r_k`` columns of every global B, each times ``sqrt(s / s_k)`` so that
  ``s_k B_k A_k`` equals ``s B[:, :r_k] A[:r_k]``;
- aggregation (the paper's sparsity-weighted aggregation): ``n_k = ||Delta W_k||_F`` with
  ``||Delta W_k||_F^2 = sum_modules ||s_k B_k A_k||_F^2`` (one norm per client over all its
  modules, as the paper's per-client norm of its LoRA product), ``p_k = w_k n_k / sum_j w_j
  n_j``, then the zero-padded average of :func:`cllora.fed.strategy.fedavg_factors` (``fedavg``:
  ``A = sum_k p_k sqrt(s_k / s) pad(A_k)``, ``B`` alike) at rank R.

Decisions: truncation rather than the base class's SVD re-factoring on the way down (HetLoRA's
rule: the leading rank components are the ones every client shares); the norm is of the
client's whole adapter product (the global starts from ``B = 0``, so it is the client's update
accumulated over the run), computed from the (r, r) Gram matrices, never the dense product;
all norms zero (no client moved) falls back to ``w_k``. The paper's rank self-pruning (clients
shrinking their rank during training) is out of scope. No state between rounds.
"""

from __future__ import annotations

import math

from cllora.fed.algorithms.base import Algorithm, ClientResult, Downlink, State
from cllora.fed.lora_algebra import A_SUFFIX, B_SUFFIX, modules_of
from cllora.fed.strategy import AggregateResult


def update_norm(state: State, scaling: float) -> float:
    """``sqrt(sum_modules ||scaling * B @ A||_F^2)`` via ``||B A||_F^2 = <B^T B, A A^T>`` (fp64)."""
    total = 0.0
    for m in modules_of(state):
        A, B = state[m + A_SUFFIX].double(), state[m + B_SUFFIX].double()
        total += float(((B.T @ B) * (A @ A.T)).sum())
    return abs(scaling) * math.sqrt(max(total, 0.0))


def norm_weights(weights: list[float], norms: list[float]) -> list[float]:
    """``p_k = w_k n_k / sum_j w_j n_j``; ``weights`` unchanged when every product is 0."""
    raw = [w * n for w, n in zip(weights, norms, strict=True)]
    total = sum(raw)
    if not total > 0:
        return list(weights)
    return [x / total for x in raw]


def truncate_to_rank(state: State, r: int, global_scaling: float, client_scaling: float) -> State:
    """The first ``r`` rows of each A and columns of each B, times ``sqrt(global / client)``."""
    fold = math.sqrt(global_scaling / client_scaling)
    out = {}
    for m in modules_of(state):
        A, B = state[m + A_SUFFIX], state[m + B_SUFFIX]
        if r > A.shape[0]:
            raise ValueError(f"{m}: client rank {r} exceeds the global rank {A.shape[0]}")
        out[m + A_SUFFIX] = (A[:r].float() * fold).to(A.dtype)
        out[m + B_SUFFIX] = (B[:, :r].float() * fold).to(B.dtype)
    return out


class HetLoRA(Algorithm):
    name = "hetlora"
    reads_each_uplink = "each update's norm weights it"

    def downlink(self, index: int, global_state: State) -> Downlink:
        rank, big = self.client_rank(index), self.global_rank()
        if rank == big:
            return Downlink(global_state)
        return Downlink(truncate_to_rank(global_state, rank, self.scaling(big), self.scaling(rank)))

    def aggregate(self, global_state: State, results: list[ClientResult]) -> AggregateResult:
        norms = [
            update_norm(r.uplink.adapter, self.scaling(self.client_rank(r.index))) for r in results
        ]
        weights = norm_weights([r.weight for r in results], norms)
        weighted = [
            ClientResult(r.index, r.uplink, w) for r, w in zip(results, weights, strict=True)
        ]
        agg = self.average_factors(global_state, weighted)
        agg.info.update(strategy=self.name, update_norms=norms, norm_weights=weights)
        return agg
