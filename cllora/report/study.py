"""A study's declared endpoints: controls first, a Holm-corrected primary family, equivalence
bounds for every "no effect", exploratory effects apart.

Usage::

    from cllora.report.study import analyse_study, study_blocks, write_study
    study = analyse_study("runs/study/crn")   # reads <sweep>/study.yaml and the finished cells
    study.instrument_ok                       # negative control not resolved, positive resolved
    write_study(study, "runs/study/crn/report")   # study.md and study.csv (`cllora report` does it)
    blocks = study_blocks(study)              # {"controls": md, "primary": md, ...}

**Declaration.** A sweep file's ``sweep.study`` (examples/study/crn.yaml) declares, before any
cell runs: ``alpha``, ``margin`` (the smallest effect that matters, nats per token), the
``controls`` (``expect: none``, tested two-sided, or ``expect: effect`` with the test the
control predicts), the ``primary`` family and the ``exploratory``
rows. The first ``cllora sweep`` freezes it in ``<sweep>/study.yaml`` with the time
(:func:`cllora.sweep.declare_study`); this module reads only that frozen copy. Each row names an
``arm`` (a ``sweep.arms`` name), optionally ``vs`` (the arm it is compared with, on the same
seed), optionally ``arm2`` / ``vs2`` (a difference of two contrasts: an interaction), an
``endpoint`` and a ``test``: ``differs`` (two-sided), ``greater`` / ``less`` (one-sided, the
sign the claim predicts) or ``equivalent`` (two one-sided tests at ``margin``).

**Endpoints** (nats per token, lower = better; every one on the held-out set, which is the same
samples in every arm of a seed, at the last round):

- ``global``: the global model's token-weighted loss.
- ``local-heldout``: the mean over clients of each local model's loss (the samples local models
  read, ``eval.local_global_samples``).
- ``local-own-gain``: what local training gained on each client's *own* distribution: per
  client, sum over length buckets of its training share times (its local model's loss minus the
  initial model's) on the held-out samples of that bucket; the mean over clients.
- ``global-minus-local``: ``global`` minus ``local-own-gain``; its contrast between two arms is
  the interaction "moves the global model more than local training".
- ``worst-client``: the global model's loss on the worst-off client's own distribution (the
  bucket mix of its training samples), the maximum over clients. Between arms whose clients hold
  different mixes this compares different data (under ``pathological`` the worst client holds
  the hardest bucket alone, under ``iid`` every client holds the mix), so its contrast measures
  the partition as much as the model; ``worst-client-paired`` is the model effect.
- ``worst-client-paired``: the global model's loss on the mix of the row's ``arm``'s worst-off
  client, the same mix for both sides of the contrast: "does this federation serve its worst-off
  client worse than the other would serve the same data?".
- ``corrupted-minus-clean`` (one arm): the mean local model of clients with a corruption rate > 0
  minus that of clean clients, on the held-out set.
- ``own-minus-other`` (one arm): per client, on its own buckets, its local model's loss minus
  the mean of the other clients' local models; the mean over clients (negative = specialised).

**Inference.** A row's per-seed value is the endpoint of ``arm`` minus that of ``vs`` (minus
``arm2 - vs2``) on one seed; over seeds, :func:`cllora.report.stats.seed_test` (t, S - 1 degrees
of freedom). Primary: Holm over the family at ``alpha``; a row is *resolved* when its Holm test
rejects, and its Holm interval (the level at which Holm tested it) then excludes 0; the tables
also give each row's TOST p-value at the margin. A not-resolved effect test reads "no effect
beyond +-margin" only when its TOST rejects at the same Holm level, else "cannot tell"; an
``equivalent`` test reads "equivalent" when its TOST survives Holm, "effect" when the two-sided
test does, else "cannot tell". Controls are tested alone at ``alpha`` (no family): the negative
must not be resolved, the positive must be. When a control misbehaves the report says so above
everything else: a study whose positive control is not resolved cannot tell an effect from
noise, and says that instead of "cannot tell". Exploratory rows: unadjusted 95% intervals, the
same verdict words, never a claim.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from cllora.data.partition import bucket_index
from cllora.data.readers import DataError
from cllora.report.metrics import read_metrics
from cllora.report.records import GLOBAL, Kind, of_kind
from cllora.report.sample_losses import FILE_NAME, read_sample_losses
from cllora.report.stats import SeedTest, holm, holm_levels, seed_test

STUDY_FILE = "study.yaml"
TESTS = ("differs", "greater", "less", "equivalent")
ROLES = ("control", "primary", "exploratory")
CSV_COLUMNS = ("role", "id", "claim", "contrast", "endpoint", "test", "n_seeds", "effect", "lo",
               "hi", "adj_lo", "adj_hi", "p", "p_adjusted", "p_equivalent", "margin", "verdict",
               "per_seed")  # fmt: skip


# --- one cell -----------------------------------------------------------------------------


@dataclass
class CellData:
    """What the endpoints read of one finished cell (held-out set, last round)."""

    global_loss: dict[str, tuple[float, int]]  # sample -> (loss_sum, tokens), global model
    initial: dict[str, tuple[float, int]]  # the same at round 0
    local: dict[str, dict[str, tuple[float, int]]]  # client -> sample -> (loss_sum, tokens)
    bucket: dict[str, int]  # sample -> length bucket
    shares: dict[str, np.ndarray]  # client -> its training samples' share per bucket
    corruption: dict[str, float]  # client -> corruption rate asked


def _shares(counts: str) -> np.ndarray:
    values = np.array([float(part.rsplit(":", 1)[1]) for part in counts.split()], dtype=float)
    return values / values.sum()


def read_cell(run_dir: Path) -> CellData:
    """The held-out losses, buckets and client mixes of one run directory."""
    losses = read_sample_losses(run_dir / FILE_NAME)
    records = read_metrics(run_dir / "metrics.jsonl")
    (part,) = of_kind(records, Kind.PARTITION)[:1] or [{}]
    edges = part.get("length_buckets") or []
    last = int(max(losses.round))
    glob: dict[str, tuple[float, int]] = {}
    init: dict[str, tuple[float, int]] = {}
    local: dict[str, dict[str, tuple[float, int]]] = {}
    bucket: dict[str, int] = {}
    for i in range(len(losses.sample)):
        if losses.test[i] != GLOBAL:
            continue
        sid, value = losses.sample[i], (float(losses.loss_sum[i]), int(losses.tokens[i]))
        bucket[sid] = bucket_index(int(losses.length[i]), edges)
        rnd, model = int(losses.round[i]), losses.model[i]
        if model == "global" and rnd == last:
            glob[sid] = value
        elif model == "global" and rnd == 0:
            init[sid] = value
        elif model == "local" and rnd == last:
            local.setdefault(losses.client[i], {})[sid] = value
    with (run_dir / "clients.csv").open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    shares = {r["client"]: _shares(r["bucket_counts"]) for r in rows}
    corruption = {r["client"]: float(r["corruption_rate"]) for r in rows}
    return CellData(glob, init, local, bucket, shares, corruption)


def _loss(values: dict[str, tuple[float, int]], ids: set[str]) -> float:
    picked = [values[i] for i in ids if i in values]
    tokens = sum(t for _, t in picked)
    return sum(s for s, _ in picked) / tokens if tokens else math.nan


def _by_bucket(cell: CellData, values: dict[str, tuple[float, int]], ids: set[str]) -> np.ndarray:
    n = max(len(s) for s in cell.shares.values())
    out = np.full(n, math.nan)
    for b in range(n):
        out[b] = _loss(values, {i for i in ids if cell.bucket.get(i) == b})
    return out


def _weighted(shares: np.ndarray, per_bucket: np.ndarray) -> float:
    ok = np.isfinite(per_bucket) & (shares > 0)
    return float((shares[ok] * per_bucket[ok]).sum() / shares[ok].sum()) if ok.any() else math.nan


def _local_ids(cell: CellData, ids: set[str]) -> set[str]:
    common = set(ids)
    for values in cell.local.values():
        common &= set(values)
    return common


# --- endpoints ----------------------------------------------------------------------------


def _global(cell: CellData, ids: set[str]) -> float:
    return _loss(cell.global_loss, ids)


def _local_heldout(cell: CellData, ids: set[str]) -> float:
    ids = _local_ids(cell, ids)
    return float(np.mean([_loss(v, ids) for v in cell.local.values()]))


def _own_gain(cell: CellData, ids: set[str]) -> float:
    ids = _local_ids(cell, ids)
    start = _by_bucket(cell, cell.initial, ids)
    gains = [
        _weighted(cell.shares[c], _by_bucket(cell, values, ids) - start)
        for c, values in cell.local.items()
    ]
    return float(np.mean(gains))


def _global_minus_local(cell: CellData, ids: set[str]) -> float:
    return _global(cell, ids) - _own_gain(cell, ids)


def _worst_client(cell: CellData, ids: set[str]) -> float:
    per_bucket = _by_bucket(cell, cell.global_loss, ids)
    return max(_weighted(share, per_bucket) for share in cell.shares.values())


def _worst_client_paired(cell: CellData, ids: set[str], clients: CellData) -> float:
    """The global model of ``cell`` on the data mix of the worst-off client of ``clients`` (the
    row's ``arm``): both arms of a contrast are scored on the same client's mix."""
    own = _by_bucket(clients, clients.global_loss, ids)
    worst = max(clients.shares.values(), key=lambda share: _weighted(share, own))
    return _weighted(worst, _by_bucket(cell, cell.global_loss, ids))


def _corrupted_minus_clean(cell: CellData, ids: set[str]) -> float:
    ids = _local_ids(cell, ids)
    bad = [_loss(v, ids) for c, v in cell.local.items() if cell.corruption.get(c, 0) > 0]
    good = [_loss(v, ids) for c, v in cell.local.items() if cell.corruption.get(c, 0) == 0]
    if not bad or not good:
        raise DataError("corrupted-minus-clean needs corrupted and clean clients in the arm")
    return float(np.mean(bad) - np.mean(good))


def _own_minus_other(cell: CellData, ids: set[str]) -> float:
    ids = _local_ids(cell, ids)
    per = {c: _by_bucket(cell, v, ids) for c, v in cell.local.items()}
    out = []
    for c, mine in per.items():
        others = np.nanmean([v for k, v in per.items() if k != c], axis=0)
        out.append(_weighted(cell.shares[c], mine - others))
    return float(np.mean(out))


ENDPOINTS: dict[str, Callable[[CellData, set[str]], float]] = {
    "global": _global,
    "local-heldout": _local_heldout,
    "local-own-gain": _own_gain,
    "global-minus-local": _global_minus_local,
    "worst-client": _worst_client,
    "corrupted-minus-clean": _corrupted_minus_clean,
    "own-minus-other": _own_minus_other,
}
# Endpoints that score a cell's models on the clients of the row's arm (its first cell), so that
# both sides of a contrast read the same data mix.
ON_ARM_CLIENTS: dict[str, Callable[[CellData, set[str], CellData], float]] = {
    "worst-client-paired": _worst_client_paired,
}


# --- the declaration ----------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One declared comparison."""

    role: str  # control / primary / exploratory
    id: str
    claim: str
    arm: str
    endpoint: str
    test: str
    vs: str | None = None
    arm2: str | None = None
    vs2: str | None = None
    expect: str | None = None  # controls: "none" or "effect"

    @property
    def contrast(self) -> str:
        one = f"{self.arm} - {self.vs}" if self.vs else self.arm
        if self.arm2:
            two = f"{self.arm2} - {self.vs2}" if self.vs2 else self.arm2
            return f"({one}) - ({two})"
        return one

    @property
    def arms(self) -> list[str]:
        return [a for a in (self.arm, self.vs, self.arm2, self.vs2) if a]


def _row(role: str, spec: Any, arms: Sequence[str]) -> Row:
    if not isinstance(spec, dict):
        raise DataError(f"study: a {role} row must be a mapping, got {spec!r}")
    known = {"id", "claim", "arm", "vs", "arm2", "vs2", "endpoint", "test", "expect"}
    unknown = set(spec) - known
    if unknown:
        raise DataError(f"study row {spec.get('id')}: unknown key(s) {sorted(unknown)}")
    test = spec.get("test", "differs")
    if role == "control":
        expect = spec.get("expect")
        if expect not in ("none", "effect"):
            raise DataError(f"study control {spec.get('id')}: expect must be none or effect")
        if test == "equivalent" or (expect == "none" and test != "differs"):
            raise DataError(
                f"study control {spec.get('id')}: a negative control is tested two-sided "
                "(test: differs); a positive one with differs, greater or less"
            )
    row = Row(role=role, id=str(spec.get("id")), claim=str(spec.get("claim", "")),
              arm=spec.get("arm"), vs=spec.get("vs"), arm2=spec.get("arm2"),
              vs2=spec.get("vs2"), endpoint=spec.get("endpoint"), test=test,
              expect=spec.get("expect"))  # fmt: skip
    if row.endpoint not in ENDPOINTS and row.endpoint not in ON_ARM_CLIENTS:
        allowed = ", ".join([*ENDPOINTS, *ON_ARM_CLIENTS])
        raise DataError(f"study row {row.id}: endpoint {row.endpoint!r}; allowed: {allowed}")
    if row.test not in TESTS:
        raise DataError(f"study row {row.id}: test {row.test!r}; allowed: {', '.join(TESTS)}")
    missing = [a for a in row.arms if a not in arms]
    if not row.arm or missing:
        raise DataError(f"study row {row.id}: arm(s) {missing or [None]} not in sweep.arms")
    return row


@dataclass
class Declaration:
    declared_at: str
    alpha: float
    margin: float
    rows: list[Row]


def parse_declaration(spec: Any, arms: Sequence[str], declared_at: str = "") -> Declaration:
    """A ``sweep.study`` mapping checked against the sweep's arms (:class:`DataError` naming
    the row on a mistake; ``cllora sweep`` calls it before any cell runs)."""
    if not isinstance(spec, dict):
        raise DataError(f"sweep.study must be a mapping, got {spec!r}")
    unknown = set(spec) - {"alpha", "margin", "controls", "primary", "exploratory"}
    if unknown:
        raise DataError(f"sweep.study: unknown key(s) {sorted(map(str, unknown))}")
    rows = [_row("control", s, arms) for s in spec.get("controls") or []]
    rows += [_row("primary", s, arms) for s in spec.get("primary") or []]
    rows += [_row("exploratory", s, arms) for s in spec.get("exploratory") or []]
    ids = [r.id for r in rows]
    if len(set(ids)) != len(ids):
        raise DataError(f"sweep.study: row ids must be distinct, got {ids}")
    alpha, margin = float(spec.get("alpha", 0.05)), float(spec.get("margin", 0.0))
    if not 0 < alpha < 1 or margin < 0:
        raise DataError(f"sweep.study: alpha must be in (0, 1) and margin >= 0 ({alpha}, {margin})")
    return Declaration(declared_at, alpha, margin, rows)


def read_declaration(sweep_dir: Path, arms: Sequence[str]) -> Declaration:
    """The frozen ``study.yaml`` of a sweep, checked against its arms."""
    path = sweep_dir / STUDY_FILE
    if not path.is_file():
        raise DataError(f"{sweep_dir}: no {STUDY_FILE}; a study sweep declares sweep.study")
    frozen = yaml.safe_load(path.read_text()) or {}
    return parse_declaration(frozen.get("study") or {}, arms, str(frozen.get("declared_at", "?")))


# --- analysis -----------------------------------------------------------------------------


@dataclass
class Result:
    row: Row
    test: SeedTest
    seeds: list[Any]
    p: float = math.nan  # the p-value of the row's test (TOST for `equivalent`)
    p_adjusted: float = math.nan  # Holm (primary), else = p
    level: float = 0.05  # the level the row was tested at (Holm's step for primaries)
    adj: tuple[float, float] = (math.nan, math.nan)  # the interval at that level
    verdict: str = ""
    behaved: bool | None = None  # controls: did it do what it must


@dataclass
class Study:
    name: str
    declaration: Declaration
    results: list[Result]
    skew: list[dict[str, Any]] = field(default_factory=list)  # per arm: asked / delivered

    def of(self, role: str) -> list[Result]:
        return [r for r in self.results if r.row.role == role]

    @property
    def instrument_ok(self) -> bool:
        return all(r.behaved for r in self.of("control"))


def _cells(sweep_dir: Path) -> tuple[dict[tuple[Any, str], Path], list[str]]:
    spec = yaml.safe_load((sweep_dir / "sweep.yaml").read_text())
    cells: dict[tuple[Any, str], Path] = {}
    arms: list[str] = []
    for c in spec["cells"]:
        values = c["values"]
        arm = values.get("arm")
        if arm is None:
            raise DataError(f"{sweep_dir}: a study sweep needs sweep.arms (cell {c['name']})")
        if arm not in arms:
            arms.append(arm)
        run_dir = sweep_dir / "cells" / c["name"]
        if (run_dir / "summary.csv").is_file() and (run_dir / FILE_NAME).is_file():
            cells[(values.get("seed"), arm)] = run_dir
    return cells, arms


def _p_of(row: Row, t: SeedTest) -> float:
    return {"differs": t.p_two, "greater": t.p_greater, "less": t.p_less,
            "equivalent": t.p_equivalent}[row.test]  # fmt: skip


def _sides(row: Row) -> str:
    return row.test if row.test in ("greater", "less") else "two"


def _verdict(row: Row, t: SeedTest, level: float, margin: float, rejected: bool) -> str:
    if t.n < 2:
        return "not enough seeds"
    equivalent = t.p_equivalent < level
    if row.test == "equivalent":
        if rejected:
            return f"equivalent within ±{margin:g}"
        return "effect (not equivalent)" if t.p_two < level else "cannot tell"
    if rejected:
        return "effect: worse" if t.mean > 0 else "effect: better"
    return f"no effect beyond ±{margin:g}" if equivalent else "cannot tell"


def _test_rows(rows: Sequence[Row], values: dict[str, list[float]], seeds: dict[str, list],
               decl: Declaration, family: bool) -> list[Result]:  # fmt: skip
    tests = [seed_test(values[r.id], decl.margin) for r in rows]
    ps = [_p_of(r, t) if t.n >= 2 else 1.0 for r, t in zip(rows, tests, strict=True)]
    adjusted = holm(ps) if family else ps
    ps = [p if t.n >= 2 else math.nan for p, t in zip(ps, tests, strict=True)]
    adjusted = [p if t.n >= 2 else math.nan for p, t in zip(adjusted, tests, strict=True)]
    levels = holm_levels(ps, decl.alpha) if family else [decl.alpha] * len(ps)
    out = []
    for r, t, p, p_adj, level in zip(rows, tests, ps, adjusted, levels, strict=True):
        rejected = bool(p_adj < decl.alpha)  # NaN (too few seeds): not rejected
        # the interval at the level the row was tested at (two-sided for `equivalent`: its
        # TOST verdict reads p_equivalent, so the table's interval keeps one meaning)
        adj = t.interval(1 - level, _sides(r))
        res = Result(r, t, seeds[r.id], p, p_adj, level, adj,
                     _verdict(r, t, level, decl.margin, rejected))  # fmt: skip
        if r.role == "control":
            res.behaved = (not rejected) if r.expect == "none" else rejected
        out.append(res)
    return out


def _skew(cells: dict[tuple[Any, str], Path], arms: Sequence[str]) -> list[dict[str, Any]]:
    out = []
    for arm in arms:
        asked, delivered = [], []
        for (_, a), run_dir in cells.items():
            if a != arm:
                continue
            with (run_dir / "clients.csv").open(newline="", encoding="utf-8") as fh:
                for r in csv.DictReader(fh):
                    delivered.append(float(r["tv_len"]))
                    asked.append(float(r.get("tv_asked") or "nan"))
        if delivered:
            out.append({"arm": arm, "asked": float(np.mean(asked)),
                        "delivered": float(np.mean(delivered)),
                        "delivered_min": min(delivered),
                        "delivered_max": max(delivered)})  # fmt: skip
    return out


def _endpoint(name: str, arm: CellData) -> Callable[[CellData, set[str]], float]:
    if name in ON_ARM_CLIENTS:
        paired = ON_ARM_CLIENTS[name]
        return lambda cell, ids: paired(cell, ids, arm)
    return ENDPOINTS[name]


def analyse_study(sweep_dir: str | Path) -> Study:
    """Every declared row of a study sweep, from its finished cells (see the module doc)."""
    sweep_dir = Path(sweep_dir)
    cells, arms = _cells(sweep_dir)
    decl = read_declaration(sweep_dir, arms)
    seeds = sorted({s for s, _ in cells}, key=lambda s: (str(type(s)), s))
    cache: dict[Path, CellData] = {}

    def cell(seed: Any, arm: str) -> CellData:
        path = cells[(seed, arm)]
        if path not in cache:
            cache[path] = read_cell(path)
        return cache[path]

    values: dict[str, list[float]] = {}
    used: dict[str, list] = {}
    for row in decl.rows:
        values[row.id], used[row.id] = [], []
        for seed in seeds:
            if any((seed, a) not in cells for a in row.arms):
                continue
            ids = set.intersection(*(set(cell(seed, a).global_loss) for a in row.arms))
            fn = _endpoint(row.endpoint, cell(seed, row.arm))
            v = fn(cell(seed, row.arm), ids)
            if row.vs:
                v -= fn(cell(seed, row.vs), ids)
            if row.arm2:
                fn = _endpoint(row.endpoint, cell(seed, row.arm2))
                v2 = fn(cell(seed, row.arm2), ids)
                v -= v2 - (fn(cell(seed, row.vs2), ids) if row.vs2 else 0.0)
            values[row.id].append(v)
            used[row.id].append(seed)
    results = []
    for role in ROLES:
        rows = [r for r in decl.rows if r.role == role]
        results += _test_rows(rows, values, used, decl, family=role == "primary")
    return Study(sweep_dir.name, decl, results, _skew(cells, arms))


# --- output -------------------------------------------------------------------------------


def _f(x: float) -> str:
    if math.isinf(x):
        return "+inf" if x > 0 else "-inf"
    return "—" if math.isnan(x) else f"{x:+.4f}"


def _interval(lo: float, hi: float) -> str:
    if math.isnan(lo) or math.isnan(hi):
        return "—"
    return f"{'(' if math.isinf(lo) else '['}{_f(lo)}, {_f(hi)}{')' if math.isinf(hi) else ']'}"


def _p(x: float) -> str:
    return "—" if not math.isfinite(x) else ("<0.0001" if x < 1e-4 else f"{x:.4f}")


def _per_seed(r: Result) -> str:
    return ", ".join(f"{e:+.3f}" for e in r.test.effects)


def _table(header: Sequence[str], lines: Sequence[Sequence[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(line) + " |" for line in lines]
    return "\n".join(out)


def _failed_controls(failed: Sequence[Result]) -> str:
    """What a misbehaving control means for the rows below it (the top of the report)."""
    ids = ", ".join(r.row.id for r in failed)
    parts = [f"**The instrument failed its control(s) {ids}.**"]
    if any(r.row.expect == "none" for r in failed):
        parts.append("A negative control was resolved: false positives are not controlled, so "
                     "no effect below may be believed.")  # fmt: skip
    if any(r.row.expect == "effect" for r in failed):
        parts.append("The positive control was not resolved: the study could not detect an "
                     "effect known to exist, so its \"cannot tell\" rows say nothing for or "
                     "against the claims; only rows resolved, or bounded within the margin by "
                     "their TOST, carry information.")  # fmt: skip
    return " ".join(parts)


Table = tuple[list[str], list[list[str]]]  # header, rows (markdown emphasis in the cells)


def instrument_status(study: Study) -> str:
    """The sentence above every other result: calibrated, or what the failed control means."""
    if study.instrument_ok:
        return ("**The instrument is calibrated**: the negative control is not resolved and the "
                "positive control is.")  # fmt: skip
    return _failed_controls([r for r in study.of("control") if not r.behaved])


def study_tables(study: Study) -> dict[str, Table]:
    """The study's tables (controls, primary, exploratory, skew) as header and rows; the
    markdown blocks and the HTML report are both made from them."""
    tables: dict[str, Table] = {}
    lines = [[r.row.id, r.row.claim, f"`{r.row.contrast}`", r.row.endpoint, r.row.test,
              _f(r.test.mean), _interval(*r.adj), _p(r.p), _per_seed(r),
              "not resolved" if r.row.expect == "none" else "resolved",
              "**yes**" if r.behaved else "**NO**"]
             for r in study.of("control")]  # fmt: skip
    tables["controls"] = (["control", "claim", "contrast", "endpoint", "test", "effect",
                           "95% interval (the test's sides)", "p", "per seed", "must be",
                           "behaved"], lines)  # fmt: skip
    m = len(study.of("primary"))
    lines = [[r.row.id, r.row.claim, f"`{r.row.contrast}`", r.row.endpoint, r.row.test,
              _f(r.test.mean), _interval(r.test.lo, r.test.hi), _interval(*r.adj),
              _p(r.p_adjusted), _p(r.test.p_equivalent), _per_seed(r),
              f"**{r.verdict}**" if "effect:" in r.verdict or "equivalent within" in r.verdict
              or "no effect" in r.verdict else r.verdict]
             for r in study.of("primary")]  # fmt: skip
    tost = f"TOST p (±{study.declaration.margin:g})"
    tables["primary"] = (["id", "claim", "contrast", "endpoint", "test", "effect", "95% interval",
                          f"Holm interval (family of {m})", "Holm p", tost, "per seed",
                          "verdict"], lines)  # fmt: skip
    lines = [[r.row.id, r.row.claim, f"`{r.row.contrast}`", r.row.endpoint, r.row.test,
              _f(r.test.mean), _interval(*r.adj), _p(r.p),
              _p(r.test.p_equivalent), _per_seed(r), r.verdict]
             for r in study.of("exploratory")]  # fmt: skip
    tables["exploratory"] = (["id", "claim", "contrast", "endpoint", "test", "effect",
                              "95% interval (the test's sides)", "p", tost, "per seed",
                              "verdict"], lines)  # fmt: skip
    lines = [[s["arm"], _g(s["asked"]), _g(s["delivered"]),
              f"{s['delivered_min']:.2f}-{s['delivered_max']:.2f}"]
             for s in study.skew]  # fmt: skip
    tables["skew"] = (["arm", "skew asked (mean TV)", "delivered (mean TV)",
                       "delivered, per client"], lines)  # fmt: skip
    return tables


def study_header(study: Study) -> str:
    """When and how the study was declared, and how to read its effects."""
    d = study.declaration
    seeds = sorted({s for r in study.results for s in r.seeds}, key=lambda s: (str(type(s)), s))
    return (
        f"Declared {d.declared_at} (`study.yaml`: frozen before any cell finished); seeds "
        f"{', '.join(map(str, seeds))}; alpha = {d.alpha:g}; equivalence margin ±{d.margin:g} "
        "nats per token. Effects are arm minus comparison, in nats per token (negative = "
        "better), the mean of the per-seed paired effects on the held-out set."
    )


def study_blocks(study: Study) -> dict[str, str]:
    """The study's markdown, in named blocks (docs/findings.md embeds them verbatim and
    tests/test_findings.py checks they still equal what the result files give)."""
    blocks = {name: _table(*table) for name, table in study_tables(study).items()}
    blocks["controls"] = instrument_status(study) + "\n\n" + blocks["controls"]
    blocks["header"] = study_header(study)
    return blocks


def named_blocks(*studies: Study) -> dict[str, str]:
    """The blocks of several studies, each named ``SWEEP:NAME`` (``crn:controls``): what a
    document that reports more than one study embeds."""
    return {f"{s.name}:{k}": v for s in studies for k, v in study_blocks(s).items()}


def _g(x: float) -> str:
    return "—" if not math.isfinite(x) else f"{x:.2f}"


def study_markdown(study: Study) -> str:
    b = study_blocks(study)
    return "\n\n".join([
        f"# Study {study.name}", b["header"], "## The instrument: controls", b["controls"],
        "## Primary endpoints (Holm over the family)", b["primary"],
        "## Exploratory (95% intervals, no correction; hypotheses for a next study)",
        b["exploratory"], "## Skew asked and delivered (length buckets)", b["skew"],
    ]) + "\n"  # fmt: skip


def write_study(study: Study, out_dir: str | Path) -> list[Path]:
    """``study.md`` and ``study.csv`` (one row per declared comparison) under ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = out / "study.md"
    md.write_text(study_markdown(study), encoding="utf-8")
    path = out / "study.csv"
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(CSV_COLUMNS)
        for r in study.results:
            w.writerow([r.row.role, r.row.id, r.row.claim, r.row.contrast, r.row.endpoint,
                        r.row.test, r.test.n, r.test.mean, r.test.lo, r.test.hi, r.adj[0],
                        r.adj[1], r.p, r.p_adjusted, r.test.p_equivalent, r.test.margin,
                        r.verdict, " ".join(f"{e:.6f}" for e in r.test.effects)])  # fmt: skip
    return [md, path]


_BLOCK = re.compile(r"<!-- study:([\w:.-]+) -->\n(.*?)<!-- /study:\1 -->", re.S)


def embedded_blocks(markdown: str) -> dict[str, str]:
    """The study blocks a document embeds between ``<!-- study:NAME -->`` and
    ``<!-- /study:NAME -->``."""
    return {m.group(1): m.group(2).removesuffix("\n") for m in _BLOCK.finditer(markdown)}


def fill_blocks(markdown: str, blocks: dict[str, str]) -> str:
    """``markdown`` with every embedded block replaced by the fresh one of the same name."""
    return _BLOCK.sub(
        lambda m: (
            f"<!-- study:{m.group(1)} -->\n{blocks[m.group(1)]}\n<!-- /study:{m.group(1)} -->"
        ),
        markdown,
    )
