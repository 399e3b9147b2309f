"""The t tests behind a study's verdicts: exact CDF and quantiles, Holm, TOST, calibrated by
simulation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cllora.report.effects import t975
from cllora.report.stats import betainc, holm, holm_levels, seed_test, t_cdf, t_ppf


@pytest.mark.parametrize("df", [1, 2, 3, 4, 5, 9, 19, 29])
def test_quantiles_match_the_t_table(df):
    assert t_ppf(0.975, df) == pytest.approx(t975(df), abs=1e-4)
    assert t_cdf(t975(df), df) == pytest.approx(0.975, abs=1e-5)
    assert t_cdf(0.0, df) == pytest.approx(0.5)
    assert t_ppf(0.025, df) == pytest.approx(-t_ppf(0.975, df))


def test_closed_forms():
    # df = 1 is the Cauchy distribution; df = 2 has F(t) = 1/2 + t / (2 sqrt(t^2 + 2))
    for t in (-3.0, -0.5, 0.7, 4.0):
        assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)
        assert t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(t * t + 2)), abs=1e-12)
    assert betainc(2.0, 3.0, 0.4) == pytest.approx(0.5248, abs=1e-12)  # 1 - sum of binomials


def test_holm_adjusts_step_down_and_keeps_the_input_order():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5]) == [0.5]
    assert holm_levels([0.01, 0.04, 0.03], 0.05) == pytest.approx([0.05 / 3, 0.05, 0.025])


def test_tost_needs_the_whole_interval_inside_the_margin():
    tight = seed_test([0.001, -0.002, 0.0005, 0.0003], margin=0.02)
    assert tight.p_equivalent < 0.001 and tight.p_two > 0.5
    wide = seed_test([0.03, -0.04, 0.02, -0.01], margin=0.02)
    assert wide.p_equivalent > 0.05  # not an effect, and not shown to be small either
    lo, hi = tight.interval(0.90)
    assert -0.02 < lo < hi < 0.02


def test_identical_effects_decide_by_their_sign():
    r = seed_test([0.01, 0.01, 0.01], margin=0.02)
    assert r.p_greater == 0.0 and r.p_equivalent == 0.0 and r.p_two == 0.0


def test_coverage_false_resolutions_and_equivalence_error_by_simulation():
    rng = np.random.default_rng(0)
    n_sims, seeds, sd = 3000, 4, 0.01
    covered = false_effect = false_equiv = 0
    for _ in range(n_sims):
        true = rng.normal(0.0, sd, seeds)  # no effect
        r = seed_test(true, margin=0.02)
        covered += r.lo <= 0.0 <= r.hi
        false_effect += r.p_two < 0.05
        at_margin = seed_test(0.02 + rng.normal(0.0, sd, seeds), margin=0.02)
        false_equiv += at_margin.p_equivalent < 0.05  # an effect AT the margin is not "none"
    assert 0.935 <= covered / n_sims <= 0.965
    assert false_effect / n_sims <= 0.065
    assert false_equiv / n_sims <= 0.065
