"""Paired effects of a sweep's knobs (cllora.report.effects): a hand-computed case with the
sample alignment, calibration of the 95% interval by simulation, a sweep end to end, the
outputs, and the errors of the reader."""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import numpy as np
import pytest

import cllora.report.effects as effects_module
from cllora.data.readers import DataError
from cllora.report.effects import (
    EFFECT_COLUMNS,
    METHOD_BOOTSTRAP,
    METHOD_T,
    Paired,
    paired_effect,
    row_label,
    sweep_effects,
    t975,
    write_effects_csv,
)
from cllora.report.plots import forest_plot
from cllora.report.sample_losses import COLUMNS, read_sample_losses

ALPHA = "partition.alpha_len"


def write_losses(path: Path, rows: list[tuple]) -> Path:
    """``sample_losses.csv`` from (round, model, client, test, sample, length, tokens, loss)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(COLUMNS)
        writer.writerows(rows)
    return path


# --- hand-computed ----------------------------------------------------------------------------


def test_paired_effect_hand_computed():
    # seed 0: ref 20/10 = 2.0, new 16.5/10 = 1.65 -> -0.35; seed 1: 14/6 vs 11/6 -> -0.5
    seeds = [
        Paired.of([6, 4, 10], [3, 2, 5], [4.5, 3, 9], [3, 2, 5]),
        Paired.of([8, 6], [4, 2], [6, 5], [4, 2]),
    ]
    e = paired_effect(seeds)
    half = 12.7062 * np.std([-0.35, -0.5], ddof=1) / math.sqrt(2)
    assert e.effect == pytest.approx(-0.425)
    assert (e.lo, e.hi) == (pytest.approx(-0.425 - half), pytest.approx(-0.425 + half))
    assert (e.n_seeds, e.n_samples, e.method, e.resolved) == (2, 5, METHOD_T, False)


def _hand_sweep(tmp_path: Path) -> list[tuple[dict, Path]]:
    """Two seeds, reference alpha 0.1 vs 1.0; the new cells list the samples in another order,
    and seed 1's new cell lacks sample y. Round 0: every loss 2.0."""
    ref0 = [("a", 6, 3), ("b", 4, 2), ("c", 10, 5)]
    new0 = [("c", 9, 5), ("a", 4.5, 3), ("b", 3, 2)]
    ref1 = [("x", 8, 4), ("y", 3, 1), ("z", 6, 2)]
    new1 = [("z", 5, 2), ("x", 6, 4)]
    cells = []
    for alpha, seed, samples in ((0.1, 0, ref0), (1.0, 0, new0), (0.1, 1, ref1), (1.0, 1, new1)):
        rows = [(0, "global", "", "__global__", s, 10, t, 2.0 * t) for s, _, t in samples]
        rows += [(1, "global", "", "__global__", s, 10, t, loss) for s, loss, t in samples]
        run_dir = tmp_path / f"a{alpha}-s{seed}"
        write_losses(run_dir / "sample_losses.csv", rows)
        cells.append(({ALPHA: alpha, "seed": seed}, run_dir))
    return cells


def test_sweep_aligns_samples_by_id_and_leaves_out_unmatched(tmp_path):
    rows = sweep_effects(_hand_sweep(tmp_path))
    (row,) = [r for r in rows if r.model == "global" and r.scope == "all"]
    assert (row.knob, row.value, row.reference, row.round) == (ALPHA, 1.0, 0.1, 1)
    assert row.effect == pytest.approx(-0.425)  # mean of -0.35 and -0.5 (y left out)
    assert (row.n_seeds, row.n_samples, row.method) == (2, 5, METHOD_T)
    assert not [r for r in rows if r.model.startswith("local")]  # no local rows in the files
    (at0,) = sweep_effects(_hand_sweep(tmp_path), round=0)
    assert (at0.round, at0.effect, at0.lo, at0.hi, at0.resolved) == (0, 0.0, 0.0, 0.0, False)


def test_one_seed_falls_back_to_a_sample_bootstrap(tmp_path):
    cells = [c for c in _hand_sweep(tmp_path) if c[0]["seed"] == 0]
    (row,) = sweep_effects(cells, n_boot=500, rng_seed=3)
    assert (row.method, row.n_seeds, row.n_samples) == (METHOD_BOOTSTRAP, 1, 3)
    assert row.effect == pytest.approx(-0.35)
    assert row.lo <= row.effect <= row.hi
    again = sweep_effects(cells, n_boot=500, rng_seed=3)[0]
    assert (again.lo, again.hi) == (row.lo, row.hi)  # deterministic given the seed
    assert "(1 seed)" in row_label(row)


def test_bootstrap_resamples_samples_jointly_for_every_part():
    # two parts on the same samples with the same differences: every resample gives both parts
    # the same effect, so the interval equals that of one part alone
    ref, new, tok = np.array([2.0, 3.0, 1.0, 4.0]), np.array([1.0, 3.5, 0.0, 3.0]), np.ones(4)
    one = paired_effect([Paired.of(ref, tok, new, tok)], n_boot=400, rng_seed=1)
    two = paired_effect(
        [Paired.of(np.stack([ref, ref]), np.stack([tok, tok]), np.stack([new, new]), [tok, tok])],
        n_boot=400,
        rng_seed=1,
    )
    assert (two.lo, two.hi) == pytest.approx((one.lo, one.hi))
    assert one.effect == pytest.approx(-0.625)
    assert one.lo < one.effect < one.hi


def test_t_quantiles():
    assert t975(1) == 12.7062 and t975(4) == 2.7764 and t975(30) == 2.0423
    assert t975(31) == pytest.approx(2.0395, abs=2e-4)
    assert t975(120) == pytest.approx(1.9799, abs=2e-4)
    assert t975(10**7) == pytest.approx(1.95996, abs=1e-4)
    with pytest.raises(ValueError):
        t975(0)


# --- calibration by simulation ----------------------------------------------------------------


def _study(rng, n_seeds: int, delta: float, n: int = 50, train: float = 0.03) -> list[Paired]:
    """Per seed: its own samples (difficulty shared by the paired cells, tokens 5-80), training
    noise per cell (sd ``train``), per-sample noise per cell and a per-sample effect spread."""
    tok = rng.integers(5, 81, (n_seeds, n)).astype(float)
    difficulty = rng.normal(2.5, 0.6, (n_seeds, n))
    noise = 1.2 / np.sqrt(tok)
    shift = rng.normal(0, train, (2, n_seeds, 1))
    ref = difficulty + shift[0] + rng.normal(0, 1, (n_seeds, n)) * noise
    new = difficulty + shift[1] + delta + rng.normal(0, 0.05, (n_seeds, n))
    new += rng.normal(0, 1, (n_seeds, n)) * noise
    return [Paired.of(ref[s] * tok[s], tok[s], new[s] * tok[s], tok[s]) for s in range(n_seeds)]


def _rates(n_seeds: int, studies: int, seed: int, train: float = 0.03, n_boot: int = 2000):
    rng = np.random.default_rng(seed)
    covered = false_resolved = 0
    for i in range(studies):
        e = paired_effect(_study(rng, n_seeds, 0.05, train=train), n_boot=n_boot, rng_seed=i)
        covered += e.lo <= 0.05 <= e.hi
        zero = paired_effect(_study(rng, n_seeds, 0.0, train=train), n_boot=n_boot, rng_seed=i)
        false_resolved += zero.resolved
    return covered / studies, false_resolved / studies


@pytest.mark.parametrize("n_seeds", [2, 4])
def test_interval_is_calibrated_over_seeds(n_seeds):
    coverage, false_resolved = _rates(n_seeds, 500, seed=n_seeds)
    assert 0.92 <= coverage <= 0.98
    assert false_resolved <= 0.08


def test_interval_has_power_with_four_seeds():
    rng = np.random.default_rng(11)
    resolved = [paired_effect(_study(rng, 4, 0.3)).resolved for _ in range(100)]
    assert np.mean(resolved) >= 0.9


def test_one_seed_bootstrap_is_calibrated_for_sample_noise_only():
    coverage, false_resolved = _rates(1, 300, seed=5, train=0.0, n_boot=500)
    assert 0.89 <= coverage <= 0.99
    assert false_resolved <= 0.10


# --- a sweep end to end -----------------------------------------------------------------------

LENGTHS = (50, 100, 200, 300)  # edges (128, 256): <128 twice, 128-255, >=256
GLOBAL_EFFECT = (0.1, 0.1, 0.4, 0.4)  # of alpha 1.0 vs 0.1, per global test sample
LOCAL_ON_GLOBAL = {"c0": 0.1, "c1": 0.3}
LOCAL_ON_OWN = {"c0": 0.05, "c1": -0.15}


def _cell_rows(alpha: float, r: int, seed: int) -> list[tuple]:
    """Losses per token: difficulty + knob effects (+0.02 * seed for alpha 1.0, so the seeds'
    effects differ; -0.1 for lora.r 8); round 0 is the same in every cell."""
    shift = (0.02 * seed if alpha == 1.0 else 0.0) - (0.1 if r == 8 else 0.0)
    on = alpha == 1.0
    rows = []
    for rnd in (0, 1):
        last = rnd == 1
        for i, (length, eff) in enumerate(zip(LENGTHS, GLOBAL_EFFECT, strict=True)):
            loss = 2.0 + 0.1 * i + last * (shift + on * eff)
            rows.append((rnd, "global", "", "__global__", f"s{seed}:{i}", length, 10, 10 * loss))
        for c in ("c0", "c1"):
            for i in range(3):
                loss = 2.5 + 0.1 * i + last * (shift + on * LOCAL_ON_GLOBAL[c])
                rows.append((rnd, "local", c, "__global__", f"s{seed}:{i}", 9, 5, 5 * loss))
                loss = 1.5 + 0.2 * i + last * (shift + on * LOCAL_ON_OWN[c])
                rows.append((rnd, "local", c, c, f"{c}.jsonl:{i}", 9, 4, 4 * loss))
    return rows


def _sweep(tmp_path: Path) -> list[tuple[dict, Path]]:
    cells = []
    for alpha in (1.0, 0.1):  # 1.0 first: the default reference
        for r in (4, 8):
            for seed in (0, 1):
                run_dir = tmp_path / f"alpha={alpha}__r={r}__seed={seed}"
                write_losses(run_dir / "sample_losses.csv", _cell_rows(alpha, r, seed))
                cells.append(({ALPHA: alpha, "lora.r": r, "seed": seed}, run_dir))
    return cells


SCOPES = [
    ("global", "all"),
    ("global", "length <128"),
    ("global", "length 128-255"),
    ("global", "length >=256"),
    ("local-mean", "all"),
    ("local-mean", "own"),
    ("local:c0", "own"),
    ("local:c1", "own"),
]


def test_sweep_effects_end_to_end(tmp_path):
    cells = _sweep(tmp_path)
    rows = sweep_effects(cells, edges=(128, 256))
    assert [(r.knob, r.value, r.reference) for r in rows] == [(ALPHA, 0.1, 1.0)] * 8 + [
        ("lora.r", 8, 4)
    ] * 8
    assert [(r.model, r.scope) for r in rows] == SCOPES * 2
    assert {(r.round, r.n_seeds, r.method) for r in rows} == {(1, 2, METHOD_T)}
    alpha = {(r.model, r.scope): r for r in rows[:8]}
    expected = {  # alpha 1.0 vs 0.1 (+0.01: the mean seed shift); the rows are 0.1 vs 1.0
        ("global", "all"): 0.25,
        ("global", "length <128"): 0.1,
        ("global", "length 128-255"): 0.4,
        ("global", "length >=256"): 0.4,
        ("local-mean", "all"): 0.2,
        ("local-mean", "own"): -0.05,
        ("local:c0", "own"): 0.05,
        ("local:c1", "own"): -0.15,
    }
    for scope, value in expected.items():
        assert alpha[scope].effect == pytest.approx(-(value + 0.01)), scope
    # seeds are the unit: the two lora.r pairs of a seed are averaged, then t over 2 seeds
    half = 12.7062 * np.std([0.0, 0.02], ddof=1) / math.sqrt(2)
    row = alpha[("global", "all")]
    assert (row.lo, row.hi) == (pytest.approx(-0.26 - half), pytest.approx(-0.26 + half))
    n_samples = {k: r.n_samples for k, r in alpha.items()}
    assert n_samples[("global", "all")] == 8 and n_samples[("global", "length <128")] == 4
    assert n_samples[("local-mean", "own")] == 12 and n_samples[("local:c0", "own")] == 6
    for r in rows[8:]:  # lora.r 8 vs 4: -0.1 everywhere, in every seed
        assert r.effect == pytest.approx(-0.1) and r.resolved
        assert (r.lo, r.hi) == (pytest.approx(-0.1), pytest.approx(-0.1))


def test_sweep_effects_reference_and_round(tmp_path):
    cells = _sweep(tmp_path)
    rows = sweep_effects(cells, reference={ALPHA: 0.1, "lora.r": 8}, round=0)
    assert [(r.knob, r.value, r.reference) for r in rows[:1]] == [(ALPHA, 1.0, 0.1)]
    assert {r.round for r in rows} == {0} and all(r.effect == 0 for r in rows)
    flipped = sweep_effects(cells, reference={ALPHA: 0.1})
    assert flipped[0].effect == pytest.approx(0.26)
    with pytest.raises(ValueError, match="not one of"):
        sweep_effects(cells, reference={ALPHA: 0.5})
    with pytest.raises(ValueError, match="not knobs"):
        sweep_effects(cells, reference={"seed": 0})


def test_sweep_effects_names_a_missing_file(tmp_path):
    cells = _sweep(tmp_path)
    (cells[0][1] / "sample_losses.csv").unlink()
    with pytest.raises(DataError, match=r"sample_losses\.csv: no such file"):
        sweep_effects(cells)


# --- outputs ----------------------------------------------------------------------------------


def test_effects_csv_and_forest_plot(tmp_path):
    rows = sweep_effects(_sweep(tmp_path), edges=(128, 256))
    path = write_effects_csv(rows, tmp_path / "effects.csv")
    with path.open(newline="") as fh:
        back = list(csv.DictReader(fh))
    assert tuple(back[0]) == EFFECT_COLUMNS and len(back) == len(rows)
    assert back[0]["value"] == "0.1" and back[0]["reference"] == "1.0"
    assert float(back[0]["effect"]) == pytest.approx(rows[0].effect, rel=1e-5)
    assert back[-1]["resolved"] == "true"
    assert row_label(rows[0]) == "alpha_len 0.1 vs 1.0 — global model, all samples"
    assert row_label(rows[5]) == "alpha_len 0.1 vs 1.0 — mean local model, own test sets"
    png = forest_plot(rows, tmp_path / "effects.png")
    data = png.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 5000


# --- reader errors ----------------------------------------------------------------------------

GOOD = "1,global,,__global__,a,10,3,6.0"


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("1,global,,__global__,a,10,three,6.0", "'tokens': 'three' is not an integer"),
        ("1,global,,__global__,a,10,3", "7 fields, the header has 8"),
        ("1,global,,__global__,b,10,3,nan", "'loss_sum': 'nan' is not a finite number"),
        ("1,local,,__global__,a,10,3,6.0", "'client': ''"),
        ("1,best,,__global__,a,10,3,6.0", "neither 'global' nor 'local'"),
        (GOOD, "duplicate row .* \\(first at line 2\\)"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, line, reason):
    path = tmp_path / "sample_losses.csv"
    path.write_text(",".join(COLUMNS) + f"\n{GOOD}\n{line}\n")
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}:3: .*{reason}"):
        read_sample_losses(path)


def test_reader_header_and_columns(tmp_path):
    path = tmp_path / "sample_losses.csv"
    path.write_text("round,model,client,test,sample,length,tokens\n")
    with pytest.raises(DataError, match=r"sample_losses\.csv:1: the header lacks loss_sum"):
        read_sample_losses(path)
    path.write_text("loss_sum,extra," + ",".join(COLUMNS[:-1]) + "\n7.5,x,2,local,c,c,s,4,3\n\n")
    losses = read_sample_losses(path)
    assert len(losses) == 1 and losses.rounds() == {2}
    assert (losses.client, losses.sample, losses.loss_sum.tolist()) == (["c"], ["s"], [7.5])


def test_module_docstring_example_runs():
    after = effects_module.__doc__.split("::\n\n", 1)[1].splitlines()
    block = []
    for line in after:
        if line and not line.startswith("    "):
            break
        block.append(line[4:])
    namespace: dict = {}
    exec("\n".join(block), namespace)
    e = namespace["e"]
    assert (e.n_seeds, e.n_samples, e.method) == (2, 5, METHOD_T)
    assert e.effect == pytest.approx(-0.184, abs=1e-3)


def test_a_one_seed_interval_on_a_handful_of_samples_is_never_resolved():
    from cllora.report.effects import MIN_BOOTSTRAP_SAMPLES, Paired, paired_effect

    def effect(n: int):
        rng = np.random.default_rng(1)
        ref = rng.uniform(2.0, 3.0, n) * 10
        return paired_effect([Paired.of(ref, np.full(n, 10), ref - 3.0 + rng.normal(0, 0.1, n),
                                        np.full(n, 10))])  # fmt: skip

    few, many = effect(3), effect(MIN_BOOTSTRAP_SAMPLES)
    assert few.hi < 0 and not few.resolved  # the interval excludes 0, but 3 samples say nothing
    assert many.hi < 0 and many.resolved


def _gain_cell(alpha: float, seed: int) -> list[tuple]:
    """A cell whose clients' own test sets differ with ``alpha`` (a partition knob): the initial
    model's loss per token on them is 3.0 + 0.1 * i, the local model's is that minus a gain of
    0.2 (alpha 100) or 0.3 + 0.02 * seed (alpha 0.1, one client) and 0.1 (the other)."""
    rows = []
    gains = {"c0": 0.2, "c1": 0.2} if alpha == 100.0 else {"c0": 0.3 + 0.02 * seed, "c1": 0.1}
    for c, gain in gains.items():
        for i in range(3):
            sample, base = f"{alpha}:{c}:{i}", 3.0 + 0.1 * i
            rows.append((0, "global", "", c, sample, 9, 4, 4 * base))
            rows.append((2, "local", c, c, sample, 9, 4, 4 * (base - gain)))
    rows.append((2, "global", "", "__global__", f"s{seed}", 9, 4, 8.0))
    return rows


def test_own_gain_compares_local_training_between_cells_whose_test_sets_differ(tmp_path):
    cells = []
    for alpha in (100.0, 0.1):
        for seed in (0, 1):
            run_dir = tmp_path / f"alpha={alpha}__seed={seed}"
            write_losses(run_dir / "sample_losses.csv", _gain_cell(alpha, seed))
            cells.append(({ALPHA: alpha, "seed": seed}, run_dir))
    rows = {(r.model, r.scope): r for r in sweep_effects(cells)}
    assert ("local-mean", "own") not in rows  # no own-test sample is in both cells
    gain = rows[("local-mean", "own-gain")]
    # alpha 0.1 gains (0.3 + 0.02 s + 0.1) / 2 = 0.2 + 0.01 s per client, alpha 100 gains 0.2:
    # losses fall by 0.01 s more, so the per-seed effects are 0.0 and -0.01
    assert gain.effect == pytest.approx(-0.005) and (gain.n_seeds, gain.n_samples) == (2, 12)
    half = 12.7062 * np.std([0.0, -0.01], ddof=1) / math.sqrt(2)
    assert (gain.lo, gain.hi) == (pytest.approx(-0.005 - half), pytest.approx(-0.005 + half))
    assert gain.method == METHOD_T and not gain.resolved and gain.round == 2
    assert "own test sets, gain over the initial model" in row_label(gain)
    one_seed = [c for c in cells if c[0]["seed"] == 0]
    assert not [r for r in sweep_effects(one_seed) if r.scope == "own-gain"]
    for run_dir in (c[1] for c in cells if c[0][ALPHA] == 0.1):  # the same own test sets now
        path = run_dir / "sample_losses.csv"
        path.write_text(path.read_text().replace("0.1:c", "100.0:c"))
    rows = {(r.model, r.scope): r for r in sweep_effects(cells)}
    assert ("local-mean", "own-gain") not in rows
    assert rows[("local-mean", "own")].effect == pytest.approx(-0.005)  # what own-gain said
