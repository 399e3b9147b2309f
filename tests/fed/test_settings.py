"""Each algorithm declares its own settings (``Algorithm.settings``: the ``fed.*`` keys it reads).
The declarations are checked against what the algorithms do: changing a declared key changes the
algorithm's result, changing any other algorithm's key does not; a run told to use a setting its
algorithm does not read hears so (``ignored_settings``)."""

from __future__ import annotations

import pytest
import torch

from cllora.config import Config
from cllora.fed.algorithms import algorithm_class, algorithm_names, ignored_settings
from cllora.fed.algorithms._fedopt import FedOpt
from cllora.fed.algorithms.base import ClientResult, Downlink, Uplink

SETTINGS = sorted({key for n in algorithm_names() for key in algorithm_class(n).settings})
CHANGED = {"prox_mu": 0.3, "server_lr": 0.5, "server_momentum": 0.5, "beta1": 0.5,
           "beta2": 0.5, "tau": 0.05}  # fmt: skip
OPTIMIZERS = [n for n in algorithm_names() if issubclass(algorithm_class(n), FedOpt)]


def _cfg(strategy: str, **fed) -> Config:
    cfg = Config()
    cfg.fed.strategy = strategy
    for key, value in fed.items():
        setattr(cfg.fed, key, value)
    return cfg


def _adapter(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"m.lora_A": torch.randn(2, 5, generator=g), "m.lora_B": torch.randn(4, 2, generator=g)}


def test_every_changed_key_has_a_value_and_every_declared_key_is_a_fed_key():
    assert set(CHANGED) == set(SETTINGS)
    for key in SETTINGS:
        assert hasattr(Config().fed, key), key


@pytest.mark.parametrize("name", algorithm_names())
def test_defaults_are_never_reported_as_ignored(name):
    assert ignored_settings(_cfg(name)) == []


def test_another_algorithms_setting_is_reported_and_an_own_one_is_not():
    assert ignored_settings(_cfg("fedavg", prox_mu=0.3)) == ["fed.prox_mu=0.3"]
    assert ignored_settings(_cfg("fedprox", prox_mu=0.3)) == []
    assert ignored_settings(_cfg("fedadagrad", beta2=0.5, server_lr=0.5)) == ["fed.beta2=0.5"]


def _two_server_steps(name: str, **fed) -> dict[str, torch.Tensor]:
    algo = algorithm_class(name)(_cfg(name, **fed))
    x = _adapter(0)
    for step in (1, 2):
        ups = [ClientResult(i, Uplink(_adapter(10 * step + i)), 0.5) for i in (0, 1)]
        x = algo.aggregate(x, ups).state
    return x


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_server_optimizer_reads_exactly_its_declared_settings(name):
    base = _two_server_steps(name)
    for key in SETTINGS:
        moved = _two_server_steps(name, **{key: CHANGED[key]})
        differs = any(not torch.equal(moved[k], base[k]) for k in base)
        assert differs == (key in algorithm_class(name).settings), (name, key)


def test_fedprox_reads_prox_mu_into_its_rule_and_scaffold_reads_server_lr():
    down = Downlink(_adapter(0))
    assert [r.mu for r in algorithm_class("fedprox")(_cfg("fedprox", prox_mu=0.3))
            .local_rules(0, down)] == [0.3]  # fmt: skip

    def scaffold_step(**fed) -> dict[str, torch.Tensor]:
        algo = algorithm_class("scaffold")(_cfg("scaffold", **fed))
        zero = {k: torch.zeros_like(t) for k, t in down.adapter.items()}
        ups = [ClientResult(i, Uplink(_adapter(i + 1), {"delta_c": zero}), 0.5) for i in (0, 1)]
        return algo.aggregate(down.adapter, ups).state

    base = scaffold_step()
    for key in SETTINGS:
        moved = scaffold_step(**{key: CHANGED[key]})
        differs = any(not torch.equal(moved[k], base[k]) for k in base)
        assert differs == (key in algorithm_class("scaffold").settings), key


def test_a_run_with_another_algorithms_setting_says_so_once_in_its_log(tmp_path):
    from cllora.config import load_config
    from cllora.fed.runner import run_experiment
    from tests.conftest import tiny_run_overrides

    overrides = tiny_run_overrides(tmp_path, fed__rounds=1, fed__prox_mu=0.3, train__threads=1)
    result = run_experiment(load_config(None, [*overrides, "run_name=r"]))
    log = (result.run_dir / "run.log").read_text()
    line = "fed.prox_mu=0.3: fed.strategy=fedavg does not read it (another algorithm's setting)"
    assert log.count(line) == 1, log
