"""``fedsa`` (FedSA-LoRA, Guo et al., ICLR 2025): A is shared and averaged, B stays with its client.

Usage: ``cllora run fed.strategy=fedsa``. Needs one rank for every client.

Maths, per module, over the round's successful clients ``S`` with weights ``w_k`` (sum 1):

- server: ``A = sum_{k in S} w_k A_k``; client ``k``'s ``B_k`` never travels.
- client ``k`` starts from ``(A, B_k)`` where ``B_k`` is its own B after its previous local
  training, or the initial global B (zeros) the first time it is chosen, and trains both.

Decisions:

- Traffic: only A is counted. The downlink's adapter holds the global A *and* the client's own
  B (that is what the client trains from), but :class:`SharedADownlink` counts only the A
  tensors; the uplink's adapter is A only, B goes to ``kept`` (never counted).
- Per-client B is simulated server-side under ``state["clients"][str(index)]["B"]`` (saved in
  every checkpoint, so a resumed run is bit-exact); the initial global B is kept as
  ``state["init_B"]`` for clients chosen for the first time after round 1.
- The "global model" (global test set, ``adapter/`` export) is the shared A with
  ``B = sum_{k in S} w_k B_k``, the weighted mean of the round's trained B. It is a
  *measurement* only: a real FedSA server never sees B and could not form it (``A`` with the
  initial ``B = 0`` would be the base model). Local evaluation uses each client's own B.
- A client that fails keeps its previous B (its uplink never arrives).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cllora.config import Config
from cllora.fed.algorithms.base import (
    Algorithm,
    ClientResult,
    Downlink,
    State,
    Uplink,
    a_part,
    b_part,
    require_one_rank,
)
from cllora.fed.lora_algebra import B_SUFFIX
from cllora.fed.strategy import AggregateResult, fedavg
from cllora.model.lora import state_nbytes


@dataclass
class SharedADownlink(Downlink):
    """A downlink whose adapter holds the client's own B: only the A tensors (and ``extra``)
    are counted, since B is already on the client."""

    def nbytes(self) -> int:
        if not self.counted:
            return 0
        return state_nbytes(a_part(self.adapter)) + sum(
            state_nbytes(s) for s in self.extra.values()
        )


def fedsa_aggregate(
    a_states: list[State], b_states: list[State], weights: list[float]
) -> tuple[State, State]:
    """``(sum_k w_k A_k, sum_k w_k B_k)``: the shared A and the measured mean B."""
    return fedavg(a_states, weights), fedavg(b_states, weights)


class FedSA(Algorithm):
    name = "fedsa"
    keeps_client_state = True
    server_reads_kept = (
        "its global model is measured with every client's own B, which a node never sends"
    )

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        require_one_rank(cfg, "fedsa", "A is shared and averaged")

    def _own_b(self, index: int, global_state: State) -> State:
        """Client ``index``'s B: its kept one, else the initial global B."""
        kept = self.state.get("clients", {}).get(str(index))
        if kept is not None:
            return kept["B"]
        if "init_B" in self.state:
            return self.state["init_B"]
        return b_part(global_state)  # before the first aggregation: the initial adapter

    def downlink(self, index: int, global_state: State) -> Downlink:
        own = self._own_b(index, global_state)
        adapter = {k: own[k] if k.endswith(B_SUFFIX) else t for k, t in global_state.items()}
        return SharedADownlink(adapter)

    def uplink(self, index: int, down: Downlink, trained: State) -> Uplink:
        return Uplink(a_part(trained), kept={"B": b_part(trained)})

    def aggregate(self, global_state: State, results: list[ClientResult]) -> AggregateResult:
        weights = [r.weight for r in results]
        A, B = fedsa_aggregate(
            [r.uplink.adapter for r in results], [r.uplink.kept["B"] for r in results], weights
        )
        if "init_B" not in self.state:  # round 1 aggregates from the initial adapter
            self.state["init_B"] = {k: t.clone() for k, t in b_part(global_state).items()}
        clients: dict[str, Any] = self.state.get("clients", {})  # each B, stored by keep()
        new = {**A, **B}
        state = {k: new[k].to(global_state[k].dtype) for k in global_state}
        info = {
            "strategy": self.name,
            "rank_method": "same-rank",
            "global_b": "weighted mean of the round's client B (measurement only)",
            "clients_with_b": len(clients),
        }
        return AggregateResult(state, {}, info)
