"""The FedOpt family (Reddi et al., 2021): a server optimizer on the averaged update.

Usage::

    from cllora.fed.algorithms import make_algorithm
    algo = make_algorithm(cfg)                # cfg.fed.strategy = "fedadam", say
    agg = algo.aggregate(global_state, results)   # one server step on d = fedavg - global
    algo.step, algo.moments["m"], algo.moments["v"]
    algo.state_dict()    # {"server": {"strategy": "fedadam", "step": 1, "m": {...}, "v": {...}}}

Not an algorithm file itself: each server optimizer (``fedavgm``, ``fedadam``, ...) subclasses
:class:`FedOpt` (or :class:`AdaptiveFedOpt`) in a file of its own and implements only its rule;
``fedamsgrad.py`` is the example of a new one (docs/ARCHITECTURE.md, "Adding a server optimizer
or a local rule"). What the family shares lives here:

- the pseudo-gradient ``d = fedavg(clients) - x`` on the zero-padded global ``x``
  (:func:`cllora.fed.strategy.pseudo_gradient`; scalings folded as for FedAvg);
- the step count ``t`` (1-based in a rule) and the moments, one state dict each, named by
  :attr:`FedOpt.moment_names`: ``m_0 = 0`` and every other moment starts at ``v_0 = tau^2``
  (Reddi et al.), or 0 with :attr:`FedOpt.bias_correction`. When ranks grow, the moments are
  zero-padded (``m``) or ``v_0``-padded (the others) to the new rank;
- the ``info`` of the round record (``step``, ``pseudo_gradient_norm``);
- the checkpoint layout ``state["server"] = {"strategy": name, "step": t, "m": {...}, "v":
  {...}, ...}`` (one entry per moment), and its restore, bit-exact on resume.

:class:`AdaptiveFedOpt` is the Adam-like part: ``m = b1 m + (1 - b1) d`` and
``x += eta m_hat / (sqrt(v_hat) + tau)``; a subclass gives the second moment
(:meth:`AdaptiveFedOpt.second_moment`) and may change which moment normalises the step
(:meth:`AdaptiveFedOpt.normaliser`, AMSGrad's running maximum). With ``bias_correction``,
``m_hat = m / (1 - b1^t)`` and, where :attr:`AdaptiveFedOpt.corrects_v`,
``v_hat = v / (1 - b2^t)``.

Settings: ``fed.server_lr`` (empty: the class's ``default_server_lr``), ``fed.server_momentum``,
``fed.beta1``, ``fed.beta2``, ``fed.tau`` are read once into typed attributes of the instance
(the config checks their ranges); ``bias_correction`` is no config key (False: the paper's
rules) and may be set on an instance.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from cllora.config import Config
from cllora.fed.algorithms.base import Algorithm, ClientResult, State
from cllora.fed.lora_algebra import pad_tensor, rank_dim
from cllora.fed.strategy import AggregateResult, check_inputs, pseudo_gradient

Moments = dict[str, torch.Tensor]  # one tensor's moments, by moment name


class FedOpt(Algorithm):
    """A server optimizer: subclasses name their moments and implement :meth:`rule`."""

    default_server_lr = 1e-2
    settings = ("server_lr",)
    #: the moments the optimizer keeps, in checkpoint order ("m" starts at 0, the others at v_0)
    moment_names: ClassVar[tuple[str, ...]] = ("m", "v")

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        f = cfg.fed
        self.lr: float = self.server_lr
        self.momentum: float = f.server_momentum
        self.beta1: float = f.beta1
        self.beta2: float = f.beta2
        self.tau: float = f.tau
        self.bias_correction: bool = False
        self.step: int = 0  # server steps taken
        self.moments: dict[str, State] = {}  # by moment name; empty before the first step

    def rule(
        self, x: torch.Tensor, d: torch.Tensor, prev: Moments, t: int
    ) -> tuple[torch.Tensor, Moments]:
        """One tensor's step: ``(new x, new moments)`` from ``x``, the pseudo-gradient ``d``,
        the moments before the step and the 1-based step ``t`` (fp32)."""
        raise NotImplementedError

    # -- one round -----------------------------------------------------------------------

    def aggregate(self, global_state: State, results: list[ClientResult]) -> AggregateResult:
        """One server step on the uplinks, at their ranks' scalings (:meth:`optimize`)."""
        return self.optimize(
            global_state,
            [r.uplink.adapter for r in results],
            [r.weight for r in results],
            *self.scalings(results),
        )

    def optimize(
        self,
        global_state: State,
        client_states: Sequence[State],
        weights: Sequence[float],
        client_scalings: Sequence[float] | None = None,
        global_scaling: float | None = None,
    ) -> AggregateResult:
        """One server step on ``d = fedavg(clients) - global`` (mixed ranks zero-padded,
        scalings folded as :func:`cllora.fed.strategy.fedavg_factors`); the info adds ``step``
        and ``pseudo_gradient_norm``, ``server_state`` is :meth:`state_dict`'s ``"server"``."""
        args = check_inputs(
            self.name, global_state, client_states, weights, client_scalings, global_scaling
        )
        x, delta = pseudo_gradient(global_state, client_states, weights, args)
        new_x = self.server_step(x, delta)
        args.info.update(step=self.step, pseudo_gradient_norm=_norm(delta))
        state = {k: new_x[k].to(global_state[k].dtype) for k in global_state}
        return AggregateResult(state, self.state_dict()["server"], args.info)

    def server_step(self, x: State, delta: State) -> State:
        """Step every tensor of ``x`` (fp32) by its rule; the moments and step advance."""
        prev, t = self._padded_moments(x), self.step + 1
        new_x: State = {}
        new: dict[str, State] = {n: {} for n in self.moment_names}
        for k in x:
            new_x[k], moments = self.rule(x[k], delta[k], {n: prev[n][k] for n in prev}, t)
            for n in self.moment_names:
                new[n][k] = moments[n]
        self.moments, self.step = new, t
        return new_x

    def initial_moment(self, name: str) -> float:
        """``m_0 = 0``; the others ``tau^2`` (Reddi et al.), 0 with bias correction."""
        if name == "m":
            return 0.0
        return 0.0 if self.bias_correction else self.tau**2

    def _padded_moments(self, x: State) -> dict[str, State]:
        """The moments before this step (fresh at the first), padded to ``x``'s ranks."""
        if not self.moments:
            return {
                n: {k: torch.full_like(t, self.initial_moment(n)) for k, t in x.items()}
                for n in self.moment_names
            }
        return {n: self._padded(n, x) for n in self.moment_names}

    def _padded(self, name: str, x: State) -> State:
        moments, fill = self.moments[name], self.initial_moment(name)
        if moments.keys() != x.keys():
            diff = sorted(set(moments) ^ set(x))[:5]
            raise ValueError(f"server_state[{name!r}] keys differ from the adapter's: {diff}")
        out = {}
        for k, t in x.items():
            mom, dim = moments[k], rank_dim(k)
            if mom.shape[1 - dim] != t.shape[1 - dim] or mom.shape[dim] > t.shape[dim]:
                raise ValueError(
                    f"server_state[{name!r}][{k!r}] is {tuple(mom.shape)}, the adapter's "
                    f"{tuple(t.shape)}"
                )
            out[k] = pad_tensor(k, mom.float(), t.shape[dim], fill)
        return out

    # -- state (today's checkpoint layout) -------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """``{}`` before the first step, else ``{"server": {"strategy", "step", moments...}}``."""
        if not self.step:
            return {}
        return {"server": {"strategy": self.name, "step": self.step, **self.moments}}

    def load_state_dict(self, state: dict[str, Any], model: torch.nn.Module | None = None) -> None:
        server = state.get("server") or {}
        if not server:
            self.step, self.moments = 0, {}
            return
        if server.get("strategy") != self.name:
            raise ValueError(
                f"server_state belongs to {server.get('strategy')!r}, not {self.name!r}; "
                "start a new strategy from {}"
            )
        missing = [n for n in self.moment_names if n not in server]
        if missing:
            raise ValueError(f"server_state of {self.name!r} lacks the moments {missing}")
        self.step = int(server["step"])
        self.moments = {n: dict(server[n]) for n in self.moment_names}


class AdaptiveFedOpt(FedOpt):
    """Adam-like server optimizers: subclasses give :meth:`second_moment`."""

    settings = ("server_lr", "beta1", "beta2", "tau")
    #: bias correction divides v by ``1 - b2^t`` (False where v is a sum, as Adagrad's)
    corrects_v: ClassVar[bool] = True

    def second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        """The new ``v`` from the previous one and ``d2 = d * d``."""
        raise NotImplementedError

    def normaliser(self, new: Moments, prev: Moments) -> torch.Tensor:
        """The moment under the square root of the step (``v``; AMSGrad: its running max,
        which it adds to ``new``)."""
        return new["v"]

    def rule(
        self, x: torch.Tensor, d: torch.Tensor, prev: Moments, t: int
    ) -> tuple[torch.Tensor, Moments]:
        new = {"m": self.beta1 * prev["m"] + (1 - self.beta1) * d}
        new["v"] = self.second_moment(prev["v"], d * d)
        m_hat, v_hat = new["m"], self.normaliser(new, prev)
        if self.bias_correction:
            m_hat = m_hat / (1 - self.beta1**t)
            if self.corrects_v:
                v_hat = v_hat / (1 - self.beta2**t)
        return x + self.lr * m_hat / (v_hat.sqrt() + self.tau), new


def _norm(delta: State) -> float:
    """The Frobenius norm of the pseudo-gradient (fp64 sums, in key order)."""
    return math.sqrt(sum(float(d.double().pow(2).sum()) for d in delta.values()))
