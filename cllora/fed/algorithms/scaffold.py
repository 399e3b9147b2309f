"""``scaffold`` (SCAFFOLD, Karimireddy et al., 2020): control variates on the LoRA parameters.

Usage: ``cllora run fed.strategy=scaffold`` (``fed.server_lr``: the global step eta, default 1).
Needs one rank for every client.

Maths, per adapter tensor (A and B of every module), with ``x`` the global adapter, ``c`` the
server control variate, ``c_i`` client i's (all zeros at the start), ``K = train.local_steps``,
``lr = train.lr``, ``S`` the round's successful clients with weights ``w_i`` (sum 1), ``N`` the
number of clients:

- client i starts from ``y_i = x`` and takes K AdamW steps, each followed by
  ``y_i -= lr (c - c_i)`` (:class:`StepCorrection`, a :class:`~cllora.fed.local_rule.LocalRule`);
- then option II: ``c_i+ = c_i - c + (x - y_i) / (K lr)``; it sends ``y_i`` and
  ``delta_c_i = c_i+ - c_i`` and keeps ``c_i+``;
- server: ``x+ = x + eta * sum_{i in S} w_i (y_i - x)`` (``eta = 1``: ``sum_i w_i y_i``, FedAvg
  exactly) and ``c+ = c + (|S| / N) * mean_{i in S} delta_c_i = c + (1/N) sum_{i in S}
  delta_c_i``, so that ``c`` stays the mean of all N ``c_i``.

Decisions:

- The inner optimizer is the run's AdamW, not SGD: this is SCAFFOLD with an Adam inner
  optimizer. ``(x - y_i) / (K lr)`` then estimates the client's mean *Adam step direction*
  (plus its correction) per unit learning rate, so the correction is applied in the same
  units: after each AdamW step, as a step of its own, ``-lr (c - c_i)``. Added to the raw
  gradient instead (SGD's form), AdamW's per-element normalisation would scale the correction
  up to a whole step wherever raw gradients are small, and the clients would replay earlier
  rounds' mean direction instead of following their losses. Round 1 (``c = c_i = 0``) is
  FedAvg.
- ``x`` uses the run's ``fed.weighting`` (``w_i``); ``c`` the uniform mean of the paper, which
  keeps ``c = mean_i c_i``. ``|S|`` counts the clients that finished the round (a failed
  client keeps its ``c_i``). ``N`` is the number of clients the run has.
- Traffic: down, ``x`` and ``c``; up, ``y_i`` and ``delta_c_i`` (so SCAFFOLD moves twice
  FedAvg's bytes). ``c_i`` is what client i keeps (:meth:`Algorithm.keep`): under
  ``state["clients"][str(i)]["c"]`` in the in-process pool, on the client's SuperNode under
  Flower (the server never reads it); ``c`` is ``state["c"]`` (fp32, saved in every
  checkpoint: a resumed run is bit-exact).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from cllora.config import Config
from cllora.fed.algorithms.base import (
    Algorithm,
    ClientResult,
    Downlink,
    State,
    Trainee,
    Uplink,
    require_one_rank,
)
from cllora.fed.local_rule import LocalRule
from cllora.fed.strategy import AggregateResult, fedavg


def zeros_like_state(state: State) -> State:
    """fp32 zeros in the shape of every tensor of ``state``."""
    return {k: torch.zeros_like(t, dtype=torch.float32) for k, t in state.items()}


def correction(c: State, c_i: State) -> State:
    """The gradient correction ``c - c_i``."""
    return {k: c[k] - c_i[k] for k in c}


class StepCorrection(LocalRule):
    """After every optimizer step, each trained tensor moves by ``-lr * correction[name]``
    (``c - c_i``; see the module doc for why it is not added to the gradient)."""

    def __init__(self, correction: State) -> None:
        self.correction = correction
        self.pairs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def start(self, names: Sequence[str], params: Sequence[torch.Tensor]) -> None:
        missing = [n for n in names if n not in self.correction]
        if missing:
            raise ValueError(f"the step correction lacks {missing[:3]}")
        self.pairs = [
            (p, self.correction[n].to(p.device, p.dtype))
            for n, p in zip(names, params, strict=True)
        ]

    def after_step(self, lr: float) -> None:
        with torch.no_grad():
            for p, c in self.pairs:  # outside AdamW's normalisation: it keeps its scale
                p.add_(c, alpha=-lr)


def client_control(c_i: State, c: State, x: State, y: State, steps: int, lr: float) -> State:
    """Option II: ``c_i+ = c_i - c + (x - y) / (steps * lr)`` (fp32)."""
    scale = 1.0 / (steps * lr)
    return {k: c_i[k] - c[k] + (x[k].float() - y[k].float()) * scale for k in c}


def server_model(x: State, ys: list[State], weights: list[float], eta: float) -> State:
    """``x + eta * sum_i w_i (y_i - x)``; at ``eta = 1`` exactly ``sum_i w_i y_i``."""
    if eta == 1.0:
        return fedavg(ys, weights)
    mean_delta = fedavg([{k: y[k].float() - x[k].float() for k in x} for y in ys], weights)
    return {k: (x[k].float() + eta * mean_delta[k]).to(x[k].dtype) for k in x}


def server_control(c: State, deltas: list[State], num_clients: int) -> State:
    """``c + (1 / N) * sum_i delta_c_i`` = ``c + (|S| / N) mean_i delta_c_i``."""
    out = {k: t.clone() for k, t in c.items()}
    for d in deltas:
        for k in out:
            out[k].add_(d[k], alpha=1.0 / num_clients)
    return out


def state_norm(state: State) -> float:
    """The Frobenius norm over every tensor, summed in sorted key order (fp64): the same after
    a resume, whose checkpoint may return the keys in another order."""
    return math.sqrt(sum(float(state[k].double().pow(2).sum()) for k in sorted(state)))


class Scaffold(Algorithm):
    name = "scaffold"
    keeps_client_state = True
    settings = ("server_lr",)
    uplink_extra = ("delta_c",)

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.num_clients = cfg.partition.num_clients  # set from the data by trainees()

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        require_one_rank(cfg, "scaffold", "its control variates have the adapter's shapes")

    def trainees(self, chosen: list[int], names: list[str]) -> list[Trainee]:
        self.num_clients = len(names)
        return super().trainees(chosen, names)

    def _server_c(self, like: State) -> State:
        return self.state["c"] if "c" in self.state else zeros_like_state(like)

    def _client_c(self, index: int, like: State) -> State:
        kept = self.state.get("clients", {}).get(str(index))
        return kept["c"] if kept is not None else zeros_like_state(like)

    def downlink(self, index: int, global_state: State) -> Downlink:
        return Downlink(global_state, extra={"c": self._server_c(global_state)})

    def local_rules(self, index: int, down: Downlink) -> list[LocalRule]:
        c_i = self._client_c(index, down.adapter)
        return [StepCorrection(correction(down.extra["c"], c_i))]

    def uplink(self, index: int, down: Downlink, trained: State) -> Uplink:
        c, c_i = down.extra["c"], self._client_c(index, down.adapter)
        lr, steps = self.cfg.train.lr, self.cfg.train.local_steps
        c_new = client_control(c_i, c, down.adapter, trained, steps, lr)
        delta = {k: c_new[k] - c_i[k] for k in c_new}
        return Uplink(trained, extra={"delta_c": delta}, kept={"c": c_new})

    def aggregate(self, global_state: State, results: list[ClientResult]) -> AggregateResult:
        ys = [r.uplink.adapter for r in results]
        new_x = server_model(global_state, ys, [r.weight for r in results], self.server_lr)
        c = self._server_c(global_state)
        self.state["c"] = server_control(
            c, [r.uplink.extra["delta_c"] for r in results], self.num_clients
        )
        c_norm = state_norm(self.state["c"])
        state = {k: new_x[k].to(global_state[k].dtype) for k in global_state}
        info = {
            "strategy": self.name,
            "rank_method": "same-rank",
            "server_lr": self.server_lr,
            "num_clients": self.num_clients,
            "control_norm": c_norm,
        }
        return AggregateResult(state, {}, info)
