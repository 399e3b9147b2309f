"""Aggregation strategies: pure functions over adapter-only state dicts.

Usage::

    from cllora.fed.strategy import StrategyOptions, aggregate, client_weights

    w = client_weights([1200, 800], "tokens")                  # [0.6, 0.4]
    res = aggregate("fedadam", global_state, [state_a, state_b], w, server_state,
                    StrategyOptions(server_lr=1e-2))
    global_state, server_state = res.state, res.server_state   # keep both for the next round
    res.info                          # method used for ranks, discarded energy, step, ...

    global_state = fedavg([state_a, state_b], w)               # plain FedAvg (equal shapes)

Strategies (:data:`STRATEGIES`), each over ``<module>.lora_A`` (r, in) / ``<module>.lora_B``
(out, r) pairs whose update is ``s * B @ A`` (``s = alpha / r``, the scaling):

- ``fedavg``: ``A = sum_k w_k A_k``, ``B = sum_k w_k B_k`` (the common baseline; note that
  mean(B) mean(A) != mean(B A)).
- ``fedavgm``, ``fedadam``, ``fedyogi``, ``fedadagrad``: server optimizers of Reddi et al.
  (2021), per tensor, on the pseudo-gradient ``d = fedavg(clients) - global`` (rules in
  :func:`server_step`). ``server_state`` carries their moments between rounds.
- ``exact``: the rank-r truncated SVD of ``sum_k w_k s_k B_k A_k``, re-factored into the global
  rank r (``global_scaling * B A`` is the truncation; exact when the sum has rank <= r), computed
  from the stacked factors without the dense (out, in) product (:mod:`cllora.fed.lora_algebra`).
- ``frozen_a`` (FFA-LoRA): every client's A must equal the global A; only B is averaged, which
  is then exact.

Ranks may differ between clients: the FedAvg family zero-pads every A (rows) and B (columns) to
``R = max(global rank, client ranks)`` and returns a rank-R global (``info["rank_method"] ==
"zero-padding"``); ``exact`` stacks the factors and returns the global rank
(``"stacked-factors-svd"``); :func:`to_client_rank` re-factors a global adapter down to a low-rank
client's rank. Scalings (``client_scalings``, ``global_scaling``) default to the other side's
common value, else 1. Where they differ, the FedAvg family averages ``sqrt(s_k / s) A_k`` and
``sqrt(s_k / s) B_k`` (``frozen_a``: ``(s_k / s) B_k``) so that each client's own update reads
the same under the global scaling. All maths runs in fp32; results have the global's dtypes;
inputs are never mutated.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from cllora.fed.lora_algebra import (
    A_SUFFIX,
    B_SUFFIX,
    SPLITS,
    lowrank_svd,
    modules_of,
    pad_tensor,
    rank_dim,
    refactor,
    to_client_rank,
)

__all__ = [
    "STRATEGIES",
    "WEIGHTINGS",
    "AggregateResult",
    "StrategyOptions",
    "aggregate",
    "client_weights",
    "fedavg",
    "server_step",
    "to_client_rank",
]

STRATEGIES = ("fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "exact", "frozen_a")
SERVER_OPTIMIZERS = ("fedavgm", "fedadam", "fedyogi", "fedadagrad")
WEIGHTINGS = ("uniform", "samples", "tokens", "quality")

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class StrategyOptions:
    """Every knob of every strategy, with its default."""

    # Server learning rate eta (all server optimizers). 1.0 with momentum 0 makes fedavgm FedAvg;
    # the adaptive ones step about eta per element at first: Reddi et al. tune eta ~ 1e-2.
    server_lr: float = 1.0
    momentum: float = 0.9  # fedavgm's beta
    beta1: float = 0.9  # first moment (fedadam, fedyogi, fedadagrad)
    beta2: float = 0.99  # second moment (fedadam, fedyogi)
    tau: float = 1e-3  # adaptivity eps, and v_0 = tau^2 (Reddi et al.)
    # False (Reddi et al.): no correction, v_0 = tau^2. True: Adam's m / (1 - beta1^t) and, for
    # fedadam / fedyogi, v / (1 - beta2^t), with v_0 = 0.
    bias_correction: bool = False
    factor_split: str = "sqrt"  # exact: "sqrt" (B = U sqrt(S), A = sqrt(S) V^T) or "b" (A = V^T)
    frozen_a_atol: float = 0.0  # frozen_a: largest |A_k - A| accepted (0 = bitwise equal)

    def __post_init__(self) -> None:
        checks = {
            "server_lr > 0": self.server_lr > 0,
            "0 <= momentum < 1": 0 <= self.momentum < 1,
            "0 <= beta1 < 1": 0 <= self.beta1 < 1,
            "0 <= beta2 < 1": 0 <= self.beta2 < 1,
            "tau > 0": self.tau > 0,
            "frozen_a_atol >= 0": self.frozen_a_atol >= 0,
            f"factor_split in {SPLITS}": self.factor_split in SPLITS,
        }
        failed = [name for name, ok in checks.items() if not ok]
        if failed:
            raise ValueError(f"invalid StrategyOptions {self}: need {', '.join(failed)}")


@dataclass
class AggregateResult:
    state: State  # the new global adapter
    server_state: dict[str, Any]  # the server optimizer's state for the next round
    info: dict[str, Any] = field(default_factory=dict)


def client_weights(counts: Sequence[float], weighting: str) -> list[float]:
    """Normalised aggregation weights.

    ``uniform``: ``1/n`` (``counts`` only gives n); ``samples``, ``tokens``, ``quality``:
    proportional to the per-client numbers passed (sample counts, token counts, quality scores
    where higher is better). Entries must be finite and >= 0, with a positive total.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; allowed: {', '.join(WEIGHTINGS)}")
    if not counts:
        raise ValueError("no clients to weight")
    values = [float(c) for c in counts]
    bad = [i for i, c in enumerate(values) if not math.isfinite(c) or c < 0]
    if bad:
        raise ValueError(
            f"{weighting} weighting needs finite entries >= 0; clients {bad} have "
            f"{[values[i] for i in bad]}"
        )
    if weighting == "uniform":
        return [1.0 / len(values)] * len(values)
    total = sum(values)
    if total <= 0:
        raise ValueError(f"{weighting} weighting needs a positive total, got {values}")
    return [c / total for c in values]


def fedavg(states: Sequence[State], weights: Sequence[float]) -> State:
    """Weighted average of adapter state dicts with identical keys and shapes."""
    if not states:
        raise ValueError("fedavg needs at least one client state")
    if len(states) != len(weights):
        raise ValueError(f"{len(states)} states but {len(weights)} weights")
    keys = states[0].keys()
    for i, s in enumerate(states[1:], 1):
        if s.keys() != keys:
            diff = sorted(set(s) ^ set(keys))[:5]
            raise ValueError(f"client state {i} has different keys from client 0: {diff}")
        shapes = [k for k in keys if s[k].shape != states[0][k].shape]
        if shapes:
            raise ValueError(
                f"client state {i} has other shapes than client 0 at {shapes[:5]}; mixed LoRA "
                "ranks: use aggregate('fedavg', ...), which zero-pads"
            )
    out = {}
    for k in keys:
        acc = torch.zeros_like(states[0][k], dtype=torch.float32)
        for s, w in zip(states, weights, strict=True):
            acc.add_(s[k].float(), alpha=float(w))
        out[k] = acc.to(states[0][k].dtype)
    return out


def aggregate(
    strategy: str,
    global_state: State,
    client_states: Sequence[State],
    weights: Sequence[float],
    server_state: dict[str, Any] | None = None,
    opts: StrategyOptions | None = None,
    client_scalings: Sequence[float] | None = None,
    global_scaling: float | None = None,
) -> AggregateResult:
    """The new global adapter (and server state) from the clients' adapters; see the module doc.

    ``weights``: one per client, >= 0, summing to 1 (:func:`client_weights`). ``server_state``:
    ``{}`` (or None) at the first round, then the previous result's. ``client_scalings``: each
    client's ``alpha / r_k``; ``global_scaling``: the global adapter's.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; allowed: {', '.join(STRATEGIES)}")
    opts = StrategyOptions() if opts is None else opts
    server_state = {} if server_state is None else server_state
    mods = _check_inputs(global_state, client_states, weights)
    scales, g_scale = _scalings(client_scalings, global_scaling, len(client_states))
    info: dict[str, Any] = {
        "strategy": strategy,
        "global_scaling": g_scale,
        "client_ranks": [max(c[m + A_SUFFIX].shape[0] for m in mods) for c in client_states],
    }
    if strategy == "exact":
        state = _exact(global_state, client_states, weights, scales, g_scale, mods, opts, info)
        return AggregateResult(state, dict(server_state), info)
    if strategy == "frozen_a":
        state = _frozen_a(global_state, client_states, weights, scales, g_scale, mods, opts, info)
        return AggregateResult(state, dict(server_state), info)
    x, padded = _padded_clients(global_state, client_states, scales, g_scale, mods, info)
    if strategy == "fedavg":
        new_x, new_server_state = fedavg(padded, weights), dict(server_state)
    else:  # from differences: d is exactly 0 where the clients did not move
        delta = fedavg([{k: p[k] - x[k] for k in x} for p in padded], weights)
        new_x, new_server_state, step_info = server_step(strategy, x, delta, server_state, opts)
        info.update(step_info)
    state = {k: new_x[k].to(global_state[k].dtype) for k in global_state}
    return AggregateResult(state, new_server_state, info)


def server_step(
    strategy: str, x: State, delta: State, server_state: dict[str, Any], opts: StrategyOptions
) -> tuple[State, dict[str, Any], dict[str, Any]]:
    """One server-optimizer step on fp32 tensors: ``(new x, new server state, info)``.

    With ``d = delta = sum_k w_k (x_k - x)`` (the pseudo-gradient, ``fedavg(clients) - x``) and
    ``t`` the 1-based round (Reddi et al., 2021):

    - fedavgm: ``m = momentum * m + d``; ``x += eta * m``.
    - fedadam: ``m = b1 m + (1 - b1) d``; ``v = b2 v + (1 - b2) d^2``;
      ``x += eta * m / (sqrt(v) + tau)``.
    - fedyogi: as fedadam but ``v = v - (1 - b2) d^2 sign(v - d^2)``.
    - fedadagrad: as fedadam but ``v = v + d^2``.

    ``m_0 = 0``; ``v_0 = tau^2`` and no bias correction, as the paper, unless
    ``opts.bias_correction``: then ``v_0 = 0``, ``m / (1 - b1^t)`` for all three and
    ``v / (1 - b2^t)`` for fedadam and fedyogi (fedadagrad's v is a sum). With ``d = 0`` at the
    first step, x is returned unchanged.
    """
    if strategy not in SERVER_OPTIMIZERS:
        raise ValueError(f"{strategy!r} has no server optimizer; allowed: {SERVER_OPTIMIZERS}")
    v0 = 0.0 if opts.bias_correction else opts.tau**2
    m_prev, v_prev, step = _server_moments(strategy, x, server_state, v0)
    t = step + 1
    new_x, m_new, v_new = {}, {}, {}
    sq_norm = 0.0
    for k in x:
        d = delta[k]
        sq_norm += float(d.double().pow(2).sum())
        if strategy == "fedavgm":
            m_new[k] = opts.momentum * m_prev[k] + d
            new_x[k] = x[k] + opts.server_lr * m_new[k]
            continue
        m_new[k] = opts.beta1 * m_prev[k] + (1 - opts.beta1) * d
        d2 = d * d
        if strategy == "fedadagrad":
            v_new[k] = v_prev[k] + d2
        elif strategy == "fedadam":
            v_new[k] = opts.beta2 * v_prev[k] + (1 - opts.beta2) * d2
        else:
            v_new[k] = v_prev[k] - (1 - opts.beta2) * d2 * torch.sign(v_prev[k] - d2)
        m_hat, v_hat = m_new[k], v_new[k]
        if opts.bias_correction:
            m_hat = m_hat / (1 - opts.beta1**t)
            if strategy != "fedadagrad":
                v_hat = v_hat / (1 - opts.beta2**t)
        new_x[k] = x[k] + opts.server_lr * m_hat / (v_hat.sqrt() + opts.tau)
    new_state: dict[str, Any] = {"strategy": strategy, "step": t, "m": m_new}
    if strategy != "fedavgm":
        new_state["v"] = v_new
    info = {"step": t, "pseudo_gradient_norm": math.sqrt(sq_norm)}
    return new_x, new_state, info


def _server_moments(
    strategy: str, x: State, server_state: dict[str, Any], v0: float
) -> tuple[State, State, int]:
    """``(m, v, step)`` from ``server_state`` (fresh when empty), padded to ``x``'s ranks."""
    if not server_state:
        m = {k: torch.zeros_like(t) for k, t in x.items()}
        return m, {k: torch.full_like(t, v0) for k, t in x.items()}, 0
    if server_state.get("strategy") != strategy:
        raise ValueError(
            f"server_state belongs to {server_state.get('strategy')!r}, not {strategy!r}; "
            "start a new strategy from {}"
        )
    parts = {"m": 0.0} if strategy == "fedavgm" else {"m": 0.0, "v": v0}
    out: dict[str, State] = {"v": {}}
    for name, fill in parts.items():
        moments = server_state[name]
        if moments.keys() != x.keys():
            diff = sorted(set(moments) ^ set(x))[:5]
            raise ValueError(f"server_state[{name!r}] keys differ from the adapter's: {diff}")
        out[name] = {}
        for k, t in x.items():
            mom, dim = moments[k], rank_dim(k)
            if mom.shape[1 - dim] != t.shape[1 - dim] or mom.shape[dim] > t.shape[dim]:
                raise ValueError(
                    f"server_state[{name!r}][{k!r}] is {tuple(mom.shape)}, the adapter's "
                    f"{tuple(t.shape)}"
                )
            out[name][k] = pad_tensor(k, mom.float(), t.shape[dim], fill)
    return out["m"], out["v"], int(server_state["step"])


def _check_inputs(
    global_state: State, client_states: Sequence[State], weights: Sequence[float]
) -> list[str]:
    """Module names, after checking keys, in/out shapes and the weights."""
    if not client_states:
        raise ValueError("aggregate needs at least one client state")
    if len(client_states) != len(weights):
        raise ValueError(f"{len(client_states)} client states but {len(weights)} weights")
    w = [float(x) for x in weights]
    if any(not math.isfinite(x) or x < 0 for x in w) or abs(sum(w) - 1) > 1e-6:
        raise ValueError(f"weights must be finite, >= 0 and sum to 1 (client_weights), got {w}")
    mods = modules_of(global_state)
    if not mods:
        raise ValueError("the global adapter has no LoRA tensors")
    for i, c in enumerate(client_states):
        if c.keys() != global_state.keys():
            diff = sorted(set(c) ^ set(global_state))[:5]
            raise ValueError(f"client state {i} has different keys from the global adapter: {diff}")
        modules_of(c)
        for m in mods:
            a, b = c[m + A_SUFFIX], c[m + B_SUFFIX]
            ga, gb = global_state[m + A_SUFFIX], global_state[m + B_SUFFIX]
            if a.shape[1] != ga.shape[1] or b.shape[0] != gb.shape[0]:
                raise ValueError(
                    f"client state {i}, module {m!r}: A {tuple(a.shape)} / B {tuple(b.shape)} "
                    f"do not match the global (in={ga.shape[1]}, out={gb.shape[0]})"
                )
    return mods


def _scalings(
    client_scalings: Sequence[float] | None, global_scaling: float | None, n: int
) -> tuple[list[float], float]:
    """Each client's scaling and the global one; a missing side takes the other's, else 1."""
    if client_scalings is not None and len(client_scalings) != n:
        raise ValueError(f"{len(client_scalings)} client scalings for {n} clients")
    if client_scalings is None:
        scales = [1.0 if global_scaling is None else float(global_scaling)] * n
    else:
        scales = [float(s) for s in client_scalings]
    if global_scaling is None:
        if len(set(scales)) > 1:
            raise ValueError(f"client scalings differ ({scales}): pass global_scaling")
        global_scaling = scales[0]
    if not all(math.isfinite(s) and s > 0 for s in [*scales, global_scaling]):
        raise ValueError(f"scalings must be finite and > 0, got {scales} and {global_scaling}")
    return scales, float(global_scaling)


def _padded_clients(
    global_state: State,
    client_states: Sequence[State],
    scales: list[float],
    g_scale: float,
    mods: list[str],
    info: dict[str, Any],
) -> tuple[State, list[State]]:
    """fp32 global and clients (scalings folded), zero-padded per module to the largest rank."""
    x: State = {}
    padded: list[State] = [{} for _ in client_states]
    folds = [math.sqrt(s / g_scale) for s in scales]
    mixed, ranks = False, {}
    for m in mods:
        ranks_m = [c[m + A_SUFFIX].shape[0] for c in [global_state, *client_states]]
        r = ranks[m] = max(ranks_m)
        mixed = mixed or len(set(ranks_m)) > 1
        for k in (m + A_SUFFIX, m + B_SUFFIX):
            x[k] = pad_tensor(k, global_state[k].float(), r)
            for p, c, f in zip(padded, client_states, folds, strict=True):
                p[k] = pad_tensor(k, c[k].float() * f if f != 1 else c[k].float(), r)
    info["rank_method"] = "zero-padding" if mixed else "same-rank"
    info["rank"] = max(ranks.values())
    info["scaling_folded"] = any(f != 1 for f in folds)
    grew = [m for m in mods if ranks[m] > global_state[m + A_SUFFIX].shape[0]]
    if grew:
        info["rank_grew"] = grew
    return x, padded


def _exact(
    global_state: State,
    client_states: Sequence[State],
    weights: Sequence[float],
    scales: list[float],
    g_scale: float,
    mods: list[str],
    opts: StrategyOptions,
    info: dict[str, Any],
) -> State:
    """Truncated SVD of ``sum_k w_k s_k B_k A_k`` into the global rank (stacked factors)."""
    coefs = [float(w) * s for w, s in zip(weights, scales, strict=True)]
    used = [i for i, c in enumerate(coefs) if c > 0]
    out, energy = {}, {}
    disc_sum = total_sum = 0.0
    for m in mods:
        ga = global_state[m + A_SUFFIX]
        U, S, Vh = lowrank_svd(
            [client_states[i][m + B_SUFFIX] for i in used],
            [client_states[i][m + A_SUFFIX] for i in used],
            [coefs[i] for i in used],
        )
        A, B, disc, total = refactor(U, S, Vh, ga.shape[0], g_scale, opts.factor_split, ga)
        out[m + A_SUFFIX] = A.to(ga.dtype)
        out[m + B_SUFFIX] = B.to(global_state[m + B_SUFFIX].dtype)
        energy[m] = disc / total if total > 0 else 0.0
        disc_sum, total_sum = disc_sum + disc, total_sum + total
    info["rank_method"] = "stacked-factors-svd"
    info["rank"] = max(global_state[m + A_SUFFIX].shape[0] for m in mods)
    info["discarded_energy"] = energy
    info["discarded_energy_total"] = disc_sum / total_sum if total_sum > 0 else 0.0
    return out


def _frozen_a(
    global_state: State,
    client_states: Sequence[State],
    weights: Sequence[float],
    scales: list[float],
    g_scale: float,
    mods: list[str],
    opts: StrategyOptions,
    info: dict[str, Any],
) -> State:
    """FFA-LoRA: A stays the global's, ``B = sum_k w_k (s_k / s) B_k`` (exact: A is shared)."""
    out = {}
    for m in mods:
        ga, gb = global_state[m + A_SUFFIX], global_state[m + B_SUFFIX]
        for i, c in enumerate(client_states):
            a = c[m + A_SUFFIX]
            if a.shape != ga.shape:
                raise ValueError(
                    f"frozen_a: client {i}'s {m}.lora_A is {tuple(a.shape)}, the global's "
                    f"{tuple(ga.shape)}; FFA-LoRA needs one shared A (use exact for mixed ranks)"
                )
            gap = float((a.float() - ga.float()).abs().max())
            if not gap <= opts.frozen_a_atol:
                raise ValueError(
                    f"frozen_a: client {i}'s {m}.lora_A differs from the global A (max |diff| "
                    f"{gap:.3g} > {opts.frozen_a_atol:g}); FFA-LoRA clients must keep A frozen"
                )
        acc = torch.zeros_like(gb, dtype=torch.float32)
        for c, w, s in zip(client_states, weights, scales, strict=True):
            acc.add_(c[m + B_SUFFIX].float(), alpha=float(w) * s / g_scale)
        out[m + A_SUFFIX], out[m + B_SUFFIX] = ga.clone(), acc.to(gb.dtype)
    info["rank_method"] = "frozen-a"
    info["rank"] = max(global_state[m + A_SUFFIX].shape[0] for m in mods)
    return out
