"""Paired effects of a sweep's knobs on per-sample losses, with calibrated 95% intervals.

Usage (runnable as is)::

    from cllora.report.effects import Paired, paired_effect

    seeds = [  # one Paired per seed: the reference cell and the new cell on the same samples
        Paired.of(ref_loss=[6.0, 9.0, 2.0], ref_tokens=[3, 3, 1],
                  new_loss=[5.1, 8.4, 1.9], new_tokens=[3, 3, 1]),
        Paired.of(ref_loss=[4.0, 7.5], ref_tokens=[2, 3], new_loss=[3.8, 7.0], new_tokens=[2, 3]),
    ]
    e = paired_effect(seeds)   # Effect(effect=-0.184, lo=-0.747, hi=0.378, n_seeds=2,
                               #        n_samples=5, method='t-seeds', resolved=False)

On a sweep (every cell's run directory holds ``sample_losses.csv``)::

    rows = sweep_effects([(cell.values, cell_dir(cell)) for cell in sweep.cells], edges=(128, 256))
    write_effects_csv(rows, sweep.root / "effects.csv")
    cllora.report.plots.forest_plot(rows, sweep.root / "effects.png")   # `cllora report` does both

**Input.** ``sample_losses.csv`` (:func:`cllora.report.sample_losses.read_sample_losses`), one
row per (round, evaluated model, test set, sample):
``round,model,client,test,sample,length,tokens,loss_sum``; ``model`` is ``global``
(``client`` empty) or ``local`` (client ``client``'s local model); ``test`` a client's test set
or ``__global__``; ``sample`` an id stable across cells; ``loss_sum`` the summed
cross-entropy over the sample's ``tokens`` target tokens. The loss of a set of samples is
``sum(loss_sum) / sum(tokens)`` (token-weighted).

**Effect.** The effect of a knob value ``v`` against a reference value ``r`` is the loss with
``v`` minus the loss with ``r`` (nats per token; negative = ``v`` is better), paired: a cell with
``v`` is matched with the cell that has ``r`` and the same value of every other grid key (seed
included); the pair is compared at the last round both evaluated (or ``round=``) on the samples
both evaluated (same ids, per local model: same client and id). Each pair is split into *parts*
(one for the global model; one per client for local models) and its effect is the mean over its
parts of (loss of ``v``'s model minus loss of ``r``'s model, each token-weighted over the part's
paired samples). Pairs that share a seed (a second knob) are averaged into one per-seed effect,
the seed being the independent unit: cells with the same seed share the held-out set and, in
part, the training randomness. The reported effect is the mean of the per-seed effects.

Scopes (columns ``model``, ``scope``): ``global`` on the global test set, ``all`` samples and
each length bucket given ``edges`` (labels ``<128``, ``128-255``, ``>=256``, or ``<3sent``, ...
with ``measure="sentences"``: the bucket of the reference cell's ``length``); ``local-mean``
(the mean local model): ``all`` = each local model on the global test set, ``own`` = each local
model on its own client's test set, per client then averaged over the clients with a local model
in both cells (equal weight per client, so the mean of the local models' losses, not a pooled
loss); ``local:<client>``, ``own``: that client's local model on its own test set. Where the
knob moves samples between clients (a partition knob), own test sets differ between the two
cells, and ``own`` scopes use the samples both cells put in that client's test set;
``n_samples`` says how many. ``local-mean``, ``own-gain``: what local training gained on the
clients' own test sets, compared between cells even where their test sets differ: per cell, the
mean over clients of (the local model's loss minus the initial model's, round 0, on the same
own-test samples); the effect is the new cell's gain minus the reference's (negative = local
training gains more with ``v``), per seed, with a t interval over 2 or more seeds (none with
one seed: the two cells' samples differ, so there is nothing to pair a bootstrap on); only where
the knob changed the own test sets (elsewhere it equals the ``own`` row); ``n_samples`` counts
the new cells' own-test samples.

Generation scopes (cells run with ``eval.generate_samples`` > 0; their ``metrics.jsonl`` holds
``generation`` records, :mod:`cllora.report.records`): ``model=global``, ``scope=rouge-l`` and
``scope=token-f1``, the global model's per-sample ROUGE-L F-measure / token F1 of its greedy
answers, at the last round both cells generated (or ``round=``), paired by sample id as above.
Each sample weighs the same (a ``Paired`` with the score as ``loss`` and 1 as ``tokens``), so the
effect is the new cell's mean score minus the reference's: a score in [0, 1], **higher =
better** (:func:`higher_is_better`; the labels say so), unlike the loss scopes.

**Interval (95%), column ``method``.**

- ``t-seeds`` (2 or more seeds): a Student t interval over the per-seed effects,
  ``mean +- t(0.975, S-1) * sd / sqrt(S)``. Each per-seed effect is one independent draw of
  everything that varies between seeds (training randomness, which samples are held out, sample
  noise), so its spread across seeds measures all of it at once, and per-seed effects are means
  over many samples, close to normal, where the t interval is exact. A two-stage bootstrap
  (seeds, then samples within seed) estimates the same spread from 2-5 resampled seeds, which
  understates it, and under-covers, the more so the fewer the seeds and the larger the training
  noise. Both methods' coverage on simulated studies: docs/measurement.md, "How the intervals
  are calibrated". The price of honesty: with 2 seeds ``t = 12.71``, so intervals are wide;
  3 seeds (4.30) are worth much more than 2.
- ``bootstrap-samples-1seed`` (one seed): a paired percentile bootstrap over the samples
  (``n_boot`` resamples of the sample ids, drawn once for every part so that parts on the same
  samples stay matched, from ``numpy.random.default_rng(rng_seed)``: deterministic). It measures
  sample noise only, so it under-covers when training noise is present (same section). Read it
  as "this test set resolves the difference", not as "the knob has an effect". Below
  ``MIN_BOOTSTRAP_SAMPLES`` paired samples (a client's own test set of 3) the interval is
  reported but never called resolved: a percentile bootstrap over 3 samples has 10 distinct
  resamples and covers far below 95%.

``resolved``: the interval excludes 0.
"""

from __future__ import annotations

import bisect
import csv
import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from cllora.data.partition import bucket_label
from cllora.report.metrics import read_metrics
from cllora.report.records import GLOBAL, Kind, of_kind
from cllora.report.sample_losses import FILE_NAME, SampleLosses, read_sample_losses

MODELS = ("global", "local")
SEED_KEY = "seed"
METHOD_T = "t-seeds"
METHOD_BOOTSTRAP = "bootstrap-samples-1seed"
GAIN_SCOPE = "own-gain"  # local model minus initial model on own test sets, between cells
MIN_BOOTSTRAP_SAMPLES = 10  # fewer paired samples: a 1-seed interval is never "resolved"
N_BOOT = 2000
# Generation scopes (higher = better) -> the per-sample field of the ``generation`` records.
GENERATION_SCOPES = {"rouge-l": "rouge_l", "token-f1": "f1"}
_SCORE_NAMES = {"rouge-l": "ROUGE-L", "token-f1": "token F1"}
EFFECT_COLUMNS = (
    "knob",
    "value",
    "reference",
    "model",
    "scope",
    "round",
    "effect",
    "lo",
    "hi",
    "n_seeds",
    "n_samples",
    "method",
    "resolved",
)

# t(0.975, df) for df = 1..30 (Student's t quantiles, to 4 decimals); beyond, an expansion.
_T975 = (
    12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
    2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
    2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
)  # fmt: skip
_Z975 = 1.959963984540054


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (``df >= 1``): the table
    up to 30, then the Cornish-Fisher expansion around the normal quantile (within 1e-4)."""
    if df < 1:
        raise ValueError(f"t quantile needs df >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return (
        z
        + (z**3 + z) / (4 * df)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3)
    )


# --- one effect -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Paired:
    """One seed's paired evaluations: row ``p`` = a part (the global model, or one client's local
    model), column ``j`` = a sample evaluated by both cells (0 tokens: that part did not evaluate
    it). ``weights`` (per part, summing to 1) weight the parts' effects."""

    ref_loss: np.ndarray  # (parts, samples) summed loss of the reference cell
    ref_tokens: np.ndarray
    new_loss: np.ndarray  # the same for the cell with the new value
    new_tokens: np.ndarray
    weights: np.ndarray  # (parts,)

    @classmethod
    def of(
        cls,
        ref_loss: Any,
        ref_tokens: Any,
        new_loss: Any,
        new_tokens: Any,
        weights: Any = None,
    ) -> Paired:
        """From array-likes of shape (samples,) (one part) or (parts, samples); equal weights
        unless given."""
        arrays = [np.atleast_2d(np.asarray(a, dtype=np.float64)) for a in (ref_loss, ref_tokens)]
        arrays += [np.atleast_2d(np.asarray(a, dtype=np.float64)) for a in (new_loss, new_tokens)]
        if len({a.shape for a in arrays}) != 1 or arrays[0].ndim != 2:
            raise ValueError(f"paired arrays differ in shape: {[a.shape for a in arrays]}")
        parts = arrays[0].shape[0]
        w = np.full(parts, 1.0 / parts) if weights is None else np.asarray(weights, float)
        if w.shape != (parts,):
            raise ValueError(f"weights has shape {w.shape}, expected ({parts},)")
        return cls(*arrays, weights=w / w.sum())

    @property
    def n_samples(self) -> int:
        """Samples evaluated by both cells in at least one part."""
        both = (self.ref_tokens > 0) & (self.new_tokens > 0)
        return int(both.any(axis=0).sum())


@dataclass(frozen=True)
class Effect:
    """A paired effect (new minus reference, nats per token) with its 95% interval."""

    effect: float
    lo: float
    hi: float
    n_seeds: int
    n_samples: int
    method: str
    resolved: bool


def _weighted_effects(p: Paired, counts: np.ndarray) -> np.ndarray:
    """The effect of ``p`` under sample multiplicities ``counts`` (resamples, samples)."""
    sums = [counts @ a.T for a in (p.ref_loss, p.ref_tokens, p.new_loss, p.new_tokens)]
    valid = (sums[1] > 0) & (sums[3] > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        diff = np.where(valid, sums[2] / sums[3] - sums[0] / sums[1], 0.0)
        weight = valid * p.weights
        return (diff * weight).sum(axis=1) / weight.sum(axis=1)


def seed_effect(p: Paired) -> float:
    """The point effect of one seed: the weighted mean of its parts' loss differences (NaN when
    no part has paired tokens)."""
    return float(_weighted_effects(p, np.ones((1, p.ref_loss.shape[1])))[0])


def _bootstrap(p: Paired, n_boot: int, rng: np.random.Generator, chunk: int = 256) -> np.ndarray:
    """``n_boot`` effects of ``p`` on samples drawn with replacement (one draw of sample columns
    for all parts), as count matrices, ``chunk`` resamples at a time."""
    n = p.ref_loss.shape[1]
    out = []
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        idx = rng.integers(0, n, size=(b, n)) + n * np.arange(b)[:, None]
        counts = np.bincount(idx.ravel(), minlength=b * n).reshape(b, n).astype(np.float64)
        out.append(_weighted_effects(p, counts))
    return np.concatenate(out)


def paired_effect(seeds: Sequence[Paired], n_boot: int = N_BOOT, rng_seed: int = 0) -> Effect:
    """The effect over seeds (the mean of the per-seed effects) and its 95% interval: a t
    interval over seeds with 2+ seeds, else a paired bootstrap over the samples (module doc).
    Seeds without paired tokens are left out; none left raises ``ValueError``."""
    kept = [(p, seed_effect(p)) for p in seeds]
    kept = [(p, e) for p, e in kept if math.isfinite(e)]
    if not kept:
        raise ValueError("no seed has paired samples with tokens")
    effects = np.array([e for _, e in kept])
    n_samples = sum(p.n_samples for p, _ in kept)
    mean = float(effects.mean())
    if len(kept) >= 2:
        lo, hi = t_interval(effects)
        method = METHOD_T
    else:
        boot = _bootstrap(kept[0][0], n_boot, np.random.default_rng(rng_seed))
        lo, hi = (float(x) for x in np.nanquantile(boot, [0.025, 0.975]))
        method = METHOD_BOOTSTRAP
    resolved = bool(lo > 0 or hi < 0)
    if method == METHOD_BOOTSTRAP and n_samples < MIN_BOOTSTRAP_SAMPLES:
        resolved = False  # too few samples for a percentile bootstrap to mean anything
    return Effect(mean, lo, hi, len(kept), n_samples, method, resolved)


def t_interval(effects: Any) -> tuple[float, float]:
    """The 95% Student t interval of the mean of 2 or more per-seed effects."""
    effects = np.asarray(effects, dtype=np.float64)
    half = t975(len(effects) - 1) * float(effects.std(ddof=1)) / math.sqrt(len(effects))
    return float(effects.mean()) - half, float(effects.mean()) + half


# --- a sweep ----------------------------------------------------------------------------------

# A cell at one round: (model, client, test) -> sample id -> (loss_sum, tokens, length).
View = dict[tuple[str, str, str], dict[str, tuple[float, int, int]]]
# The parts of a scope in one view: part name -> sample id -> (loss_sum, tokens, length).
Parts = dict[str, dict[str, tuple[float, int, int]]]


@dataclass(frozen=True)
class EffectRow:
    """One row of ``effects.csv``: the effect of ``knob = value`` against ``reference``."""

    knob: str
    value: Any
    reference: Any
    model: str  # global | local-mean | local:<client>
    scope: str  # all | length <label> | own | rouge-l | token-f1 (scores: higher = better)
    round: int | str  # the round compared ("3,4" where pairs ended at different rounds)
    effect: float
    lo: float
    hi: float
    n_seeds: int
    n_samples: int
    method: str
    resolved: bool


@dataclass(frozen=True)
class _Scope:
    model: str
    scope: str
    select: Callable[[View], Parts]
    bucket: int | None = None  # index of the length bucket, None = all samples


def _key(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=repr)


def _text(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, str | int | float | bool):
        return str(value)
    return json.dumps(value, separators=(",", ":"), default=repr)


def _view(losses: SampleLosses, rnd: int) -> View:
    view: View = {}
    for i in np.flatnonzero(losses.round == rnd):
        group = view.setdefault((losses.model[i], losses.client[i], losses.test[i]), {})
        group[losses.sample[i]] = (
            float(losses.loss_sum[i]),
            int(losses.tokens[i]),
            int(losses.length[i]),
        )
    return view


def _local(view: View, own: bool, only: str | None = None) -> Parts:
    return {
        client: group
        for (model, client, test), group in view.items()
        if model == "local" and (test == client if own else test == GLOBAL)
        if only is None or client == only
    }


def _scopes(edges: Sequence[int], clients: Iterable[str], measure: str) -> list[_Scope]:
    def global_parts(view: View) -> Parts:
        group = view.get(("global", "", GLOBAL))
        return {"": group} if group else {}

    scopes = [_Scope("global", "all", global_parts)]
    if edges:
        scopes += [
            _Scope("global", f"length {bucket_label(i, edges, measure)}", global_parts, i)
            for i in range(len(edges) + 1)
        ]
    scopes += [
        _Scope("local-mean", "all", lambda v: _local(v, own=False)),
        _Scope("local-mean", "own", lambda v: _local(v, own=True)),
    ]
    scopes += [
        _Scope(f"local:{c}", "own", lambda v, c=c: _local(v, own=True, only=c))
        for c in sorted(clients)
    ]
    return scopes


def _aligned(ref: Parts, new: Parts, edges: Sequence[int], bucket: int | None) -> dict:
    """Part -> sorted sample ids both cells evaluated (in the bucket, by the reference's
    length); parts left empty are dropped."""
    out = {}
    for part in sorted(ref.keys() & new.keys()):
        ids = sorted(ref[part].keys() & new[part].keys())
        if bucket is not None:
            ids = [s for s in ids if bisect.bisect_right(edges, ref[part][s][2]) == bucket]
        if ids:
            out[part] = ids
    return out


def _seed_paired(pairs: list[tuple[Parts, Parts, dict]]) -> Paired | None:
    """One Paired of a seed's pairs: columns = the union of their sample ids, one row per
    (pair, part), each pair weighing the same and its parts equally."""
    pairs = [p for p in pairs if p[2]]
    if not pairs:
        return None
    ids = sorted({s for _, _, aligned in pairs for part_ids in aligned.values() for s in part_ids})
    col = {s: j for j, s in enumerate(ids)}
    n_rows = sum(len(aligned) for _, _, aligned in pairs)
    mats = np.zeros((4, n_rows, len(ids)))
    weights = np.zeros(n_rows)
    row = 0
    for ref, new, aligned in pairs:
        for part, part_ids in aligned.items():
            for s in part_ids:
                j = col[s]
                mats[0, row, j], mats[1, row, j] = ref[part][s][:2]
                mats[2, row, j], mats[3, row, j] = new[part][s][:2]
            weights[row] = 1.0 / (len(pairs) * len(aligned))
            row += 1
    return Paired(*mats, weights=weights)


class _Cells:
    """The cells' per-sample losses, each file read once and each (cell, round) viewed once."""

    def __init__(self) -> None:
        self._losses: dict[Path, SampleLosses] = {}
        self._views: dict[tuple[Path, int], View] = {}
        self._scores: dict[Path, dict[int, dict[str, Parts]]] = {}

    def losses(self, run_dir: Path) -> SampleLosses:
        if run_dir not in self._losses:
            self._losses[run_dir] = read_sample_losses(Path(run_dir) / FILE_NAME)
        return self._losses[run_dir]

    def view(self, run_dir: Path, rnd: int) -> View:
        if (run_dir, rnd) not in self._views:
            self._views[(run_dir, rnd)] = _view(self.losses(run_dir), rnd)
        return self._views[(run_dir, rnd)]

    def scores(self, run_dir: Path) -> dict[int, dict[str, Parts]]:
        """Round -> generation scope -> the global model's part ``""`` -> sample id ->
        (score, 1, 0), from the cell's ``generation`` records (none: no ``metrics.jsonl``)."""
        if run_dir not in self._scores:
            self._scores[run_dir] = _generation_scores(Path(run_dir) / "metrics.jsonl")
        return self._scores[run_dir]


def _generation_scores(path: Path) -> dict[int, dict[str, Parts]]:
    if not path.is_file():
        return {}
    out: dict[int, dict[str, Parts]] = {}
    for rec in of_kind(read_metrics(path), Kind.GENERATION):
        if rec.get("model") != "global":
            continue
        out[int(rec["round"])] = {
            scope: {"": {s: (float(v), 1, 0) for s, v in zip(rec["samples"], rec[name],
                                                             strict=True)}}
            for scope, name in GENERATION_SCOPES.items()
        }  # fmt: skip
    return out


def _knobs(cells: Sequence[tuple[dict[str, Any], Path]]) -> dict[str, list[Any]]:
    """Grid key -> its distinct values in the sweep's order, for keys other than ``seed`` with
    two or more values."""
    values: dict[str, dict[str, Any]] = {}
    for cell_values, _ in cells:
        for key, value in cell_values.items():
            values.setdefault(key, {}).setdefault(_key(value), value)
    return {k: list(v.values()) for k, v in values.items() if k != SEED_KEY and len(v) >= 2}


def _references(knobs: dict[str, list[Any]], reference: dict[str, Any] | None) -> dict[str, Any]:
    reference = dict(reference or {})
    unknown = sorted(set(reference) - set(knobs))
    if unknown:
        raise ValueError(f"reference names {unknown}, not knobs of the sweep ({sorted(knobs)})")
    for key, value in reference.items():
        if _key(value) not in {_key(v) for v in knobs[key]}:
            raise ValueError(f"reference {key}={_text(value)} is not one of {knobs[key]}")
    return {k: reference.get(k, vs[0]) for k, vs in knobs.items()}


def _pairs(cells, knob: str, ref: Any, value: Any) -> dict[str, list[tuple[Path, Path]]]:
    """Seed -> the (reference cell, new cell) run directories matched on every other key."""
    by_values = {_key(v): d for v, d in cells}
    out: dict[str, list[tuple[Path, Path]]] = {}
    for cell_values, run_dir in cells:
        if knob in cell_values and _key(cell_values[knob]) == _key(ref):
            new_dir = by_values.get(_key({**cell_values, knob: value}))
            if new_dir is not None:
                seed = _key(cell_values.get(SEED_KEY))
                out.setdefault(seed, []).append((run_dir, new_dir))
    return out


def _round_of(store: _Cells, ref_dir: Path, new_dir: Path, rnd: int | None) -> int | None:
    return _pick_round(store.losses(ref_dir).rounds() & store.losses(new_dir).rounds(), rnd)


def _pick_round(common: set[int], rnd: int | None) -> int | None:
    """``rnd`` when both cells hold it, by default the last round both hold; else None."""
    if rnd is not None:
        return rnd if rnd in common else None
    return max(common) if common else None


def _used(rounds: set[int]) -> int | str:
    """The ``round`` column: the round compared, ``"3,4"`` where pairs ended apart."""
    return min(rounds) if len(rounds) == 1 else ",".join(map(str, sorted(rounds)))


def _rows_of(
    knob, value, ref, by_seed, store, edges, rnd, n_boot, rng_seed, measure
) -> list[EffectRow]:
    views = {}  # seed -> [(ref view, new view)], at each pair's round
    rounds = set()
    for seed, dirs in by_seed.items():
        for ref_dir, new_dir in dirs:
            r = _round_of(store, ref_dir, new_dir, rnd)
            if r is not None:
                views.setdefault(seed, []).append((store.view(ref_dir, r), store.view(new_dir, r)))
                rounds.add(r)
    clients = {c for pairs in views.values() for a, b in pairs for c in _local(a, True)}
    rows = []
    for scope in _scopes(edges, clients, measure):
        seeds = []
        for pairs in views.values():
            parts = [(scope.select(a), scope.select(b)) for a, b in pairs]
            paired = _seed_paired([(a, b, _aligned(a, b, edges, scope.bucket)) for a, b in parts])
            if paired is not None:
                seeds.append(paired)
        if not seeds:
            continue
        e = paired_effect(seeds, n_boot=n_boot, rng_seed=rng_seed)
        rows.append(EffectRow(knob, value, ref, scope.model, scope.scope, _used(rounds),
                              *_fields(e)))  # fmt: skip
    return rows


def _own_gain(store: _Cells, run_dir: Path, rnd: int) -> tuple[float, int] | None:
    """A cell's mean over clients of (its local model's loss at ``rnd`` minus the initial
    model's, on the samples of the client's own test set both evaluated), and their count;
    None without round-0 losses on the clients' test sets."""
    final, start = store.view(run_dir, rnd), store.view(run_dir, 0)
    gains, n = [], 0
    for client, group in _local(final, own=True).items():
        base = start.get(("global", "", client), {})
        ids = sorted(group.keys() & base.keys())
        tokens = sum(group[s][1] for s in ids)
        if tokens:
            gains.append(sum(group[s][0] - base[s][0] for s in ids) / tokens)
            n += len(ids)
    return (float(np.mean(gains)), n) if gains else None


def _own_ids(store: _Cells, run_dir: Path, rnd: int) -> dict[str, frozenset[str]]:
    return {c: frozenset(g) for c, g in _local(store.view(run_dir, rnd), own=True).items()}


def _gain_rows(knob, value, ref, by_seed, store, rnd) -> list[EffectRow]:
    """The ``own-gain`` row (module doc): what local training gained on the clients' own test
    sets, new cell minus reference cell, per seed; a t interval over 2 or more seeds."""
    effects, n, rounds, moved = [], 0, set(), False
    for dirs in by_seed.values():
        diffs = []
        for ref_dir, new_dir in dirs:
            r = _round_of(store, ref_dir, new_dir, rnd)
            a = _own_gain(store, ref_dir, r) if r else None
            b = _own_gain(store, new_dir, r) if r else None
            if a and b:
                diffs.append(b[0] - a[0])
                n, rounds = n + b[1], rounds | {r}
                moved |= _own_ids(store, ref_dir, r) != _own_ids(store, new_dir, r)
        if diffs:
            effects.append(float(np.mean(diffs)))
    if len(effects) < 2 or not moved:
        # one seed: the cells' samples differ, nothing to pair a bootstrap on; the same own
        # test sets in both cells: the gains' difference is the paired `own` row
        return []
    lo, hi = t_interval(effects)
    return [EffectRow(knob, value, ref, "local-mean", GAIN_SCOPE, _used(rounds),
                      float(np.mean(effects)), lo, hi, len(effects), n, METHOD_T,
                      bool(lo > 0 or hi < 0))]  # fmt: skip


def _generation_rows(knob, value, ref, by_seed, store, rnd, n_boot, rng_seed) -> list[EffectRow]:
    """The rows of the generation scopes (module doc), where both cells of a pair generated."""
    views: dict[str, list[tuple[dict, dict]]] = {}  # seed -> [(ref scores, new scores)]
    rounds = set()
    for seed, dirs in by_seed.items():
        for ref_dir, new_dir in dirs:
            a, b = store.scores(ref_dir), store.scores(new_dir)
            r = _pick_round(a.keys() & b.keys(), rnd)
            if r is not None:
                views.setdefault(seed, []).append((a[r], b[r]))
                rounds.add(r)
    rows = []
    for scope in GENERATION_SCOPES:
        seeds = []
        for pairs in views.values():
            parts = [(a[scope], b[scope]) for a, b in pairs]
            paired = _seed_paired([(a, b, _aligned(a, b, (), None)) for a, b in parts])
            if paired is not None:
                seeds.append(paired)
        if seeds:
            e = paired_effect(seeds, n_boot=n_boot, rng_seed=rng_seed)
            rows.append(EffectRow(knob, value, ref, "global", scope, _used(rounds), *_fields(e)))
    return rows


def _fields(e: Effect) -> tuple:
    return tuple(getattr(e, f.name) for f in fields(e))


def sweep_effects(
    cells: Sequence[tuple[dict[str, Any], Path]],
    reference: dict[str, Any] | None = None,
    edges: Sequence[int] = (),
    round: int | None = None,
    n_boot: int = N_BOOT,
    rng_seed: int = 0,
    measure: str = "tokens",
) -> list[EffectRow]:
    """Effects of every knob of a sweep: every grid key other than ``seed`` with two or more
    values, each value against the knob's reference (``reference[key]``, by default the first
    value in the cells' order), in every scope that has paired samples (module doc). ``cells``:
    (grid values, run directory holding ``sample_losses.csv``). ``round``: the round compared
    (a pair that lacks it is left out), by default the last round both cells of a pair hold.
    ``edges`` are in the unit of ``measure`` (the ``partition`` record's ``length_measure``),
    that of the samples' ``length`` column."""
    cells = [(dict(v), Path(d)) for v, d in cells]
    knobs = _knobs(cells)
    references = _references(knobs, reference)
    store = _Cells()
    rows: list[EffectRow] = []
    for knob, values in knobs.items():
        ref = references[knob]
        for value in values:
            if _key(value) == _key(ref):
                continue
            by_seed = _pairs(cells, knob, ref, value)
            rows += _rows_of(
                knob, value, ref, by_seed, store, edges, round, n_boot, rng_seed, measure
            )
            rows += _gain_rows(knob, value, ref, by_seed, store, round)
            rows += _generation_rows(knob, value, ref, by_seed, store, round, n_boot, rng_seed)
    return rows


# --- outputs ----------------------------------------------------------------------------------


def _csv_value(name: str, value: Any) -> Any:
    if name in ("value", "reference"):
        return _text(value)
    if name == "resolved":
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def write_effects_csv(rows: Sequence[EffectRow], path: str | Path) -> Path:
    """``effects.csv``: one line per row, columns :data:`EFFECT_COLUMNS`; returns the path."""
    path = Path(path)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(EFFECT_COLUMNS)
        for row in rows:
            writer.writerow([_csv_value(c, getattr(row, c)) for c in EFFECT_COLUMNS])
    return path


def higher_is_better(row: EffectRow) -> bool:
    """Whether a positive effect is an improvement: the generation scores' rows (the loss rows:
    negative = better)."""
    return row.scope in GENERATION_SCOPES


def scope_words(model: str, scope: str) -> str:
    """``global model, all samples``, ``mean local model, own test sets``, ``global model,
    ROUGE-L of greedy answers (higher = better)``, ..."""
    if model == "global":
        if scope in GENERATION_SCOPES:
            return f"global model, {_SCORE_NAMES[scope]} of greedy answers (higher = better)"
        if scope == "all":
            return "global model, all samples"
        return f"global model, samples of {scope}"
    if model == "local-mean":
        if scope == GAIN_SCOPE:
            return "mean local model, own test sets, gain over the initial model"
        return "mean local model, " + ("global test set" if scope == "all" else "own test sets")
    client = model.removeprefix("local:")
    return f"{client}'s local model, " + ("global test set" if scope == "all" else "own test set")


def row_label(row: EffectRow) -> str:
    """``alpha_len 1.0 vs 0.1 — global model, all samples`` (the knob's last dotted part)."""
    knob = row.knob.rsplit(".", 1)[-1]
    label = f"{knob} {_text(row.value)} vs {_text(row.reference)} — "
    label += scope_words(row.model, row.scope)
    return label + (" (1 seed)" if row.method == METHOD_BOOTSTRAP else "")
