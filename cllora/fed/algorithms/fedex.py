"""``fedex`` (FedEx-LoRA, Singhal et al., ACL 2025): FedAvg of the factors, with the error of
averaging them folded into the frozen base weights, so the global model is exactly the weighted
average of the client models.

Usage: ``cllora run fed.strategy=fedex`` (any mix of ``lora.client_ranks``; ``model.quant=none``).

Maths, per LoRA module, with client weights ``w_k`` (summing to 1) and scalings
``s_k = alpha / r_k``: the global adapter is FedAvg's, ``A = sum_k w_k A_k``,
``B = sum_k w_k B_k`` (mixed ranks zero-padded to the global rank ``r``, each client's factors
multiplied by ``sqrt(s_k / s)`` first, as :func:`cllora.fed.strategy.fedavg_factors`), and the
residual ``E = sum_k w_k s_k B_k A_k - s B A`` (``s = alpha / r``) is added to the base weight:
``W <- W + E``. Then ``W + s B A = sum_k w_k (W + s_k B_k A_k)``: the global model is the
weighted average of the clients' models, to fp32 precision. ``E`` is computed from the stacked
factors ``[w_1 s_1 B_1, ..., w_K s_K B_K, -s B] @ [A_1; ...; A_K; A]`` (one matmul, fp32).
Clients start each round from the global adapter on the folded base (a client of lower rank
from its rank-``r_k`` SVD truncation, as under FedAvg: its start then differs from the global
model by what the truncation drops).

Decisions (details in :mod:`cllora.fed.algorithms._merge`):

- **Where the residual lives**: the accumulated ``D = sum_rounds E`` is a dense fp32 (out, in)
  tensor per module in ``state["delta"]`` (checkpointed: ``--resume`` is bit-exact); the shared
  model's base weight is set to ``W0 + D`` from a kept copy of the original ``W0`` in
  :meth:`apply_global` (idempotent) and on :meth:`load_state_dict`.
- **A 4-bit base** is refused (:class:`~cllora.config.ConfigError`): the residual cannot be
  folded into 4-bit blocks losslessly.
- **Bytes down**: the adapter at the client's rank (as FedAvg) plus the residuals the client
  has not received since it last trained, as stacked factors (rank ``sum_k r_k + r`` per round)
  or their dense sum, whichever is smaller per module. A real client needs them: its base must
  follow the server's. **Bytes up**: the trained adapter, as FedAvg.
- **Export**: one PEFT LoRA adapter of rank ``r + rank(D)`` (``[B, U_D]`` and ``[A; V_D]``
  from the SVD of ``D``, scalings folded) that reproduces the global model on the original base,
  loadable by PEFT and :func:`cllora.model.adapter.load_adapter`.
- ``fed.server_lr`` is not used (the average is exact by construction). The ``round`` record
  has ``merged_norm`` (``||E||_F`` over all modules), ``merged_rank`` and ``delta_norm``
  (``||D||_F``).
"""

from __future__ import annotations

import torch

from cllora.fed.algorithms._merge import MergingAlgorithm, stack_factors
from cllora.fed.algorithms.base import ClientResult, State
from cllora.fed.lora_algebra import A_SUFFIX, B_SUFFIX, modules_of
from cllora.fed.strategy import AggregateResult


def fedex_residual(
    client_states: list[State], weights: list[float], alpha: float, average: State, module: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked factors ``(P, Q)`` of one module's residual
    ``sum_k w_k s_k B_k A_k - s B A`` (``s_k``, ``s``: alpha over each adapter's rank)."""
    a, b = module + A_SUFFIX, module + B_SUFFIX
    Bs = [c[b] for c in client_states] + [average[b]]
    As = [c[a] for c in client_states] + [average[a]]
    coefs = [w * alpha / c[a].shape[0] for c, w in zip(client_states, weights, strict=True)]
    return stack_factors(Bs, As, [*coefs, -alpha / average[a].shape[0]])


class FedEx(MergingAlgorithm):
    name = "fedex"

    def aggregate(self, global_state: State, results: list[ClientResult]) -> AggregateResult:
        """FedAvg of the factors; the residual goes into ``state["delta"]`` (the base)."""
        agg = self.average_factors(global_state, results)
        clients = [r.uplink.adapter for r in results]
        weights = [r.weight for r in results]
        alpha = self.cfg.lora.alpha
        stacks = {
            m: fedex_residual(clients, weights, alpha, agg.state, m) for m in modules_of(agg.state)
        }
        info = {**agg.info, "strategy": self.name, **self.merge(results, stacks)}
        return AggregateResult(agg.state, agg.server_state, info)
