"""Student t tests over per-seed effects: p-values, intervals, Holm, two one-sided tests.

Usage (runnable as is)::

    from cllora.report.stats import holm, seed_test, t_cdf, t_ppf

    t_ppf(0.975, 3)                     # 3.1824...: the quantile behind a 95% interval, 4 seeds
    r = seed_test([0.031, 0.024, 0.040, 0.029], margin=0.02)
    r.mean, r.lo, r.hi                  # 0.031, [0.0208, 0.0412]: the 95% t interval
    r.p_two, r.p_greater, r.p_less      # the three t-tests of "the effect is 0"
    r.p_equivalent                      # TOST: "the effect is inside +-margin" (here: no)
    r.interval(0.99)                    # any level
    holm([0.01, 0.04, 0.03])            # Holm-adjusted p-values, in the input order

Every test treats the per-seed effects as independent draws (a seed redraws every random choice
of a cell; cllora/report/effects.py explains why the seed is the unit). With S seeds the t
statistic has S - 1 degrees of freedom. The CDF is exact (the regularised incomplete beta
function, evaluated by its continued fraction) and the quantile its bisection inverse, so no
table and no SciPy are needed; ``tests/report/test_stats.py`` checks both against the table in
:mod:`cllora.report.effects` and against simulation.

Equivalence (TOST): the effect lies inside ``[-margin, +margin]`` when both one-sided tests
reject, ``H0: effect <= -margin`` and ``H0: effect >= +margin``; its p-value is the larger of the
two, and at level alpha it agrees with the ``1 - 2 alpha`` interval lying inside the margin.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


def _beta_cf(a: float, b: float, x: float) -> float:
    """The continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    out = d
    for m in range(1, 500):
        for num in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            out *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return out


def betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function ``I_x(a, b)``."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    front = math.exp(log_front)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_cf(a, b, x) / a
    return 1.0 - front * _beta_cf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: int) -> float:
    """``P(T <= t)`` for Student's t with ``df`` degrees of freedom."""
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_ppf(q: float, df: int) -> float:
    """The ``q`` quantile of Student's t with ``df`` degrees of freedom (bisection on the CDF)."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"quantile level {q} is outside (0, 1)")
    lo, hi = -1.0, 1.0
    while t_cdf(lo, df) > q:
        lo *= 2.0
    while t_cdf(hi, df) < q:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < q:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, abs(mid)):
            break
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class SeedTest:
    """The t tests of one effect measured once per seed (see :func:`seed_test`)."""

    effects: tuple[float, ...]
    margin: float
    mean: float
    se: float  # standard error of the mean; NaN with one seed
    lo: float  # the 95% interval
    hi: float
    p_two: float  # H0: effect = 0, two-sided
    p_greater: float  # H0: effect <= 0
    p_less: float  # H0: effect >= 0
    p_equivalent: float  # TOST: H0: |effect| >= margin

    @property
    def n(self) -> int:
        return len(self.effects)

    def interval(self, level: float, sides: str = "two") -> tuple[float, float]:
        """The t interval at ``level`` (two-sided; ``"greater"``: ``[lo, inf)``, ``"less"``:
        ``(-inf, hi]``)."""
        if self.n < 2 or not math.isfinite(self.se):
            return (math.nan, math.nan)
        df = self.n - 1
        if sides == "two":
            half = t_ppf(0.5 + level / 2.0, df) * self.se
            return (self.mean - half, self.mean + half)
        half = t_ppf(level, df) * self.se
        return (self.mean - half, math.inf) if sides == "greater" else (-math.inf, self.mean + half)


def seed_test(effects: Sequence[float], margin: float = 0.0) -> SeedTest:
    """Mean, 95% t interval and the t tests (zero, one-sided, TOST at ``margin``) of
    per-seed effects. With fewer than 2 seeds everything but the mean is NaN."""
    xs = tuple(float(e) for e in effects)
    n = len(xs)
    mean = sum(xs) / n if n else math.nan
    nan = math.nan
    if n < 2:
        return SeedTest(xs, margin, mean, nan, nan, nan, nan, nan, nan, nan)
    var = sum((x - mean) ** 2 for x in xs) / (n - 1)
    se = math.sqrt(var / n)
    df = n - 1
    if se == 0.0:  # identical effects: every test decides by the sign alone
        inf = math.copysign(math.inf, mean) if mean else 0.0
        t0 = inf
        t_low = math.inf if mean + margin > 0 else -math.inf
        t_high = -math.inf if mean - margin < 0 else math.inf
    else:
        t0 = mean / se
        t_low, t_high = (mean + margin) / se, (mean - margin) / se
    p_greater = 1.0 - t_cdf(t0, df)
    p_less = t_cdf(t0, df)
    p_two = min(1.0, 2.0 * min(p_greater, p_less)) if t0 != 0 else 1.0
    p_equivalent = max(1.0 - t_cdf(t_low, df), t_cdf(t_high, df)) if margin > 0 else 1.0
    half = t_ppf(0.975, df) * se
    return SeedTest(xs, margin, mean, se, mean - half, mean + half, p_two, p_greater, p_less,
                    p_equivalent)  # fmt: skip


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (input order): reject ``i`` at level alpha when its
    adjusted p-value is below alpha; the family-wise error rate is at most alpha."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [1.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def holm_levels(p_values: Sequence[float], alpha: float) -> list[float]:
    """The level at which Holm tests each hypothesis (input order): ``alpha / (m - rank)`` for
    the hypothesis of that rank among the sorted p-values. An interval at ``1 - level`` excludes
    the null exactly when its unadjusted test rejects at that step."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    levels = [alpha] * m
    for rank, i in enumerate(order):
        levels[i] = alpha / (m - rank)
    return levels
