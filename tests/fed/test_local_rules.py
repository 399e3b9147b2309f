"""Local rules through the real ``client_update`` on the tiny Llama: frozen factors stay
bitwise, the proximal term is ``mu/2 ||theta - theta_start||^2`` and pulls towards the start,
SCAFFOLD's correction is a step of its own after AdamW's, and bad rules fail clearly."""

from __future__ import annotations

import pytest
import torch

from cllora.config import load_config
from cllora.fed.algorithms.fedprox import ProximalTerm
from cllora.fed.algorithms.frozen_a import FreezeA
from cllora.fed.algorithms.scaffold import StepCorrection
from cllora.fed.client import client_update
from cllora.fed.local_rule import LocalRule
from cllora.fed.server import prepare
from cllora.model.lora import lora_state_dict
from tests.conftest import tiny_run_overrides


class FreezeB(LocalRule):
    """Only A trains (no algorithm uses it: it shows a rule written outside the package)."""

    def trains(self, name: str) -> bool:
        return not name.endswith("lora_B")


class Nothing(LocalRule):
    def trains(self, name: str) -> bool:
        return False


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cfg = load_config(None, tiny_run_overrides(tmp_path_factory.mktemp("rules")))
    model, tokenizer, clients = prepare(cfg)
    start = {k: t.clone() for k, t in lora_state_dict(model).items()}
    start = {k: t + 0.01 if k.endswith("lora_B") else t for k, t in start.items()}  # B != 0

    def train(rules=(), steps=3):
        u = client_update(model, start, clients[0].train, cfg.train, tokenizer.pad_token_id,
                          seed=5, rules=rules, steps=steps)  # fmt: skip
        return u.state

    return cfg, start, train


def _moved(a, b, suffix):
    return [k for k in a if k.endswith(suffix) and not torch.equal(a[k], b[k])]


def test_frozen_factors_stay_bitwise(tiny):
    _, start, train = tiny
    only_b = train([FreezeA()])
    assert _moved(only_b, start, "lora_A") == [] and _moved(only_b, start, "lora_B")
    only_a = train([FreezeB()])
    assert _moved(only_a, start, "lora_B") == [] and _moved(only_a, start, "lora_A")
    with pytest.raises(ValueError, match="leave nothing to train"):
        train([Nothing()])


def test_proximal_term_is_the_half_mu_squared_distance():
    rule = ProximalTerm(0.5)
    p = torch.tensor([1.0, 2.0], requires_grad=True)
    rule.start(["m.lora_A"], [p])
    with torch.no_grad():
        p.add_(torch.tensor([0.5, -1.0]))
    assert float(rule.penalty([p]).detach()) == pytest.approx(0.25 * (0.25 + 1.0))
    zero = ProximalTerm(0.0)
    zero.start(["m.lora_A"], [p])
    assert zero.penalty([p]) is None  # mu = 0 is FedAvg's training exactly
    with pytest.raises(ValueError, match="mu must be >= 0"):
        ProximalTerm(-1.0)


def test_proximal_term_pulls_towards_the_start(tiny):
    _, start, train = tiny
    plain, prox0, prox = train(), train([ProximalTerm(0.0)]), train([ProximalTerm(1e4)])
    assert all(torch.equal(plain[k], prox0[k]) for k in plain)

    def dist(s):
        return sum(float((s[k].float() - start[k].float()).pow(2).sum()) for k in s)

    assert dist(prox) < dist(plain)


def test_step_correction_is_a_step_after_adamw(tiny):
    """One step: the corrected client is AdamW's step then ``- lr * c``, bitwise."""
    cfg, start, train = tiny
    g = torch.Generator().manual_seed(0)
    c = {k: torch.randn(t.shape, generator=g) for k, t in start.items()}
    plain, corrected = train(steps=1), train([StepCorrection(c)], steps=1)
    for k in plain:
        want = plain[k].add(c[k].to(plain[k].dtype), alpha=-cfg.train.lr)
        assert torch.equal(corrected[k], want), k
    with pytest.raises(ValueError, match="step correction lacks"):
        train([StepCorrection({k: t for k, t in c.items() if k.endswith("lora_A")})])
