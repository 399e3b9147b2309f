"""``cllora report DIR``: PNG plots and one self-contained HTML page for a run or a sweep.

Usage::

    cllora report runs/my-run          # -> runs/my-run/report/report.html and *.png
    cllora report runs/length          # a sweep directory: every cell's report, plus the sweep's

    from cllora.report.html import make_report
    make_report(Path("runs/length"))   # returns the path of report.html

A **run** report opens with what was run and what came out (the global model's loss at round 0
and at the end, the last local models'), then the global and local models' loss vs round, the
train loss per local step, the loss by length bucket, the per-client table (``clients.csv``, a
client per column) and the data's counts. A **sweep** report (a directory holding
``sweep.yaml``) opens with the cells finished and the grid, then the paired **effects** of each
grid key other than ``seed`` (a sentence, a forest plot, a table; ``report/effects.csv`` and
``report/effects.md``), then per key the levels (final global and mean local losses, the change
from round 0, the final loss by length bucket, mean +- std over the seeds) and a table of every
cell (``report/cells.md``) with links to the cells' own reports. Column names are in words
(:data:`WORDS`; the CSV files keep theirs). Images are embedded (base64), so
``report.html`` can be mailed on its own.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import html
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml

from cllora.data.partition import bucket_sort_key
from cllora.data.pipeline import FEW_TEST
from cllora.report.metrics import read_metrics
from cllora.report.plots import forest_plot, plot_buckets, plot_knob, plot_rounds, plot_train_loss
from cllora.report.records import GLOBAL, OWN, Kind
from cllora.report.sample_losses import FILE_NAME as SAMPLE_LOSSES

# Nothing may widen the page (tests/report/test_browser.py opens it in Chromium): a table or the
# config.yaml block wider than the text scrolls inside its own box; a long word (a path) wraps.
_STYLE = (
    "body{font-family:sans-serif;max-width:1100px;margin:auto;padding:1em;line-height:1.4;"
    "overflow-wrap:break-word}pre{max-width:100%;overflow-x:auto}"
    "table{border-collapse:collapse;font-size:12px;display:block;max-width:100%;overflow-x:auto}"
    "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}"
    "th{background:#eee;white-space:normal;vertical-align:bottom}"
    "td:first-child,th:first-child{text-align:left}img{max-width:100%}"
    ".lead{font-size:15px;background:#f6f6f0;border-left:4px solid #999;padding:.5em 1em}"
)

# Column names in words (tables of the reports; the CSV files keep their names).
WORDS = {
    "client": "client", "round": "round", "cell": "cell",
    "global": "global model, global test", "global_loss": "global model, global test",
    "global_ppl": "global model perplexity", "global_round0": "same, round 0",
    "global_change": "change since round 0", "global_on_own": "global model, clients' tests",
    "local_own": "local models, own tests", "local_global": "local models, global test",
    "mean_tv_len": "length skew (mean TV distance)", "cv_samples": "size spread (CV)",
    "mean_corrupted": "mean corrupted share", "std_corrupted": "spread of corrupted share",
    "train_samples": "training samples", "test_samples": "test samples",
    "train_tokens": "training tokens", "len_mean": "mean length (tokens)",
    "len_median": "median length", "len_p90": "90th percentile length",
    "sentences": "sentences", "sentences_per_sample": "sentences per sample",
    "window": "context window (tokens)", "truncated": "cut to the window",
    "dropped": "dropped (too long)", "corruption_rate": "corruption rate (set)",
    "corrupted": "corrupted share", "operators": "corruption operators",
    "quality": "quality score (1/ppl)", "tv_len": "length skew (TV distance)",
    "hist": "length histogram", "records": "records read", "samples": "samples",
    "dropped_overlong": "dropped (too long)", "dropped_no_target": "dropped (no target)",
    "malformed_skipped": "malformed, skipped", "malformed_examples": "malformed examples",
    "test_truncated": "test samples cut", "test_dropped": "test samples dropped",
    "global_test": "held-out test samples", "global_test_truncated": "held-out samples cut",
    "global_test_dropped": "held-out samples dropped", "length_buckets": "length bucket edges",
    "length_measure": "length measured in", "bucket_counts": "training samples per length bucket",
    "tv_asked": "length skew asked (TV distance)", "discarded": "corrupted samples dropped",
    "measure_truncated": "cut when measured (longer than the measuring cap)",
    "train_truncated": "training samples cut to their window (all clients)",
    "train_dropped": "training samples dropped at their window (all clients)",
    "excluded_overlong": "left out (longer than the window)", "pool": "training pool (samples)",
    "allocation": "allocation", "draw": "pool draw",
}  # fmt: skip
# The data table's names where a field means something else there than in the clients' table:
# runs before the data-level count was named measure_truncated called it "truncated".
DATA_WORDS = {**WORDS, "truncated": WORDS["measure_truncated"]}
SHARES, COUNTS = "hist", "bucket_counts"  # clients.csv's per-bucket columns ("<92:0.25 ...")


def words(name: str, table: dict[str, str] = WORDS) -> str:
    """A column name in words: ``table``, ``loss[c]`` = the global model on client c's test,
    ``global[b]`` = on length bucket b; other names with spaces for underscores."""
    if name in table:
        return table[name]
    for prefix, text in (("loss[", "global model, test of "), ("global[", "global model, ")):
        if name.startswith(prefix) and name.endswith("]"):
            return text + name[len(prefix) : -1]
    return name.replace("_", " ")


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<p><img alt="{path.stem}" src="data:image/png;base64,{data}"></p>'


class Raw(str):
    """Table cell content that is already HTML (not escaped)."""


def _fmt(v: Any) -> str:
    if isinstance(v, Raw):
        return str(v)
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.4g}"
    return html.escape(str(v))


def readable(column: str, value: Any) -> Any:
    """A table cell's value in words: a list as its items (an empty one as "—"), a client's
    bucket shares (``hist``: ``"<92:0.25 92-129:0.08"``) as ``"<92: 25%, 92-129: 8%"`` and its
    bucket counts the same way, its corruption operators (``"swap:3 noise:1"``) as
    ``"swap: 3, noise: 1"`` (none: "—"), buckets in order of length; anything else as it is."""
    if isinstance(value, list):
        return ", ".join(map(str, value)) or "—"
    if column not in (SHARES, COUNTS, "operators") or not isinstance(value, str):
        return value
    pairs = [item.rpartition(":")[::2] for item in value.split()]
    if column != "operators":
        pairs.sort(key=lambda p: bucket_sort_key(p[0]))
    if column == SHARES:
        pairs = [(label, f"{float(share):.0%}") for label, share in pairs]
    return ", ".join(f"{label}: {v}" for label, v in pairs) or "—"


def _table(rows: list[dict[str, Any]], key: str | None = None) -> str:
    """An HTML table with its column names in words. ``key``: a wide table (more columns than
    rows and over 8 of them) is turned so that each row of ``rows`` is a column headed by its
    ``key`` value and each field a row, which keeps it inside the page."""
    if not rows:
        return "<p>(none)</p>"
    cols = list(rows[0])
    if key is not None and len(cols) > max(8, len(rows) + 1):
        name = lambda v: f"{words(key)} {v}" if isinstance(v, int | float) else str(v)  # noqa: E731
        rows = [{"": Raw(html.escape(words(c))), **{name(r[key]): r.get(c, "") for r in rows}}
                for c in cols if c != key]  # fmt: skip
        cols = list(rows[0])
        head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    else:
        head = "".join(f"<th>{html.escape(words(c))}</th>" for c in cols)
    body = "".join(
        "<tr>" + "".join(f"<td>{_fmt(r.get(c, ''))}</td>" for c in cols) + "</tr>" for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Rows as a Markdown table (numbers to 4 significant digits); also written as cells.md."""
    if not rows:
        return ""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_md(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _md(v: Any) -> str:
    """A Markdown table cell: numbers as in HTML, text as it is (only ``|`` escaped)."""
    if isinstance(v, float):
        return _fmt(v)
    return str(v).replace("|", "\\|")


def _page(title: str, parts: list[str]) -> str:
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        # no icon: without this line a browser asks the server for /favicon.ico (a 404)
        "<link rel='icon' href='data:,'>"
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>"
        f"<body><h1>{html.escape(title)}</h1>{''.join(parts)}</body></html>"
    )


def _read_csv(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = list(csv.DictReader(path.open(encoding="utf-8")))
    for r in rows:
        for k, v in r.items():
            with contextlib.suppress(ValueError, TypeError):
                r[k] = float(v) if "." in v or "e" in v or v == "nan" else int(v)
    return rows


def run_report(run_dir: Path) -> Path:
    """Plots and ``report/report.html`` of one run directory."""
    records = read_metrics(run_dir / "metrics.jsonl")
    cfg = _config(run_dir)
    out = run_dir / "report"
    out.mkdir(exist_ok=True)
    part = next((r for r in records if r["kind"] == Kind.PARTITION), {})
    local_first = _setting(cfg, "eval", "local_global_samples") if "global_test" in part else 0
    no_local = "" if _setting(cfg, "eval", "local") else "eval.local=false"
    pngs = [
        plot_rounds(records, out / "rounds.png", no_local),
        plot_train_loss(records, out / "train_loss.png"),
        plot_buckets(records, out / "buckets.png", local_first),
    ]
    clients = _read_csv(run_dir / "clients.csv")
    parts = [
        _run_headline(run_dir, records), _not_measured(cfg),
        "<h2>Loss vs round</h2>", _img(pngs[0]), _img(pngs[1]),
        "<h2>By length bucket</h2>", _img(pngs[2]),
        "<h2>Clients</h2>", _clients_table(clients),
        "<h2>Data and heterogeneity</h2>", _data_table(part, clients),
        "<h2>Rounds (global model; mean local models)</h2>",
        _table(_read_csv(run_dir / "summary.csv"), key="round"),
        "<h2>Time</h2>", _timing_table(run_dir / "timing.json"),
        "<h2>Configuration</h2>", _config_block(run_dir / "config.yaml"),
    ]  # fmt: skip
    path = out / "report.html"
    path.write_text(_page(f"cllora run {run_dir.name}", parts), encoding="utf-8")
    return path


def _config(run_dir: Path) -> dict[str, Any]:
    """A run's resolved ``config.yaml`` as a dict (empty when it is missing or unreadable)."""
    with contextlib.suppress(OSError, yaml.YAMLError):
        return yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    return {}


def _setting(cfg: dict[str, Any], section: str, key: str) -> Any:
    """``cfg[section][key]``, or the default of :class:`cllora.config.Config` where the file
    does not hold it (a run of an older version)."""
    from cllora.config import Config

    default = getattr(getattr(Config(), section), key)
    return (cfg.get(section) or {}).get(key, default)


def not_measured(cfg: dict[str, Any]) -> list[str]:
    """What a run's configuration left unmeasured, each with the setting that says so:
    ``["local models (eval.local=false)", "generation (eval.generate_samples=0)", ...]``."""
    gaps = []
    if not _setting(cfg, "eval", "local"):
        gaps.append("local models (eval.local=false)")
    elif _setting(cfg, "eval", "local_rounds") == "last":
        gaps.append("local models before the last round (eval.local_rounds=last)")
    if _setting(cfg, "eval", "global_rounds") == "last":
        gaps.append("the global model between round 0 and the last (eval.global_rounds=last)")
    if not _setting(cfg, "fed", "eval_initial"):
        gaps.append("the global model at round 0 (fed.eval_initial=false)")
    if not _setting(cfg, "eval", "generate_samples"):
        gaps.append("generation (eval.generate_samples=0)")
    if not _setting(cfg, "quality", "score_samples"):
        gaps.append("the clients' quality score (quality.score_samples=0)")
    return gaps


def _not_measured(cfg: dict[str, Any]) -> str:
    gaps = not_measured(cfg)
    return f"<p><b>Not measured:</b> {html.escape('; '.join(gaps))}.</p>" if gaps else ""


def _clients_table(rows: list[dict[str, Any]]) -> str:
    """The clients' table (a client per column, its values in words), a client with fewer than
    :data:`FEW_TEST` test samples marked, and a note that says what the mark means."""
    few = [r["client"] for r in rows if isinstance(r.get("test_samples"), int)
           and r["test_samples"] < FEW_TEST]  # fmt: skip
    shown = []
    for r in rows:
        row = {k: readable(k, v) for k, v in r.items()}
        if r["client"] in few:
            row["test_samples"] = Raw(f"{r['test_samples']} &#9888;")
        shown.append(row)
    note = ""
    if few:
        note = (
            f"<p>&#9888; fewer than {FEW_TEST} test samples "
            f"({html.escape(', '.join(map(str, few)))}): such a client's own test loss is "
            "one sample's (or none), not an estimate.</p>"
        )
    return _table(shown, key="client") + note


def _data_table(part: dict[str, Any], clients: list[dict[str, Any]]) -> str:
    """The partition record's counts in words. The training samples cut to their windows are the
    clients' own counts summed (the data level counts only the samples cut when measured, at
    the measuring cap): computed from ``clients.csv`` for runs that did not record the sum."""
    fields = {k: v for k, v in part.items() if k != "kind"}
    if "train_truncated" not in fields and clients and "truncated" in clients[0]:
        fields["train_truncated"] = sum(int(r["truncated"]) for r in clients)
    return _table([{"field": Raw(html.escape(words(k, DATA_WORDS))), "value": readable(k, v)}
                   for k, v in fields.items()])  # fmt: skip


def _timing_table(path: Path) -> str:
    """``timing.json`` (seconds per phase, wall and CPU) as a small table."""
    try:
        timing = json.loads(path.read_text())
    except (OSError, ValueError):
        return "<p>(no timing.json: the run did not finish)</p>"
    cpu = timing.get("cpu", {})
    rows = [{"phase": k, "wall (s)": float(v), "CPU (s)": float(cpu.get(k, math.nan))}
            for k, v in timing.items() if isinstance(v, int | float)]  # fmt: skip
    return _table(rows)


def _config_block(path: Path) -> str:
    """The run's resolved ``config.yaml``, folded (a click opens it)."""
    try:
        text = path.read_text()
    except OSError:
        return "<p>(no config.yaml)</p>"
    return (
        "<details><summary>config.yaml (the resolved configuration of the run)</summary>"
        f"<pre>{html.escape(text)}</pre></details>"
    )


def _run_headline(run_dir: Path, records: list[dict[str, Any]]) -> str:
    """What was run and what came out, in two sentences, above everything else."""
    cfg = _config(run_dir)
    get = lambda section, key, default="?": (cfg.get(section) or {}).get(key, default)  # noqa: E731
    clients = sorted({r["client"] for r in records if r["kind"] == Kind.GLOBAL_EVAL} - {GLOBAL})
    ran = (
        f"{html.escape(str(get('model', 'name')))} with LoRA r={get('lora', 'r')}, "
        f"{len(clients)} clients ({html.escape(str(get('partition', 'method')))} partition), "
        f"{get('fed', 'rounds')} rounds of {html.escape(str(get('fed', 'strategy')))}, "
        f"{get('train', 'local_steps')} local steps of batch {get('train', 'batch_size')}, "
        f"{get('data', 'max_length')}-token windows, seed {cfg.get('seed', '?')}."
    )
    glob = [r for r in records if r["kind"] == Kind.GLOBAL_EVAL and r["client"] == GLOBAL]
    if not glob:
        return f"<p class='lead'>Ran: {ran} No evaluation is recorded yet.</p>"
    f = _final(records)
    came = (
        f"The global model's test loss went from {f['global_round0']:.4f} at round "
        f"{glob[0]['round']} to {f['global']:.4f} at round {f['round']} "
        f"({f['global_change']:+.4f} nats per token)"
    )
    if not math.isnan(f["local_own"]):
        came += (
            f"; the last local models scored {f['local_own']:.4f} on their own test sets and "
            f"{f['local_global']:.4f} on the global one"
        )
    return f"<p class='lead'><b>Ran:</b> {ran}<br><b>Result:</b> {came}.</p>"


def _final(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Final-round summary of one run: global loss, mean local losses, per-bucket global loss."""
    glob = [r for r in records if r["kind"] == Kind.GLOBAL_EVAL and r["client"] == GLOBAL]
    last = max(r["round"] for r in glob)
    final = next(r for r in glob if r["round"] == last)
    loc = [r for r in records if r["kind"] == Kind.LOCAL_EVAL and r["round"] == last]
    own = [r["loss"] for r in loc if r["test"] == OWN]
    on_glob = [r["loss"] for r in loc if r["test"] == GLOBAL]
    part = next((r for r in records if r["kind"] == Kind.PARTITION), {})
    per_client = [
        r["loss"]
        for r in records
        if r["kind"] == Kind.GLOBAL_EVAL and r["round"] == last and r["client"] != GLOBAL
    ]
    return {
        "round": last,
        "global": final["loss"],
        "global_round0": glob[0]["loss"],
        "global_change": final["loss"] - glob[0]["loss"],
        "global_on_own": sum(per_client) / len(per_client) if per_client else math.nan,
        "local_own": sum(own) / len(own) if own else math.nan,
        "local_global": sum(on_glob) / len(on_glob) if on_glob else math.nan,
        "buckets": {
            k: final["buckets"][k]["loss"]
            for k in sorted(final.get("buckets", {}), key=bucket_sort_key)
        },
        **{
            k: part[k]
            for k in ("mean_tv_len", "cv_samples", "mean_corrupted", "std_corrupted")
            if k in part
        },
    }


def sweep_effect_rows(root: Path, finished: list[dict[str, Any]]) -> list[Any]:
    """The paired effects (:func:`cllora.report.effects.sweep_effects`) of a sweep's ``finished``
    cells (entries of ``sweep.yaml``'s ``cells``) that hold per-sample losses, with the length
    buckets and measure of their partition; what ``report/effects.csv`` holds."""
    from cllora.report.effects import sweep_effects

    dirs = [(c, root / "cells" / c["name"]) for c in finished]
    dirs = [(c, d) for c, d in dirs if (d / SAMPLE_LOSSES).is_file()]
    if not dirs:
        return []
    edges, measure = length_buckets(dirs[0][1])
    return sweep_effects([(c["values"], d) for c, d in dirs], edges=edges, measure=measure)


def length_buckets(run_dir: Path) -> tuple[list[int], str]:
    """The length-bucket edges of a run's partition and their measure (tokens or sentences)."""
    records = read_metrics(run_dir / "metrics.jsonl")
    part = next((r for r in records if r["kind"] == Kind.PARTITION), {})
    return part.get("length_buckets", []), part.get("length_measure", "tokens")


def effects_table(rows: list[Any]) -> list[dict[str, Any]]:
    """The effect rows as the report shows them: comparison, effect, interval, seeds, samples,
    resolved (``report/effects.md`` is :func:`markdown_table` of it)."""
    from cllora.report.effects import row_label

    return [
        {
            "comparison": row_label(r),
            "effect": r.effect,
            "95% interval": f"[{r.lo:.4f}, {r.hi:.4f}]",
            "seeds": r.n_seeds,
            "samples": r.n_samples,
            "resolved": "yes" if r.resolved else "no",
        }
        for r in rows
    ]


def _effects_section(root: Path, spec: dict[str, Any], finished: list[dict]) -> list[str]:
    """The paired effects of the finished cells (``report/effects.csv`` and ``effects.md``, a
    forest plot, a table that says which are resolved); nothing when no cell has per-sample
    losses."""
    from cllora.report.effects import write_effects_csv

    rows = sweep_effect_rows(root, finished)
    if not rows:
        return []
    out = root / "report"
    write_effects_csv(rows, out / "effects.csv")
    resolved = sum(r.resolved for r in rows)
    table = effects_table(rows)
    (out / "effects.md").write_text(markdown_table(table), encoding="utf-8")  # for docs
    return [
        "<h2>Effects</h2>",
        f"<p>{resolved} of {len(rows)} paired effects are resolved (their 95% interval excludes "
        "0). An effect is the loss with a knob's value minus the loss with its reference value "
        "(the first in the grid), on the same test samples, for the same seed, in nats per "
        "token; negative = better. Rows marked (higher = better) are generation scores "
        "(ROUGE-L, token F1 in [0, 1]): the score difference, positive = better, plotted on a "
        "panel of their own under an axis that says so. Intervals: "
        "Student t over the seeds' paired effects (cllora/report/effects.py); also in "
        f"effects.csv. Where a knob has no effect, about 1 interval in 20 excludes 0 by chance "
        f"(here about {len(rows) / 20:.1f} of the {len(rows)} rows): a lone resolved row among "
        "many, a length bucket especially, is a candidate to replicate on new seeds.</p>",
        _img(forest_plot(rows, out / "effects.png")),
        _table(table),
    ]


def _short(values: dict[str, Any]) -> str:
    """A cell's grid values, each key by its last part: ``alpha_len=0.1, seed=0``."""
    return ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in values.items())


def _headline(spec: dict[str, Any], n_done: int) -> str:
    """What the sweep ran: its grid in words and how many cells finished."""
    values: dict[str, list[str]] = {k: [] for k in spec["keys"]}
    for c in spec["cells"]:
        for k in values:
            text = str(c["values"].get(k))
            if text not in values[k]:
                values[k].append(text)
    grid = "; ".join(f"{html.escape(k)}: {html.escape(', '.join(vs))}" for k, vs in values.items())
    done = f"{n_done} of {len(spec['cells'])} cells finished."
    return f"<p class='lead'><b>{done}</b> Grid: {grid}.</p>"


def _study_section(root: Path, out: Path) -> list[str]:
    """A study sweep (``study.yaml``): its controls, primary and exploratory endpoints, apart
    (:mod:`cllora.report.study`; also ``report/study.md`` and ``report/study.csv``)."""
    if not (root / "study.yaml").is_file():
        return []
    from cllora.report.study import (
        analyse_study,
        instrument_status,
        study_header,
        study_tables,
        write_study,
    )  # fmt: skip

    def plain(text: str) -> str:  # the tables' markdown emphasis, dropped
        return text.replace("**", "").replace("`", "")

    def table(name: str) -> str:
        head, lines = tables[name]
        return _table([{h: plain(v) for h, v in zip(head, ln, strict=True)} for ln in lines])

    study = analyse_study(root)
    write_study(study, out)
    tables = study_tables(study)
    return [
        "<h2>Study: the instrument (controls)</h2>", f"<p>{html.escape(study_header(study))}</p>",
        f"<p><b>{html.escape(plain(instrument_status(study)))}</b></p>", table("controls"),
        "<h2>Study: primary endpoints (Holm over the family)</h2>", table("primary"),
        "<h2>Study: exploratory (no correction)</h2>", table("exploratory"),
        "<h2>Study: length skew asked and delivered</h2>", table("skew"),
    ]  # fmt: skip


def sweep_report(root: Path) -> Path:
    """Every finished cell's run report, then the sweep's plots and ``report/report.html``."""
    spec = yaml.safe_load((root / "sweep.yaml").read_text())
    out = root / "report"
    out.mkdir(exist_ok=True)
    cells = []
    for c in spec["cells"]:
        run_dir = root / "cells" / c["name"]
        if (run_dir / "summary.csv").is_file():
            run_report(run_dir)
            cells.append((c, _final(read_metrics(run_dir / "metrics.jsonl"))))
    parts = [_headline(spec, len(cells)), *_study_section(root, out),
             *_effects_section(root, spec, [c for c, _ in cells])]  # fmt: skip
    for knob in [k for k in spec["keys"] if k != "seed"]:
        points: dict[Any, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        buckets: dict[Any, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        change: dict[Any, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        for c, f in cells:
            x = c["values"][knob]
            x = x if isinstance(x, int | float) else str(x)
            points[x]["global model"].append(f["global"])
            change[x]["global model, final - round 0"].append(f["global_change"])
            points[x]["mean local (own test)"].append(f["local_own"])
            points[x]["mean local (global test)"].append(f["local_global"])
            for b, loss in f["buckets"].items():
                buckets[x][f"global, {b}"].append(loss)
        xs = [x for x in points if isinstance(x, int | float)]
        log_x = len(xs) == len(points) and min(xs) > 0 and max(xs) / min(xs) >= 20
        safe = knob.replace(".", "_")
        parts += [f"<h2>Levels by {html.escape(knob)}</h2>",
                  "<p>Absolute losses per value, mean and spread over the seeds: the spread "
                  "between seeds is often larger than an effect, which is why the Effects compare "
                  "cells of the same seed on the same samples.</p>",
                  _img(plot_knob(points, knob, out / f"knob_{safe}.png", log_x)),
                  _img(plot_knob(change, knob, out / f"change_{safe}.png", log_x,
                                 "change since round 0", "final - round 0 (nats per token)")),
                  _img(plot_knob(buckets, knob, out / f"buckets_{safe}.png", log_x,
                                 "final loss by length bucket"))]  # fmt: skip
    rows = [{"cell": Raw(f"<a href='../cells/{c['name']}/report/report.html'>"
                         f"{html.escape(_short(c['values']))}</a>"),
             **{k: v for k, v in f.items() if k not in ("buckets", "round")}}
            for c, f in cells]  # fmt: skip
    parts += ["<h2>Cells (final round; loss in nats per token)</h2>", _table(rows)]
    plain = []
    labels = sorted({b for _, f in cells for b in f["buckets"]}, key=bucket_sort_key)
    for c, f in cells:
        per_bucket = {f"global[{b}]": f["buckets"].get(b, math.nan) for b in labels}
        scalars = {k: v for k, v in f.items() if k != "buckets"}
        plain.append({"cell": c["name"], **scalars, **per_bucket})
    (out / "cells.md").write_text(markdown_table(plain), encoding="utf-8")
    path = out / "report.html"
    path.write_text(_page(f"cllora sweep {spec['name']}", parts), encoding="utf-8")
    return path


def make_report(path: Path) -> Path:
    """A sweep report for a directory with ``sweep.yaml``, else a run report."""
    path = Path(path)
    if (path / "sweep.yaml").is_file():
        return sweep_report(path)
    if (path / "metrics.jsonl").is_file():
        return run_report(path)
    raise FileNotFoundError(f"{path} holds neither a run (metrics.jsonl) nor a sweep (sweep.yaml)")
