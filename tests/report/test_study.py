"""Declared study endpoints: the controls calibrate the instrument, Holm guards the primary
family, "no effect" needs an equivalence bound; a real tiny study sweep declares, freezes and
reports them."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from cllora.cli import main
from cllora.config import ConfigError, parse_overrides
from cllora.report.study import (
    analyse_study,
    embedded_blocks,
    fill_blocks,
    study_blocks,
    study_markdown,
)
from cllora.sweep import load_sweep, run_sweep
from tests.conftest import tiny_run_overrides

CLIENTS = ("client-00", "client-01")
N = 40  # held-out samples per seed


def _write_cell(run_dir, glob, init, local, corruption=(0.0, 0.0)):
    """A finished cell's files as a run writes them (sample_losses, clients, partition)."""
    run_dir.mkdir(parents=True)
    (run_dir / "summary.csv").write_text("round,global_loss\n")
    (run_dir / "metrics.jsonl").write_text(
        json.dumps({"kind": "partition", "length_buckets": [50]}) + "\n"
    )
    with (run_dir / "sample_losses.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["round", "model", "client", "test", "sample", "length", "tokens", "loss_sum"])
        for i in range(N):
            length = 30 if i % 2 else 80  # two buckets, alternating
            w.writerow([0, "global", "", "__global__", f"s{i}", length, 10, init[i] * 10])
            w.writerow([2, "global", "", "__global__", f"s{i}", length, 10, glob[i] * 10])
            for c, losses in zip(CLIENTS, local, strict=True):
                w.writerow([2, "local", c, "__global__", f"s{i}", length, 10, losses[i] * 10])
    with (run_dir / "clients.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["client", "corruption_rate", "tv_len", "tv_asked", "bucket_counts"])
        for c, rate in zip(CLIENTS, corruption, strict=True):
            w.writerow([c, rate, 0.0, 0.0, "<50:5 >=50:5"])


def _study(tmp_path, effects: dict[str, float], noise: float, declaration: dict, seeds=4):
    """A study sweep directory whose arms differ from ``iid`` by ``effects`` (on every model),
    plus per-seed training noise of sd ``noise`` per cell."""
    rng = np.random.default_rng(0)
    root = tmp_path / "study"
    arms = ["iid", *effects]
    cells = []
    for seed in range(seeds):
        base = rng.uniform(1.5, 3.0, N)  # sample difficulty, shared by the arms of a seed
        base[::2] += 0.5  # the long bucket (even samples) is harder
        for arm in arms:
            shift = effects.get(arm, 0.0) + rng.normal(0.0, noise)
            local = [base + shift + 0.2 + rng.normal(0, 0.01, N) for _ in CLIENTS]
            name = f"seed={seed}__arm={arm}"
            _write_cell(root / "cells" / name, base + shift, base + 0.5, local)
            cells.append({"name": name, "values": {"seed": seed, "arm": arm}})
    (root / "sweep.yaml").write_text(
        yaml.safe_dump({"name": "study", "keys": ["seed", "arm"], "cells": cells})
    )
    (root / "study.yaml").write_text(
        yaml.safe_dump({"declared_at": "2026-01-01T00:00:00Z", "study": declaration})
    )
    return root


DECLARATION = {
    "alpha": 0.05,
    "margin": 0.02,
    "controls": [
        {"id": "neg", "claim": "A/A", "arm": "redraw", "vs": "iid", "endpoint": "global",
         "expect": "none"},
        {"id": "pos", "claim": "known effect", "arm": "big", "vs": "iid", "endpoint": "global",
         "test": "greater", "expect": "effect"},
    ],
    "primary": [
        {"id": "H1", "claim": "small effect", "arm": "small", "vs": "iid", "endpoint": "global"},
        {"id": "H2", "claim": "nothing", "arm": "redraw", "vs": "iid", "endpoint": "global",
         "test": "equivalent"},
        {"id": "H3", "claim": "local", "arm": "big", "vs": "iid", "endpoint": "local-heldout",
         "test": "greater"},
    ],
    "exploratory": [
        {"id": "E1", "claim": "gain", "arm": "big", "vs": "iid", "endpoint": "local-own-gain"},
    ],
}  # fmt: skip


def test_a_calibrated_instrument_resolves_its_positive_control_and_not_its_negative(tmp_path):
    root = _study(tmp_path, {"redraw": 0.0, "big": 0.2, "small": 0.03}, 0.003, DECLARATION)
    study = analyse_study(root)
    by_id = {r.row.id: r for r in study.results}
    assert study.instrument_ok
    assert by_id["neg"].behaved and not by_id["neg"].p < 0.05
    assert by_id["pos"].behaved and by_id["pos"].test.mean == pytest.approx(0.2, abs=0.01)
    assert by_id["H1"].verdict == "effect: worse"
    assert by_id["H1"].adj[0] > 0  # a resolved row's Holm interval excludes 0
    assert by_id["H2"].verdict == "equivalent within ±0.02"
    assert by_id["E1"].test.mean == pytest.approx(0.2, abs=0.01)  # gain against round 0
    md = study_markdown(study)
    assert md.index("The instrument is calibrated") < md.index("## Primary")
    assert md.index("## Primary") < md.index("## Exploratory")


def test_a_study_that_misses_its_positive_control_says_so_first(tmp_path):
    root = _study(tmp_path, {"redraw": 0.0, "big": 0.01, "small": 0.0}, 0.05, DECLARATION)
    study = analyse_study(root)
    assert not study.instrument_ok
    assert study_blocks(study)["controls"].startswith("**The instrument failed its control(s) pos")
    assert "could not detect an effect known to exist" in study_blocks(study)["controls"]


def test_holm_withholds_what_one_test_alone_would_resolve(tmp_path):
    decl = {**DECLARATION, "primary": [
        {"id": f"H{i}", "claim": "c", "arm": arm, "vs": "iid", "endpoint": "global"}
        for i, arm in enumerate(["a", "b", "c", "d", "e", "f"])
    ]}  # fmt: skip
    effects = {"redraw": 0.0, "big": 0.2, **dict.fromkeys("abcdef", 0.012)}
    study = analyse_study(_study(tmp_path, effects, 0.006, decl, seeds=3))
    primary = study.of("primary")
    alone = [r for r in primary if r.p < 0.05]
    assert alone, "the setting must give some individually significant rows"
    assert any(r.p_adjusted >= 0.05 for r in alone)  # Holm takes some back
    for r in primary:
        assert (r.p_adjusted < 0.05) == r.verdict.startswith("effect")
        if r.verdict.startswith("effect"):
            assert r.adj[0] > 0 or r.adj[1] < 0


def test_no_effect_needs_the_equivalence_bound(tmp_path):
    decl = {
        **DECLARATION,
        "primary": [
            {"id": "wide", "claim": "c", "arm": "redraw", "vs": "iid", "endpoint": "global"}
        ],
    }
    wide = analyse_study(_study(tmp_path / "a", {"redraw": 0.0, "big": 0.2}, 0.03, decl))
    assert wide.of("primary")[0].verdict == "cannot tell"  # not resolved, not shown small
    tight = analyse_study(_study(tmp_path / "b", {"redraw": 0.0, "big": 0.2}, 0.002, decl))
    assert tight.of("primary")[0].verdict == "no effect beyond ±0.02"


def test_markdown_blocks_are_refilled_from_the_results(tmp_path):
    study = analyse_study(_study(tmp_path, {"redraw": 0.0, "big": 0.2, "small": 0.03}, 0.003,
                                 DECLARATION))  # fmt: skip
    blocks = study_blocks(study)
    doc = "intro\n<!-- study:primary -->\nstale\n<!-- /study:primary -->\nend\n"
    assert embedded_blocks(doc) == {"primary": "stale"}
    assert embedded_blocks(fill_blocks(doc, blocks)) == {"primary": blocks["primary"]}
    empty = "<!-- study:skew -->\n<!-- /study:skew -->\n"  # a new document's empty block
    assert embedded_blocks(empty) == {"skew": ""}
    assert embedded_blocks(fill_blocks(empty, blocks)) == {"skew": blocks["skew"]}


# --- a real study sweep -------------------------------------------------------------------


def _sweep_file(tmp_path, study: dict) -> str:
    base = parse_overrides(tiny_run_overrides(
        tmp_path, fed__rounds=1, train__local_steps=2, data__max_length=96,
        partition__method="iid", partition__num_clients=2, partition__pool=16,
        partition__global_test_fraction=0.1, partition__max_global_test=8,
        quality__score_samples=0, eval__local_rounds="last",
    ))  # fmt: skip
    base["sweep"] = {
        "name": "tiny-study",
        "grid": {"seed": [0, 1]},
        "arms": {
            "iid": {"partition.method": "iid"},
            "redraw": {"partition.method": "iid", "partition.draw": 1},
            "untrained": {"train.lr": 1.0e-12},
        },
        "study": study,
    }
    path = tmp_path / "tiny-study.yaml"
    path.write_text(yaml.safe_dump(base))
    return str(path)


TINY = {
    "alpha": 0.05,
    "margin": 0.05,
    "controls": [
        {"id": "negative", "claim": "A/A", "arm": "redraw", "vs": "iid", "endpoint": "global",
         "expect": "none"},
        {"id": "positive", "claim": "training helps", "arm": "untrained", "vs": "iid",
         "endpoint": "global", "test": "greater", "expect": "effect"},
    ],
    "primary": [{"id": "H1", "claim": "redraw moves local models", "arm": "redraw", "vs": "iid",
                 "endpoint": "local-heldout"}],
}  # fmt: skip


def test_a_tiny_study_sweep_declares_freezes_runs_and_reports(tmp_path, capsys):
    path = _sweep_file(tmp_path, TINY)
    sweep = load_sweep(path)
    assert [c.name for c in sweep.cells][:3] == [
        "seed=0__arm=iid",
        "seed=0__arm=redraw",
        "seed=0__arm=untrained",
    ]
    assert sweep.cells[2].cfg.train.lr == 1.0e-12 and sweep.cells[0].cfg.train.lr != 1.0e-12
    run_sweep(sweep, check=False)
    frozen = yaml.safe_load((sweep.root / "study.yaml").read_text())
    assert frozen["study"] == TINY and frozen["declared_at"]
    assert main(["report", str(sweep.root)]) == 0
    out = capsys.readouterr().out
    assert "## The instrument: controls" in out and out.index("## Primary") < out.index(
        "## Exploratory"
    )
    study = analyse_study(sweep.root)
    assert {r.row.id: r.behaved for r in study.of("control")}["positive"]
    html = (sweep.root / "report" / "report.html").read_text()
    assert "Study: the instrument (controls)" in html
    # a declaration changed after cells finished is not a declaration: refused
    changed = {**TINY, "margin": 0.5}
    with pytest.raises(ConfigError, match="differs from the declaration frozen"):
        run_sweep(load_sweep(_sweep_file(tmp_path, changed)), check=False)


def test_arms_are_checked_before_anything_runs(tmp_path):
    path = _sweep_file(tmp_path, TINY)
    spec = yaml.safe_load(Path(path).read_text())
    spec["sweep"]["arms"]["copy"] = {"partition.method": "iid"}
    Path(path).write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match="set the same values"):
        load_sweep(path)
    spec["sweep"]["arms"] = {"bad name": {"train.lr": 1.0}}
    Path(path).write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match="arms name"):
        load_sweep(path)
    spec["sweep"]["arms"] = {"x": {"train.lrr": 1.0}}
    Path(path).write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match="not a config key"):
        load_sweep(path)


def test_the_paired_worst_client_scores_both_arms_on_the_same_clients_mix(tmp_path):
    """Under a skewed arm the worst-off client holds the hard bucket alone; `worst-client`
    compares that with an IID client's mix (a partition effect even when the models are equal),
    `worst-client-paired` scores both global models on the same mix (no effect here)."""
    root = _study(tmp_path, {"redraw": 0.0, "big": 0.2, "skew": 0.0}, 0.002, {
        **DECLARATION,
        "primary": [],
        "exploratory": [
            {"id": "naive", "claim": "c", "arm": "skew", "vs": "iid", "endpoint": "worst-client"},
            {"id": "paired", "claim": "c", "arm": "skew", "vs": "iid",
             "endpoint": "worst-client-paired"},
        ],
    })  # fmt: skip
    for cell in (root / "cells").glob("*arm=skew"):  # client k holds bucket k only
        rows = (cell / "clients.csv").read_text().replace("<50:5 >=50:5", "<50:10 >=50:0", 1)
        (cell / "clients.csv").write_text(rows.replace("<50:5 >=50:5", "<50:0 >=50:10"))
    by_id = {r.row.id: r for r in analyse_study(root).results}
    assert abs(by_id["naive"].test.mean) > 0.1  # the hard bucket alone vs the mix
    assert abs(by_id["paired"].test.mean) < 0.01


def test_a_declaration_mistake_stops_the_sweep_before_any_cell_runs(tmp_path):
    bad = {**TINY, "primary": [{"id": "H1", "claim": "c", "arm": "redraw", "vs": "iid",
                                "endpoint": "global-loss"}]}  # fmt: skip
    with pytest.raises(ConfigError, match=r"endpoint 'global-loss'; allowed: global"):
        load_sweep(_sweep_file(tmp_path, bad))
    bad = {**TINY, "primary": [{"id": "H1", "claim": "c", "arm": "redrawn", "vs": "iid",
                                "endpoint": "global"}]}  # fmt: skip
    with pytest.raises(ConfigError, match=r"not in sweep\.arms"):
        load_sweep(_sweep_file(tmp_path, bad))
