"""``flora`` (FLoRA, Wang et al., NeurIPS 2024): stack the clients' LoRA factors, merge their
exact weighted sum into the base weights every round, and restart LoRA.

Usage: ``cllora run fed.strategy=flora`` (any mix of ``lora.client_ranks``; ``model.quant=none``).

Maths, per LoRA module, with client weights ``w_k`` (summing to 1) and scalings
``s_k = alpha / r_k``: the stacked factors ``B = [w_1 s_1 B_1, ..., w_K s_K B_K]``
(out, sum_k r_k) and ``A = [A_1; ...; A_K]`` (sum_k r_k, in) have ``B A = sum_k w_k s_k B_k A_k``
exactly (scalings folded into B), which is merged into the base: ``W <- W + B A``. The next
round's clients start from a fresh LoRA (``B = 0``) on the merged base, so the global model
``W`` is exactly the weighted average of the client models ``W_prev + s_k B_k A_k``.

Decisions (details in :mod:`cllora.fed.algorithms._merge`):

- **The fresh LoRA**: round 1 starts from the initial global adapter (its A from the run's
  seed, B = 0); after round ``t`` the global A is re-drawn as LoRA initialises it
  (Kaiming-uniform, ``a = sqrt(5)``) from a CPU generator seeded by ``(seed, t)`` (the same on
  every device and on ``--resume``), B = 0. A client of rank ``r_k`` starts from its first
  ``r_k`` rows of A and B = 0.
- **Where the merged delta lives**: the accumulated ``D`` is a dense fp32 (out, in) tensor per
  module in ``state["delta"]`` (checkpointed: ``--resume`` is bit-exact), folded into the shared
  model's base weight as ``W0 + D`` from a kept copy of ``W0`` (idempotent).
- **A 4-bit base** is refused (:class:`~cllora.config.ConfigError`).
- **Bytes down**: the fresh adapter at the client's rank (counted as FedAvg counts its adapter,
  though A could travel as its seed) plus the stacked factors of every merge the client has not
  received since it last trained (rank ``sum_k r_k`` per round), or their dense sum where that
  is smaller. **Bytes up**: the trained adapter.
- **Export**: one PEFT LoRA adapter of rank ``r + rank(D)`` from the SVD of ``D`` (exact to fp32
  precision; the fresh adapter's B is zero) that reproduces the global model on the original
  base. Keeping every round's stacks instead would be exact too but grows without bound.
- ``fed.server_lr`` is not used. The ``round`` record has ``merged_norm`` (``||B A||_F`` of the
  round, over all modules), ``merged_rank`` (``sum_k r_k``) and ``delta_norm`` (``||D||_F``).
"""

from __future__ import annotations

import math

import torch

from cllora.fed.algorithms._merge import MergingAlgorithm, stack_factors
from cllora.fed.algorithms.base import ClientResult, Downlink, State
from cllora.fed.lora_algebra import A_SUFFIX, B_SUFFIX, modules_of
from cllora.fed.strategy import AggregateResult


def flora_stack(
    client_states: list[State], weights: list[float], alpha: float, module: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """One module's ``([w_1 s_1 B_1, ..., w_K s_K B_K], [A_1; ...; A_K])``."""
    a, b = module + A_SUFFIX, module + B_SUFFIX
    coefs = [w * alpha / c[a].shape[0] for c, w in zip(client_states, weights, strict=True)]
    return stack_factors([c[b] for c in client_states], [c[a] for c in client_states], coefs)


def round_seed(seed: int, round_idx: int) -> int:
    """Seed of the fresh LoRA A drawn after round ``round_idx``."""
    return (seed * 1_000_003 + round_idx * 7_919 + 17) % (2**31)


def fresh_adapter(template: State, seed: int) -> State:
    """A LoRA at ``template``'s shapes, dtypes and device: A Kaiming-uniform (``a = sqrt(5)``,
    as :class:`~cllora.model.lora.LoRALinear`) from one CPU generator over the sorted modules,
    B = 0."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for m in modules_of(template):
        A, B = template[m + A_SUFFIX], template[m + B_SUFFIX]
        fresh = torch.nn.init.kaiming_uniform_(torch.empty(A.shape), a=math.sqrt(5), generator=gen)
        out[m + A_SUFFIX] = fresh.to(device=A.device, dtype=A.dtype)
        out[m + B_SUFFIX] = torch.zeros_like(B)
    return out


class FLoRA(MergingAlgorithm):
    name = "flora"

    def adapter_downlink(self, index: int, global_state: State) -> Downlink:
        """The fresh global LoRA at the client's rank: the first ``r_k`` rows of A, B = 0."""
        rank = self.client_rank(index)
        if rank == self.global_rank():
            return Downlink(global_state)
        out = {}
        for m in modules_of(global_state):
            A, B = global_state[m + A_SUFFIX], global_state[m + B_SUFFIX]
            out[m + A_SUFFIX] = A[:rank].clone()
            out[m + B_SUFFIX] = B.new_zeros(B.shape[0], rank)
        return Downlink(out)

    def aggregate(self, global_state: State, results: list[ClientResult]) -> AggregateResult:
        """Merge the stacked product into ``state["delta"]``; the new global is a fresh LoRA."""
        clients = [r.uplink.adapter for r in results]
        weights = [r.weight for r in results]
        alpha = self.cfg.lora.alpha
        stacks = {m: flora_stack(clients, weights, alpha, m) for m in modules_of(global_state)}
        info = {
            "strategy": self.name,
            "client_ranks": [
                max(c[k].shape[0] for k in c if k.endswith(A_SUFFIX)) for c in clients
            ],
            **self.merge(results, stacks),
        }
        state = fresh_adapter(global_state, round_seed(self.cfg.seed, self.state["round"]))
        return AggregateResult(state, {}, info)
