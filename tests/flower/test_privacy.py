"""The privacy accountant against values derived by hand: the RDP-to-DP conversion at one order,
the closed-form minimum of Mironov's looser conversion (an upper bound), and the exact privacy
profile of the Gaussian mechanism (Balle & Wang, 2018), which no valid epsilon may beat."""

from __future__ import annotations

import math

import pytest

from cllora.flower.privacy import ORDERS, epsilon_after, gaussian_rdp, privacy_info, rdp_to_dp

CASES = [(1.1, 10, 1e-5), (1.0, 1, 1e-5), (5.0, 100, 1e-6), (0.7, 50, 1e-5), (20.0, 3, 1e-5)]


def _gaussian_delta(eps: float, mu: float) -> float:
    """The exact delta(eps) of a Gaussian mechanism with sensitivity / std = mu."""

    def phi(x: float) -> float:
        return 0.5 * math.erfc(-x / math.sqrt(2))

    return phi(-eps / mu + mu / 2) - math.exp(eps) * phi(-eps / mu - mu / 2)


def _exact_epsilon(mu: float, delta: float) -> float:
    lo, hi = 0.0, 200.0
    for _ in range(200):  # delta(eps) decreases in eps: bisection
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _gaussian_delta(mid, mu) > delta else (lo, mid)
    return hi


def test_one_order_is_the_conversion_by_hand():
    # z = 1, one round, alpha = 2: RDP 2 / 2 = 1; eps = 1 + log(1/2) - (log delta + log 2) / 1
    eps, order = epsilon_after(1, 1.0, 1e-5, orders=[2.0])
    assert order == 2.0
    assert eps == pytest.approx(1 - 2 * math.log(2) + math.log(1e5), rel=1e-12)  # 11.12663...
    assert gaussian_rdp(2.0, 3, [2.0, 9.0]) == [3 * 2 / 8, 3 * 9 / 8]


@pytest.mark.parametrize(("z", "rounds", "delta"), CASES)
def test_epsilon_is_valid_and_within_the_closed_forms(z, rounds, delta):
    eps, order = epsilon_after(rounds, z, delta)
    rho = rounds / (2 * z * z)  # Mironov's conversion, minimised in closed form
    assert eps <= rho + 2 * math.sqrt(rho * math.log(1 / delta))
    mu = math.sqrt(rounds) / z  # `rounds` Gaussians compose to one of this mu exactly
    assert _gaussian_delta(eps, mu) <= delta  # valid: no better than the exact profile
    assert eps <= 1.2 * _exact_epsilon(mu, delta)  # and not far from it (here <= 1.11)
    assert ORDERS[0] < order < ORDERS[-1]  # the grid holds the minimum inside it


def test_epsilon_grows_with_rounds_and_shrinks_with_noise_and_delta():
    by_rounds = [epsilon_after(t, 1.0, 1e-5)[0] for t in (1, 2, 5, 10, 100)]
    by_noise = [epsilon_after(10, z, 1e-5)[0] for z in (0.5, 1.0, 2.0, 8.0)]
    by_delta = [epsilon_after(10, 1.0, d)[0] for d in (1e-8, 1e-5, 1e-2)]
    assert by_rounds == sorted(by_rounds) and len(set(by_rounds)) == len(by_rounds)
    assert by_noise == sorted(by_noise, reverse=True) and len(set(by_noise)) == len(by_noise)
    assert by_delta == sorted(by_delta, reverse=True) and len(set(by_delta)) == len(by_delta)


def test_edges_and_the_record():
    assert epsilon_after(0, 1.0, 1e-5)[0] == 0.0  # nothing released yet
    assert epsilon_after(3, 0.0, 1e-5)[0] == math.inf  # no noise: no guarantee
    with pytest.raises(ValueError, match="delta"):
        rdp_to_dp([1.0], [2.0], 0.0)
    info = privacy_info(4, 1.2, 1e-6)
    assert info["dp_epsilon"] == epsilon_after(4, 1.2, 1e-6)[0] and info["dp_delta"] == 1e-6
    assert "no sampling amplification" in info["dp_accountant"]
