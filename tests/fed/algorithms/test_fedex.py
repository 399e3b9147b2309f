"""``fedex``: FedAvg of the factors plus the residual folded into the base, so the global model is
the exact weighted average of the client models; its residual bytes, resume and export."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch import nn

from cllora.config import ConfigError, load_config
from cllora.fed.algorithms import algorithm_class, make_algorithm
from cllora.fed.algorithms._merge import catch_up_nbytes, export_state, module_shapes
from cllora.fed.algorithms.base import ClientResult, Uplink
from cllora.fed.algorithms.fedex import FedEx, fedex_residual
from cllora.fed.checkpoint import load_checkpoint
from cllora.fed.runner import run_experiment
from cllora.model.adapter import load_adapter, read_adapter
from cllora.model.load import load_model
from cllora.model.lora import LoRALinear, lora_modules, lora_state_dict
from cllora.model.setup import build_model
from tests.conftest import metrics_without_times, tiny_run_overrides

try:
    import peft
except ImportError:  # the export is still checked with cllora's loader
    peft = None

ALPHA = 8.0


def small_cfg(tmp_path, strategy: str, **extra):
    over = {"lora__r": 4, "lora__alpha": ALPHA, "lora__client_ranks": "[2, 4]", **extra}
    return load_config(
        None, tiny_run_overrides(tmp_path, run_name="x", fed__strategy=strategy, **over)
    )


def small_model(seed: int = 0) -> nn.Module:
    """Two fp32 LoRA modules of rank 4 (names "0" and "1")."""
    torch.manual_seed(seed)
    return nn.Sequential(
        LoRALinear(nn.Linear(6, 5), 4, ALPHA), LoRALinear(nn.Linear(5, 7), 4, ALPHA)
    )


def effective(model: nn.Module) -> dict[str, torch.Tensor]:
    """``W + s B A`` of every LoRA module, in fp64."""
    return {
        n: m.base.weight.double() + m.scaling * m.lora_B.double() @ m.lora_A.double()
        for n, m in lora_modules(model).items()
    }


def trained(down: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """A client's "training": random moves of its downlink adapter."""
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in down.items()}


def client_round(algo, model, global_state, clients, weights, seed):
    """One simulated round on ``model``: each client's effective weights, then the aggregate
    applied. Returns the aggregate and the weighted mean of the client models."""
    results, mean = [], None
    for i, w in zip(clients, weights, strict=True):
        up = trained(algo.downlink(i, global_state).adapter, seed + i)
        results.append(ClientResult(i, Uplink(up), w))
        rank = up["0.lora_A"].shape[0]
        client = {
            n: m.base.weight.double()
            + (ALPHA / rank) * up[f"{n}.lora_B"].double() @ up[f"{n}.lora_A"].double()
            for n, m in lora_modules(model).items()
        }
        mean = {n: w * t + (0 if mean is None else mean[n]) for n, t in client.items()}
    agg = algo.aggregate(global_state, results)
    algo.apply_global(model, agg.state)
    return agg, mean


def assert_close(a: dict, b: dict, tol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k].double(), b[k].double(), atol=tol, rtol=tol)


def assert_export_reproduces(export: dict, rank: int, model) -> None:
    """The exported adapter (rank ``rank``) on a fresh original base gives ``model``'s
    effective weights."""
    base = small_model()
    for n, m in lora_modules(base).items():
        m.set_rank(rank)
        with torch.no_grad():
            m.lora_A.copy_(export[f"{n}.lora_A"])
            m.lora_B.copy_(export[f"{n}.lora_B"])
    assert_close(effective(base), effective(model))


def test_residual_is_the_dense_hand_computation():
    g = torch.Generator().manual_seed(0)
    c1 = {"m.lora_A": torch.randn(2, 6, generator=g), "m.lora_B": torch.randn(5, 2, generator=g)}
    c2 = {"m.lora_A": torch.randn(3, 6, generator=g), "m.lora_B": torch.randn(5, 3, generator=g)}
    avg = {"m.lora_A": torch.randn(3, 6, generator=g), "m.lora_B": torch.randn(5, 3, generator=g)}
    P, Q = fedex_residual([c1, c2], [0.25, 0.75], 6.0, avg, "m")
    assert P.shape == (5, 8) and Q.shape == (8, 6)
    dense = (
        0.25 * 3.0 * c1["m.lora_B"] @ c1["m.lora_A"]
        + 0.75 * 2.0 * c2["m.lora_B"] @ c2["m.lora_A"]
        - 2.0 * avg["m.lora_B"] @ avg["m.lora_A"]
    )
    torch.testing.assert_close(P @ Q, dense, atol=1e-5, rtol=1e-5)


def test_global_model_is_the_weighted_average_of_the_client_models(tmp_path):
    algo = make_algorithm(small_cfg(tmp_path, "fedex"))
    assert isinstance(algo, FedEx)
    model = small_model()
    original = {n: m.base.weight.clone() for n, m in lora_modules(model).items()}
    state = lora_state_dict(model)
    for rnd, (clients, weights) in enumerate([([0, 1, 2], [0.2, 0.5, 0.3]), ([1, 3], [0.6, 0.4])]):
        agg, mean = client_round(algo, model, state, clients, weights, seed=10 * rnd)
        assert_close(effective(model), mean)  # exact to fp32 precision
        assert agg.info["merged_rank"] == sum(2 if i % 2 == 0 else 4 for i in clients) + 4
        state = agg.state
    # fedavg of the factors alone would not be the average: the residual is not zero
    assert agg.info["merged_norm"] > 1e-3
    # idempotent, and a fresh model after load_state_dict gets bitwise the same base
    folded = {n: m.base.weight.clone() for n, m in lora_modules(model).items()}
    algo.apply_global(model, state)
    fresh, again = small_model(), algorithm_class("fedex")(algo.cfg)
    again.load_state_dict(algo.state_dict(), fresh)
    again.apply_global(fresh, state)
    for n, m in lora_modules(model).items():
        assert torch.equal(m.base.weight, folded[n])
        assert torch.equal(lora_modules(fresh)[n].base.weight, folded[n])
        torch.testing.assert_close(algo.state["delta"][n], folded[n] - original[n])
    # the exported adapter reproduces the global model on the original base
    export, rank = export_state(state, algo.state["delta"], ALPHA)
    assert rank > 4 and export["0.lora_A"].shape == (rank, 6)
    assert_export_reproduces(export, rank, model)


def test_a_client_receives_the_residuals_it_missed(tmp_path):
    algo = make_algorithm(small_cfg(tmp_path, "fedex"))
    model = small_model()
    state = lora_state_dict(model)
    shapes = module_shapes(state)
    adapter = {r: sum(r * (o + i) * 4 for o, i in shapes.values()) for r in (2, 4)}
    assert algo.downlink(0, state).nbytes() == adapter[2]  # round 1: nothing merged yet
    agg, _ = client_round(algo, model, state, [0, 1], [0.5, 0.5], seed=0)
    merge1 = 2 + 4 + 4  # client ranks + the global rank
    # client 3 never trained; client 0 trained in round 1 but has not received its merge
    assert algo.downlink(3, agg.state).nbytes() == adapter[4] + catch_up_nbytes(shapes, [merge1])
    agg2, _ = client_round(algo, model, agg.state, [1], [1.0], seed=5)
    merge2 = 4 + 4
    assert algo.downlink(0, agg2.state).nbytes() == adapter[2] + catch_up_nbytes(
        shapes, [merge1, merge2]
    )
    assert algo.downlink(1, agg2.state).nbytes() == adapter[4] + catch_up_nbytes(shapes, [merge2])
    # per module: the stacked factors, or the dense delta when that is smaller
    assert catch_up_nbytes({"m": (5, 6)}, [2]) == 4 * 2 * 11
    assert catch_up_nbytes({"m": (5, 6)}, [2, 1]) == 4 * 30
    assert catch_up_nbytes({"m": (5, 6)}, []) == 0


def test_a_4bit_base_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="4-bit"):
        algorithm_class("fedex").check_config(small_cfg(tmp_path, "fedex", model__quant="nf4"))


# -- whole runs ---------------------------------------------------------------------------------


def rounds_of(run_dir) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "round"]


def check_resume_bit_exact(tmp_path, run_dir) -> None:
    """Re-run the last round (2) from round 1's checkpoint in a copy: the same bytes, tensors,
    records (round 1's merged delta comes from the checkpoint)."""
    copy = tmp_path / "resumed"
    shutil.copytree(run_dir, copy)
    shutil.rmtree(copy / "checkpoint" / "round-0002")
    shutil.rmtree(copy / "adapter")
    (copy / "summary.csv").unlink()
    run_experiment(None, resume=copy)
    assert (copy / "summary.csv").read_bytes() == (run_dir / "summary.csv").read_bytes()
    _, a = read_adapter(run_dir / "adapter")
    _, b = read_adapter(copy / "adapter")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert metrics_without_times(run_dir) == metrics_without_times(copy)


def check_export_reproduces_the_global_model(cfg, run_dir, strategy: str) -> int:
    """The final global model (a fresh base + the last checkpoint, as ``--resume`` builds it)
    and the exported adapter on a fresh base (cllora's loader, and PEFT's) give the same
    logits. Returns the adapter's rank."""
    ckpt = load_checkpoint(run_dir / "checkpoint")
    model, _, _ = build_model(cfg, 4)
    algo = algorithm_class(strategy)(cfg)
    algo.load_state_dict(ckpt.server_state, model)
    algo.apply_global(model, ckpt.global_state)
    base, _ = load_model(cfg.model, seed=cfg.seed)
    load_adapter(base, run_dir / "adapter")
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = model(ids).logits, base(ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    plain, _ = load_model(cfg.model, seed=cfg.seed)
    with torch.no_grad():
        assert (want - plain(ids).logits).abs().max() > 1e-4  # the run moved the model
    if peft is not None:  # PEFT itself reads the higher-rank adapter the same way
        with torch.no_grad():
            by_peft = peft.PeftModel.from_pretrained(plain, str(run_dir / "adapter"))(ids).logits
        torch.testing.assert_close(by_peft, want, atol=1e-4, rtol=1e-4)
    adapter_cfg, _ = read_adapter(run_dir / "adapter")
    return int(adapter_cfg["r"])


def expected_bytes(run_dir, merge_extra: int) -> tuple[list[int], list[int]]:
    """bytes_down and bytes_up of every round when all 5 clients train every round (ranks
    2, 4, 2, 4, 2): adapters at the client ranks, plus the previous round's merge to each."""
    ckpt = load_checkpoint(run_dir / "checkpoint")
    shapes = module_shapes(ckpt.global_state)
    ranks = [2, 4, 2, 4, 2]
    adapter = sum(r * (o + i) * 4 for r in ranks for o, i in shapes.values())
    merge = catch_up_nbytes(shapes, [sum(ranks) + merge_extra])
    rounds = rounds_of(run_dir)
    down = [adapter + (len(ranks) * merge if k > 0 else 0) for k in range(len(rounds))]
    return down, [adapter] * len(rounds)


def test_a_run_is_exact_resumes_bit_exact_counts_bytes_and_exports(tmp_path):
    cfg = small_cfg(
        tmp_path,
        "fedex",
        fed__rounds=2,
        train__local_steps=2,
        eval__local="false",
        quality__score_samples=0,
    )
    result = run_experiment(cfg)
    run_dir = result.run_dir
    rounds = rounds_of(run_dir)
    assert [r["merged_rank"] for r in rounds] == [14 + 4] * 2
    assert all(r["merged_norm"] > 0 for r in rounds)
    down, up = expected_bytes(run_dir, merge_extra=4)
    assert [r["bytes_down"] for r in rounds] == down
    assert [r["bytes_up"] for r in rounds] == up
    assert check_export_reproduces_the_global_model(cfg, run_dir, "fedex") > 4
    check_resume_bit_exact(tmp_path, run_dir)
