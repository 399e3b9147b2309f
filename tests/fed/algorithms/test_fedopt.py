"""The server optimizers (the FedOpt family): each rule against a hand computation, bias
correction, the padded moments when ranks grow, today's checkpoint layout and a bit-exact
restore, refused state, and the identities (no move at d = 0, FedAvgM(1, 0) = FedAvg)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from cllora.config import Config
from cllora.fed.algorithms import algorithm_class, algorithm_names
from cllora.fed.algorithms._fedopt import AdaptiveFedOpt, FedOpt
from cllora.fed.strategy import client_weights, fedavg

OPTIMIZERS = [n for n in algorithm_names() if issubclass(algorithm_class(n), FedOpt)]
ADAPTIVE = [n for n in OPTIMIZERS if issubclass(algorithm_class(n), AdaptiveFedOpt)]  # bias corr.
SHAPES = {"layers.0.q_proj": (37, 23), "layers.0.v_proj": (11, 23)}  # module: (out, in)
HAND = {"m": (4, 3)}  # small tensors: A (2, 3), B (4, 2)
SETTINGS = {"server_lr": 0.3, "server_momentum": 0.7, "beta1": 0.8, "beta2": 0.95, "tau": 0.05}


def _optimizer(name: str, bias_correction: bool = False, **settings) -> FedOpt:
    cfg = Config()
    for key, value in settings.items():
        setattr(cfg.fed, key, value)
    opt = algorithm_class(name)(cfg)
    opt.bias_correction = bias_correction
    return opt


def _adapter(seed: int, r: int, shapes=None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for m, (out, n_in) in (shapes or SHAPES).items():
        state[f"{m}.lora_A"] = torch.randn(r, n_in, generator=g)
        state[f"{m}.lora_B"] = torch.randn(out, r, generator=g)
    return state


def _clone(state):
    return {k: v.clone() for k, v in state.items()}


def _assert_states_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_the_family_is_found_from_the_classes():
    assert {"fedavgm", "fedadam", "fedyogi", "fedadagrad", "fedamsgrad"} <= set(OPTIMIZERS)
    assert "fedavg" not in OPTIMIZERS and "exact" not in OPTIMIZERS


# --- the rules, by hand ------------------------------------------------------------------------


def _hand_step(name, x, avg, moments, t, o, bias_correction):
    """Reddi et al. (2021) and AMSGrad (Reddi, Kale and Kumar, 2018), element by element on
    flat lists of floats; ``moments``: lists m, v, v_hat."""
    new_x, out = [], ([], [], [])
    b1, b2, tau = o["beta1"], o["beta2"], o["tau"]
    for xi, ai, mi, vi, hi in zip(x, avg, *moments, strict=True):
        d = ai - xi
        if name == "fedavgm":
            mi = o["server_momentum"] * mi + d
            new_x.append(xi + o["server_lr"] * mi)
        else:
            mi = b1 * mi + (1 - b1) * d
            if name == "fedadagrad":
                vi = vi + d * d
            elif name in ("fedadam", "fedamsgrad"):
                vi = b2 * vi + (1 - b2) * d * d
            else:  # fedyogi
                diff = vi - d * d
                vi = vi - (1 - b2) * d * d * (diff > 0) + (1 - b2) * d * d * (diff < 0)
            hi = max(hi, vi)
            mh, vh = mi, hi if name == "fedamsgrad" else vi
            if bias_correction:
                mh = mi / (1 - b1**t)
                vh = vh if name == "fedadagrad" else vh / (1 - b2**t)
            new_x.append(xi + o["server_lr"] * mh / (math.sqrt(vh) + tau))
        for lst, value in zip(out, (mi, vi, hi), strict=True):
            lst.append(value)
    return new_x, out


@pytest.mark.parametrize(
    ("name", "bias_correction"),
    [(n, False) for n in OPTIMIZERS] + [(n, True) for n in OPTIMIZERS if n in ADAPTIVE],
)
def test_server_optimizers_match_hand_computation_over_three_rounds(name, bias_correction):
    opt = _optimizer(name, bias_correction, **SETTINGS)
    glob = _adapter(20, 2, HAND)
    v0 = 0.0 if bias_correction else SETTINGS["tau"] ** 2
    hand = {
        k: (t.flatten().tolist(), ([0.0] * t.numel(), [v0] * t.numel(), [v0] * t.numel()))
        for k, t in glob.items()
    }
    # round 3 repeats round 1's clients: the pseudo-gradient shrinks, so AMSGrad's max holds
    for t, seeds in enumerate([(21, 22), (23, 24), (21, 22)], 1):
        clients = [_adapter(s, 2, HAND) for s in seeds]
        w = [0.4, 0.6]
        res = opt.optimize(glob, clients, w)
        for k, (x, moments) in hand.items():
            c0, c1 = (c[k].flatten().tolist() for c in clients)
            avg = [w[0] * a + w[1] * b for a, b in zip(c0, c1, strict=True)]
            hand[k] = _hand_step(name, x, avg, moments, t, SETTINGS, bias_correction)
            got = res.state[k].flatten().tolist()
            assert got == pytest.approx(hand[k][0], rel=1e-5, abs=1e-6), (t, k)
            for i, moment in enumerate(opt.moment_names):
                want = hand[k][1][{"m": 0, "v": 1, "v_hat": 2}[moment]]
                got = opt.moments[moment][k].flatten().tolist()
                assert got == pytest.approx(want, rel=1e-5, abs=1e-7), (t, k, i)
        assert res.server_state["step"] == t and res.info["step"] == t == opt.step
        glob = res.state


def test_fedamsgrad_normalises_by_the_largest_second_moment():
    """A big pseudo-gradient then small ones: Adam's v decays, AMSGrad's v_hat keeps the
    maximum, so AMSGrad's later steps are smaller than Adam's (and v_hat >= v always)."""
    glob = {"m.lora_A": torch.zeros(1, 1), "m.lora_B": torch.zeros(1, 1)}
    adam, ams = _optimizer("fedadam", **SETTINGS), _optimizer("fedamsgrad", **SETTINGS)
    xs = {"fedadam": glob, "fedamsgrad": glob}
    for d in (10.0, 0.1, 0.1, 0.1):
        for opt in (adam, ams):
            x = xs[opt.name]
            client = {k: t + d for k, t in x.items()}
            xs[opt.name] = opt.optimize(x, [client], [1.0]).state
    v, v_hat = ams.moments["v"]["m.lora_A"], ams.moments["v_hat"]["m.lora_A"]
    assert float(v_hat) > float(v) and float(v_hat) == pytest.approx(0.05 * 100 + 0.95 * 0.05**2)
    assert torch.equal(ams.moments["v"]["m.lora_A"], adam.moments["v"]["m.lora_A"])
    step_adam = float(adam.lr * adam.moments["m"]["m.lora_A"] / (v.sqrt() + adam.tau))
    step_ams = float(ams.lr * ams.moments["m"]["m.lora_A"] / (v_hat.sqrt() + ams.tau))
    assert 0 < step_ams < step_adam


def test_fedavgm_without_momentum_at_unit_lr_is_fedavg():
    clients = [_adapter(25, 3), _adapter(26, 3)]
    opt = _optimizer("fedavgm", server_lr=1.0, server_momentum=0.0)
    res = opt.optimize(_adapter(27, 3), clients, [0.2, 0.8])
    want = fedavg(clients, [0.2, 0.8])
    for k in want:
        torch.testing.assert_close(res.state[k], want[k], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_clients_equal_to_global_leave_it_bitwise_unchanged(name):
    g = _adapter(0, 5)
    w = client_weights([5, 1, 9], "samples")
    res = _optimizer(name).optimize(g, [_clone(g), _clone(g), g], w)
    _assert_states_equal(res.state, g)  # d = sum_k w_k (x_k - x) = 0 exactly
    assert res.info["pseudo_gradient_norm"] == 0.0


# --- state: layout, restore, grown ranks, refusals --------------------------------------------


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_state_has_todays_checkpoint_layout_and_resumes_bit_exactly(name):
    g, rounds = _adapter(30, 3), [[_adapter(s, 3), _adapter(s + 1, 3)] for s in (31, 33, 35)]
    w = [0.3, 0.7]
    opt = _optimizer(name, server_lr=0.1)
    assert opt.state_dict() == {}  # nothing before the first step
    straight = g
    for clients in rounds:
        straight = opt.optimize(straight, clients, w).state
    first = _optimizer(name, server_lr=0.1)
    x = first.optimize(first.optimize(g, rounds[0], w).state, rounds[1], w).state
    state = copy.deepcopy(first.state_dict())
    server = state["server"]
    want = ["strategy", "step", "m"] if name == "fedavgm" else ["strategy", "step", "m", "v"]
    assert list(server) == want + (["v_hat"] if name == "fedamsgrad" else [])
    assert server["strategy"] == name and server["step"] == 2
    assert all(server[n].keys() == g.keys() for n in list(server)[2:])
    resumed = _optimizer(name, server_lr=0.1)
    resumed.load_state_dict(state)
    _assert_states_equal(resumed.optimize(x, rounds[2], w).state, straight)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_moments_are_padded_when_ranks_grow(name):
    """A restored rank-2 state meets a rank-4 client: the moments grow with the adapter, the
    new rows starting from m_0 = 0 and v_0 = tau^2 (the old rows continue their moments)."""
    g, big = _adapter(43, 2), _adapter(45, 4)
    opt = _optimizer(name, server_lr=0.01)
    first = opt.optimize(g, [_adapter(44, 2)], [1.0])
    restored = _optimizer(name, server_lr=0.01)
    restored.load_state_dict(opt.state_dict())
    res = restored.optimize(first.state, [big], [1.0])
    assert res.info["rank"] == 4 and res.info["rank_grew"] == sorted(SHAPES)
    b1, tau2 = restored.beta1, restored.tau**2
    for m, (out, n_in) in SHAPES.items():
        a = f"{m}.lora_A"
        assert res.state[a].shape == (4, n_in)
        for moment in restored.moment_names:
            assert res.server_state[moment][f"{m}.lora_B"].shape == (out, 4)
            assert res.server_state[moment][a].shape == (4, n_in)
        d = big[a][2:]  # the padded global rows are 0, so d is the client's rows
        m_new = d if name == "fedavgm" else (1 - b1) * d
        torch.testing.assert_close(res.server_state["m"][a][2:], m_new)
        if name == "fedadagrad":
            torch.testing.assert_close(res.server_state["v"][a][2:], tau2 + d * d)
        if name in ("fedadam", "fedamsgrad"):
            b2 = restored.beta2
            torch.testing.assert_close(res.server_state["v"][a][2:], b2 * tau2 + (1 - b2) * d * d)


def test_state_of_another_optimizer_is_refused():
    g, c = _adapter(28, 3), [_adapter(29, 3)]
    adam = _optimizer("fedadam")
    adam.optimize(g, c, [1.0])
    with pytest.raises(ValueError, match="belongs to 'fedadam'"):
        _optimizer("fedyogi").load_state_dict(adam.state_dict())
    without_v = {k: v for k, v in adam.state_dict()["server"].items() if k != "v"}
    with pytest.raises(ValueError, match=r"lacks the moments \['v'\]"):
        _optimizer("fedadam").load_state_dict({"server": without_v})
    other = _optimizer("fedadam")
    other.load_state_dict(adam.state_dict())
    with pytest.raises(ValueError, match="keys differ"):
        x = {"x.lora_A": torch.zeros(3, 2), "x.lora_B": torch.zeros(2, 3)}
        other.optimize(x, [{k: t + 1 for k, t in x.items()}], [1.0])
    fresh = _optimizer("fedadam")
    fresh.load_state_dict({})  # a fresh start
    assert fresh.step == 0 and fresh.moments == {}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_result_dtype_and_inputs_untouched(name):
    g = {k: v.to(torch.bfloat16) for k, v in _adapter(60, 3).items()}
    clients = [{k: (v + 0.01) if k.endswith("B") else v for k, v in g.items()}, _adapter(72, 2)]
    clients[1] = {k: v.to(torch.bfloat16) for k, v in clients[1].items()}
    opt = _optimizer(name, server_lr=0.01)
    first = opt.optimize(g, clients, [0.5, 0.5])
    frozen = copy.deepcopy((g, clients, first.server_state))
    second = opt.optimize(first.state, clients, [0.5, 0.5])
    assert {t.dtype for t in second.state.values()} == {torch.bfloat16}
    _assert_states_equal(g, frozen[0])
    for c, c0 in zip(clients, frozen[1], strict=True):
        _assert_states_equal(c, c0)
    assert second.server_state is not first.server_state
    for moment in opt.moment_names:
        _assert_states_equal(first.server_state[moment], frozen[2][moment])
