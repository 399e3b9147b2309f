"""The privacy accountant of cllora's central DP on Flower: epsilon at a delta after each round.

Usage::

    from cllora.flower.privacy import epsilon_after
    eps, order = epsilon_after(rounds=10, noise_multiplier=1.1, delta=1e-5)
    # the global adapters of those 10 rounds are (eps, 1e-5)-DP for every client together

**The mechanism** (:mod:`cllora.flower.pool`): each round the server adds Gaussian noise of
standard deviation ``z * C / n`` to the uniform mean of the ``n`` updates the nodes clipped to
L2 norm ``C``. That is noise ``z * C`` on their sum, and the sum moves by at most ``C`` when one
client's update is added or left out: a Gaussian mechanism of noise multiplier ``z``
(client-level DP, add/remove-one-client adjacency; ``n`` is public, it is in every round record).

**The accounting**: the Gaussian mechanism is ``(alpha, alpha / (2 z^2))``-Rényi DP for every
order ``alpha > 1`` (Mironov, 2017); ``T`` rounds compose to ``T alpha / (2 z^2)``; an
``(alpha, r)``-RDP mechanism is ``(r + log((alpha - 1) / alpha) - (log delta + log alpha) /
(alpha - 1), delta)``-DP (Balle et al., 2020, Theorem 21: the conversion Opacus and TF Privacy
use, tighter than Mironov's ``r + log(1 / delta) / (alpha - 1)``); epsilon is its minimum over
:data:`ORDERS`, a log-spaced grid of ``alpha - 1`` from 1e-3 to 1e4.

**Client sampling** (``fed.sample_fraction < 1``): no amplification by sampling is claimed,
so the epsilon reported is an upper bound. Every round is counted as if the client took part;
a round that did not pick it costs it nothing, and the picking does not depend on the data.
cllora picks a fixed number of clients without replacement, which the Poisson-sampling
accountants do not cover, and no maintained accountant of that sampling is a dependency.

What epsilon covers: the global adapters (and everything computed from them). It does not
cover what the nodes report in plain text besides their updates: training and evaluation
losses, sample and token counts, the ``query`` reply.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

#: the Rényi orders epsilon is minimised over: ``1 + 10^(k/40)``, ``alpha - 1`` in [1e-3, 1e4]
ORDERS: tuple[float, ...] = tuple(1.0 + 10 ** (k / 40) for k in range(-120, 161))
ACCOUNTANT = "rdp-gaussian, no sampling amplification"  # what the records name


def gaussian_rdp(noise_multiplier: float, rounds: int, orders: Sequence[float] = ORDERS) -> list:
    """Rényi DP of ``rounds`` compositions of the Gaussian mechanism, one value per order:
    ``rounds * alpha / (2 z^2)`` (infinite without noise)."""
    if noise_multiplier < 0 or rounds < 0:
        raise ValueError(f"need noise_multiplier >= 0 and rounds >= 0, got "
                         f"{noise_multiplier}, {rounds}")  # fmt: skip
    if rounds == 0:
        return [0.0 for _ in orders]
    if noise_multiplier == 0:
        return [math.inf for _ in orders]
    return [rounds * a / (2 * noise_multiplier**2) for a in orders]


def rdp_to_dp(rdp: Sequence[float], orders: Sequence[float], delta: float) -> tuple[float, float]:
    """The smallest epsilon over the orders for which ``rdp`` gives ``(epsilon, delta)``-DP
    (Balle et al., 2020, Theorem 21), and the order that gives it."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if len(rdp) != len(orders) or not orders:
        raise ValueError(f"need one RDP value per order, got {len(rdp)} and {len(orders)}")
    best = (math.inf, orders[0])
    for r, a in zip(rdp, orders, strict=True):
        if a <= 1:
            raise ValueError(f"Rényi orders must be > 1, got {a}")
        eps = r + math.log1p(-1 / a) - (math.log(delta) + math.log(a)) / (a - 1)
        if eps < best[0]:
            best = (eps, a)
    return max(best[0], 0.0), best[1]


def epsilon_after(
    rounds: int, noise_multiplier: float, delta: float, orders: Sequence[float] = ORDERS
) -> tuple[float, float]:
    """``(epsilon, order)``: the global adapters of ``rounds`` noised rounds are
    ``(epsilon, delta)``-DP (see the module doc); epsilon is infinite without noise, and 0
    (order NaN) after no round."""
    rdp = gaussian_rdp(noise_multiplier, rounds, orders)
    if rounds == 0:
        rdp_to_dp(rdp, orders, delta)  # the checks of delta and the orders
        return 0.0, math.nan
    return rdp_to_dp(rdp, orders, delta)


def privacy_info(rounds: int, noise_multiplier: float, delta: float) -> dict[str, float | str]:
    """What a round record and ``flower.json`` hold: delta, epsilon after ``rounds`` rounds,
    the Rényi order that gives it, and the accountant's name."""
    eps, order = epsilon_after(rounds, noise_multiplier, delta)
    return {"dp_delta": delta, "dp_epsilon": eps, "dp_rdp_order": order,
            "dp_accountant": ACCOUNTANT}  # fmt: skip
