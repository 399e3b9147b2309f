"""What each algorithm declares it can do (``Algorithm`` capabilities) decides where it runs:
the Flower apps, secure aggregation and central DP read the declarations, not lists of names.
These are the sets the apps were built and tested for; a new algorithm that declares the same
capabilities joins them without a change outside its own file."""

from __future__ import annotations

import pytest

from cllora.config import Config, ConfigError
from cllora.fed.algorithms import algorithm_class, algorithm_names

pytest.importorskip("flwr")

from cllora.flower.pool import FlowerSettings, check_flower_config

ON_FLOWER = {"fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "fedamsgrad",
             "exact", "hetlora", "frozen_a", "scaffold"}  # fmt: skip
MEAN = {"fedavg", "fedprox"}
SUMMED = ON_FLOWER - {"exact", "hetlora", "scaffold"}


def _declared(test) -> set[str]:
    return {n for n in algorithm_names() if test(algorithm_class(n))}


def test_declarations_give_the_tested_sets():
    assert _declared(lambda a: a.runs_on_flower()) == ON_FLOWER
    assert _declared(lambda a: a.mean_of_uplinks) == MEAN
    assert _declared(lambda a: a.sums_securely()) == SUMMED
    for name in ON_FLOWER - SUMMED:  # a refusal says why
        assert algorithm_class(name).reads_each_uplink or algorithm_class(name).uplink_extra
    for name in set(algorithm_names()) - ON_FLOWER:
        assert algorithm_class(name).flower_refusal()
    kept_on_nodes = {n for n in ON_FLOWER if algorithm_class(n).keeps_client_state}
    assert kept_on_nodes == {"scaffold"}  # its control variates stay on the SuperNodes


def _cfg(strategy: str) -> Config:
    cfg = Config()
    cfg.fed.strategy, cfg.fed.weighting = strategy, "uniform"
    return cfg


@pytest.mark.parametrize("name", algorithm_names())
def test_flower_secagg_and_dp_follow_the_declarations(name):
    algorithm = algorithm_class(name)
    cases = [
        (FlowerSettings(), algorithm.runs_on_flower()),
        (FlowerSettings(secagg=True), algorithm.sums_securely()),
        (FlowerSettings(dp_clipping_norm=1.0),
         algorithm.runs_on_flower() and algorithm.mean_of_uplinks),
    ]  # fmt: skip
    for settings, allowed in cases:
        if allowed:
            check_flower_config(_cfg(name), settings)
        else:
            with pytest.raises(ConfigError):
                check_flower_config(_cfg(name), settings)
