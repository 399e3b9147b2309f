"""The measurement through the real server loop (tiny Llama): per-client tables, windows,
corruption, local and global evaluation by length bucket, and its bookkeeping."""

from __future__ import annotations

import csv
import json
import math

import pytest

from cllora.cli import main
from cllora.config import load_config
from cllora.data.pipeline import build_clients, hold_out_global_test
from cllora.data.readers import DataError
from cllora.fed.server import run_experiment
from cllora.model.load import load_tokenizer
from tests.conftest import records_of, tiny_run_overrides


def _combine_buckets(rec) -> tuple[float, int]:
    tokens = sum(b["tokens"] for b in rec["buckets"].values())
    loss = sum(b["loss"] * b["tokens"] for b in rec["buckets"].values()) / tokens
    return loss, tokens


def test_heterogeneous_run_writes_tables_and_every_evaluation(tmp_path):
    cfg = load_config(
        None,
        tiny_run_overrides(
            tmp_path,
            run_name="m",
            fed__rounds=1,
            train__local_steps=1,
            partition__method="dirichlet",
            partition__num_clients=3,
            partition__alpha_len=0.5,
            partition__alpha_qty=2.0,
            quality__rates="[0.0, 0.5]",
            quality__score_samples=4,
            data__client_max_length="[48, 64]",
        ),
    )
    run = run_experiment(cfg).run_dir
    rows = list(csv.DictReader((run / "clients.csv").open()))
    assert [r["window"] for r in rows] == ["48", "64", "48"]
    assert all(int(r["truncated"]) > 0 for r in rows)  # builtin samples are longer than 64
    assert [float(r["corruption_rate"]) for r in rows] == [0.0, 0.5, 0.0]
    assert (
        float(rows[1]["corrupted"]) == pytest.approx(0.5, abs=0.05) and rows[0]["operators"] == ""
    )
    assert all(0 < float(r["quality"]) < 1 and 0 <= float(r["tv_len"]) <= 1 for r in rows)
    assert len(list(csv.DictReader((run / "samples.csv").open()))) == 3 * 4
    (part,) = records_of(run, "partition")
    assert part["length_buckets"] and "mean_tv_len" in part and "cv_samples" in part

    glob = {r["client"]: r for r in records_of(run, "global_eval") if r["round"] == 1}
    names = [r["client"] for r in rows]
    assert glob["__global__"]["tokens"] == sum(glob[n]["tokens"] for n in names)
    for rec in glob.values():  # the buckets partition the test tokens exactly
        loss, tokens = _combine_buckets(rec)
        assert tokens == rec["tokens"] and loss == pytest.approx(rec["loss"], rel=1e-6)
    local = records_of(run, "local_eval")
    assert sorted((r["client"], r["test"]) for r in local) == sorted(
        (n, t) for n in names for t in ("own", "__global__")
    )
    for r in local:
        ref = glob[r["client"] if r["test"] == "own" else "__global__"]
        assert r["tokens"] == ref["tokens"]  # same test set as the global model's
        assert _combine_buckets(r)[1] == r["tokens"]
    summary = list(csv.DictReader((run / "summary.csv").open()))
    assert math.isnan(float(summary[0]["local_own"])) and float(summary[1]["local_own"]) > 0


def test_with_one_client_the_local_model_is_the_global_model(tmp_path):
    cfg = load_config(
        None,
        tiny_run_overrides(
            tmp_path, fed__rounds=1, partition__method="iid", partition__num_clients=1
        ),
    )
    run = run_experiment(cfg).run_dir
    (g,) = [
        r for r in records_of(run, "global_eval") if r["round"] == 1 and r["client"] != "__global__"
    ]
    own, on_global = sorted(records_of(run, "local_eval"), key=lambda r: r["test"] != "own")
    assert own["test"] == "own" and on_global["test"] == "__global__"
    assert own["loss"] == pytest.approx(g["loss"], rel=1e-6)  # FedAvg of one = its local model
    assert own["buckets"].keys() == g["buckets"].keys()
    for k, b in own["buckets"].items():
        assert b["tokens"] == g["buckets"][k]["tokens"]
        assert b["loss"] == pytest.approx(g["buckets"][k]["loss"], rel=1e-6)
    assert on_global["loss"] == pytest.approx(own["loss"], rel=1e-6)


def test_local_rounds_last_evaluates_only_the_final_local_models(tmp_path):
    cfg = load_config(None, tiny_run_overrides(tmp_path, fed__rounds=2, eval__local_rounds="last"))
    run = run_experiment(cfg).run_dir
    assert {r["round"] for r in records_of(run, "local_eval")} == {2}
    timing = json.loads((run / "timing.json").read_text())
    phases = ("load", "client_stats", "global_eval", "train", "local_eval", "aggregate")
    assert all(timing[p] > 0 for p in phases) and timing["other"] >= 0
    assert sum(timing[p] for p in (*phases, "checkpoint", "other")) == pytest.approx(
        timing["total"], abs=0.01
    )
    cpu = timing["cpu"]  # CPU seconds of the same phases: training does work, it is counted
    assert cpu["train"] > 0 and sum(cpu[p] for p in (*phases, "checkpoint", "other")) == (
        pytest.approx(cpu["total"], abs=0.01)
    )
    assert {r["round"] for r in records_of(run, "client_train")} == {1, 2}
    summary = list(csv.DictReader((run / "summary.csv").open()))
    assert math.isnan(float(summary[1]["local_own"])) and float(summary[2]["local_own"]) > 0


def test_sample_losses_csv_holds_every_evaluated_sample(tmp_path):
    from cllora.report.sample_losses import read_sample_losses

    over = tiny_run_overrides(
        tmp_path,
        fed__rounds=1,
        partition__global_test_fraction=0.2,
        partition__max_global_test=5,
        eval__local_global_samples=3,
    )
    run = run_experiment(load_config(None, over)).run_dir
    table = read_sample_losses(run / "sample_losses.csv")
    groups: dict[tuple, list[int]] = {}
    for i in range(len(table)):
        key = (int(table.round[i]), table.model[i], table.client[i], table.test[i])
        groups.setdefault(key, []).append(i)
    evals = [("global", "", r) for r in records_of(run, "global_eval")]
    evals += [("local", r["client"], r) for r in records_of(run, "local_eval")]
    assert len(groups) == len(evals)
    for model, client, rec in evals:
        test = (
            rec["client"]
            if model == "global"
            else (client if rec["test"] == "own" else rec["test"])
        )
        rows = groups[(rec["round"], model, client, test)]
        assert int(table.tokens[rows].sum()) == rec["tokens"]
        assert float(table.loss_sum[rows].sum()) / rec["tokens"] == pytest.approx(rec["loss"])
    held_out = [table.sample[i] for i in groups[(0, "global", "", "__global__")]]
    assert len(held_out) == 5 and all(":" in sid for sid in held_out)  # file:line ids
    local = [k for k in groups if k[1] == "local" and k[3] == "__global__"]
    assert local and all([table.sample[i] for i in groups[k]] == held_out[:3] for k in local)


def test_local_global_samples_needs_a_held_out_set(tmp_path, capsys):
    assert main(["run", *tiny_run_overrides(tmp_path, eval__local_global_samples=2)]) == 2
    assert "needs a held-out global test set" in capsys.readouterr().err


def test_a_client_emptied_by_its_window_stops_before_training(tmp_path, capsys):
    args = tiny_run_overrides(
        tmp_path, run_name="w", data__overlong="drop", data__client_max_length="[8]"
    )
    assert main(["run", *args]) == 2
    assert "has no training sample left after its context window of 8" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()  # a failed start leaves nothing: no client trained


def test_a_held_out_global_test_set_is_the_same_whatever_the_partition(tmp_path):
    """partition.global_test_fraction: the held-out samples depend on the data and the seed only
    (not on the partition, quality or windows), never reach a client, and are capped by
    max_global_test as a prefix of the same draw."""
    tok = load_tokenizer("tiny-llama")
    held = {}
    for name, extra in {
        "iid": {"partition__method": "iid", "partition__num_clients": 2},
        "dirichlet": {
            "partition__method": "dirichlet",
            "partition__num_clients": 3,
            "partition__alpha_len": 0.3,
            "quality__rates": "[0.5]",
            "data__client_max_length": "[48]",
        },
    }.items():
        cfg = load_config(
            None, tiny_run_overrides(tmp_path, partition__global_test_fraction=0.1, **extra)
        )
        data = build_clients(cfg, tok)
        held[name] = [s.meta["where"] for s in data.global_test]
        clients = {s.meta["where"] for c in data.clients for s in (*c.train, *c.test)}
        assert not clients & set(held[name])
        assert data.stats["global_test"] == len(held[name]) == data.stats["samples"] // 10
        assert all(s.num_tokens <= cfg.data.max_length for s in data.global_test)
    assert held["iid"] == held["dirichlet"]
    capped = load_config(
        None,
        tiny_run_overrides(
            tmp_path, partition__global_test_fraction=0.1, partition__max_global_test=5
        ),
    )
    few = [s.meta["where"] for s in build_clients(capped, tok).global_test]
    assert len(few) == 5 and set(few) <= set(held["iid"])
    with pytest.raises(DataError, match="holds out all"):
        hold_out_global_test(build_clients(capped, tok).global_test[:1], 0.5, seed=0)


def test_the_held_out_set_is_what_global_and_local_models_are_scored_on(tmp_path):
    cfg = load_config(
        None,
        tiny_run_overrides(
            tmp_path,
            run_name="h",
            fed__rounds=1,
            train__local_steps=1,
            partition__global_test_fraction=0.05,
            partition__max_global_test=6,
        ),
    )
    run = run_experiment(cfg).run_dir
    held = build_clients(cfg, load_tokenizer("tiny-llama")).global_test
    assert len(held) == 6
    # the scored tokens: next-token targets (a label predicted from the token before it)
    targets = sum(sum(label != -100 for label in s.labels[1:]) for s in held)
    glob = {r["client"]: r for r in records_of(run, "global_eval") if r["round"] == 1}
    assert glob["__global__"]["tokens"] == targets > 0
    for r in records_of(run, "local_eval"):
        ref = glob[r["client"] if r["test"] == "own" else "__global__"]
        assert r["tokens"] == ref["tokens"]


def test_global_rounds_last_evaluates_the_global_model_at_round_0_and_the_end_only(tmp_path):
    cfg = load_config(
        None, tiny_run_overrides(tmp_path, run_name="g", fed__rounds=3, eval__global_rounds="last")
    )
    result = run_experiment(cfg)
    evals = records_of(result.run_dir, "global_eval")
    assert sorted({r["round"] for r in evals}) == [0, 3]
    assert sorted({r["round"] for r in records_of(result.run_dir, "local_eval")}) == [1, 2, 3]
    rows = list(csv.DictReader((result.run_dir / "summary.csv").open()))
    assert [r["global_loss"] == "nan" for r in rows] == [False, True, True, False]
    assert all(r["local_own"] != "nan" for r in rows[1:])  # the local models still are
    assert math.isfinite(result.final_global_loss)
