"""``flora``: the stacked client factors merged into the base every round, LoRA restarted; the
global model is the exact weighted average of the client models; bytes, resume and export."""

from __future__ import annotations

import math

import pytest
import torch

from cllora.config import ConfigError
from cllora.fed.algorithms import algorithm_class, make_algorithm
from cllora.fed.algorithms._merge import catch_up_nbytes, export_state, module_shapes
from cllora.fed.algorithms.flora import FLoRA, flora_stack, fresh_adapter, round_seed
from cllora.fed.runner import run_experiment
from cllora.model.lora import lora_modules, lora_state_dict
from tests.fed.algorithms.test_fedex import (
    ALPHA,
    assert_close,
    assert_export_reproduces,
    check_export_reproduces_the_global_model,
    check_resume_bit_exact,
    client_round,
    effective,
    expected_bytes,
    rounds_of,
    small_cfg,
    small_model,
)


def test_stack_is_the_dense_hand_computation():
    g = torch.Generator().manual_seed(0)
    c1 = {"m.lora_A": torch.randn(2, 6, generator=g), "m.lora_B": torch.randn(5, 2, generator=g)}
    c2 = {"m.lora_A": torch.randn(3, 6, generator=g), "m.lora_B": torch.randn(5, 3, generator=g)}
    B, A = flora_stack([c1, c2], [0.25, 0.75], 6.0, "m")
    assert B.shape == (5, 5) and A.shape == (5, 6)
    assert torch.equal(A, torch.cat([c1["m.lora_A"], c2["m.lora_A"]]))
    dense = (
        0.25 * 3.0 * c1["m.lora_B"] @ c1["m.lora_A"] + 0.75 * 2.0 * c2["m.lora_B"] @ c2["m.lora_A"]
    )
    torch.testing.assert_close(B @ A, dense, atol=1e-5, rtol=1e-5)


def test_the_fresh_lora_is_seeded_per_round_and_initialised_as_lora():
    template = {"m.lora_A": torch.zeros(4, 100), "m.lora_B": torch.ones(7, 4)}
    a, b = fresh_adapter(template, 3), fresh_adapter(template, 3)
    assert torch.equal(a["m.lora_A"], b["m.lora_A"]) and not a["m.lora_B"].any()
    assert not torch.equal(a["m.lora_A"], fresh_adapter(template, 4)["m.lora_A"])
    assert float(a["m.lora_A"].abs().max()) <= 1 / math.sqrt(100)  # Kaiming-uniform, a=sqrt(5)
    assert round_seed(0, 1) != round_seed(0, 2) != round_seed(1, 1)


def test_global_model_is_the_weighted_average_and_lora_restarts(tmp_path):
    algo = make_algorithm(small_cfg(tmp_path, "flora"))
    assert isinstance(algo, FLoRA)
    model = small_model()
    state = lora_state_dict(model)
    for rnd, (clients, weights) in enumerate([([0, 1, 2], [0.2, 0.5, 0.3]), ([1, 3], [0.6, 0.4])]):
        down = algo.downlink(0, state).adapter  # rank 2: the first rows of A, B = 0
        assert torch.equal(down["0.lora_A"], state["0.lora_A"][:2]) and not down["0.lora_B"].any()
        agg, mean = client_round(algo, model, state, clients, weights, seed=10 * rnd)
        assert_close(effective(model), mean)  # exact to fp32 precision
        assert agg.info["merged_rank"] == sum(2 if i % 2 == 0 else 4 for i in clients)
        assert all(not agg.state[k].any() for k in agg.state if k.endswith("lora_B"))
        assert not torch.equal(agg.state["0.lora_A"], state["0.lora_A"])  # a fresh A
        state = agg.state
    folded = {n: m.base.weight.clone() for n, m in lora_modules(model).items()}
    fresh, again = small_model(), algorithm_class("flora")(algo.cfg)
    again.load_state_dict(algo.state_dict(), fresh)
    again.apply_global(fresh, state)
    for n, m in lora_modules(fresh).items():
        assert torch.equal(m.base.weight, folded[n])
    export, rank = export_state(state, algo.state["delta"], ALPHA)
    assert_export_reproduces(export, rank, model)


def test_a_client_receives_the_stacks_it_missed(tmp_path):
    algo = make_algorithm(small_cfg(tmp_path, "flora"))
    model = small_model()
    state = lora_state_dict(model)
    shapes = module_shapes(state)
    adapter = {r: sum(r * (o + i) * 4 for o, i in shapes.values()) for r in (2, 4)}
    agg, _ = client_round(algo, model, state, [0, 1], [0.5, 0.5], seed=0)
    agg, _ = client_round(algo, model, agg.state, [1], [1.0], seed=5)
    assert algo.downlink(0, agg.state).nbytes() == adapter[2] + catch_up_nbytes(shapes, [6, 4])
    assert algo.downlink(1, agg.state).nbytes() == adapter[4] + catch_up_nbytes(shapes, [4])
    assert algo.downlink(3, agg.state).nbytes() == adapter[4] + catch_up_nbytes(shapes, [6, 4])


def test_a_4bit_base_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="4-bit"):
        algorithm_class("flora").check_config(small_cfg(tmp_path, "flora", model__quant="fp4"))


def test_a_run_resumes_bit_exact_counts_bytes_and_exports(tmp_path):
    cfg = small_cfg(
        tmp_path,
        "flora",
        fed__rounds=2,
        train__local_steps=2,
        eval__local="false",
        quality__score_samples=0,
    )
    run_dir = run_experiment(cfg).run_dir
    rounds = rounds_of(run_dir)
    assert [r["merged_rank"] for r in rounds] == [14] * 2
    down, up = expected_bytes(run_dir, merge_extra=0)
    assert [r["bytes_down"] for r in rounds] == down
    assert [r["bytes_up"] for r in rounds] == up
    assert check_export_reproduces_the_global_model(cfg, run_dir, "flora") > 4
    check_resume_bit_exact(tmp_path, run_dir)
