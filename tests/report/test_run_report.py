"""The run report of a tiny run (tiny Llama, builtin corpus): what it says about what was and was
not measured, the length buckets' sample counts, the clients' and the data's counts in words."""

from __future__ import annotations

import csv
import json
import re

import matplotlib.pyplot as plt
import pytest

from cllora.cli import main
from cllora.report.html import DATA_WORDS, WORDS, make_report
from cllora.report.metrics import read_metrics
from cllora.report.plots import bucket_sizes, buckets_figure, rounds_figure
from cllora.report.records import GLOBAL
from tests.conftest import records_of, tiny_run_overrides


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """One round, no local evaluation, one test sample per client (the builtin corpus's field
    partition: five clients)."""
    tmp = tmp_path_factory.mktemp("runs")
    one = {"fed__rounds": 1, "train__local_steps": 1, "partition__max_test_per_client": 1}
    overrides = tiny_run_overrides(tmp, run_name="r", eval__local="false", **one)
    assert main(["run", *overrides]) == 0
    make_report(tmp / "r")
    return tmp / "r"


def _page(run_dir) -> str:
    return (run_dir / "report" / "report.html").read_text()


def test_the_report_says_what_was_not_measured_and_shows_config_and_timing(run_dir):
    page = _page(run_dir)
    assert "<b>Not measured:</b> local models (eval.local=false); " in page
    assert "generation (eval.generate_samples=0)" in page
    assert "<details><summary>config.yaml" in page and "local: false" in page
    timing = json.loads((run_dir / "timing.json").read_text())
    assert "<th>phase</th><th>wall (s)</th><th>CPU (s)</th>" in page
    assert f"<tr><td>total</td><td>{timing['total']:.4g}</td>" in page


def test_the_local_models_panel_says_why_it_is_empty(run_dir):
    fig = rounds_figure(read_metrics(run_dir / "metrics.jsonl"), "eval.local=false")
    texts = [t.get_text() for t in fig.axes[1].texts]
    plt.close(fig)
    assert texts == ["local models were not evaluated: eval.local=false"]


def test_every_bucket_bar_shows_its_samples(run_dir):
    records = read_metrics(run_dir / "metrics.jsonl")
    (sets,) = [r["sets"] for r in records if r["kind"] == "test_samples"]
    sizes = bucket_sizes(records)
    assert sum(sizes.values()) == len(sets[GLOBAL]["samples"]) == 5
    fig = buckets_figure(records)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.texts]
    plt.close(fig)
    assert len(labels) == len(ax.patches) == 2 * sum(n > 0 for n in sizes.values())
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == [f"n={sizes[b]}" for b in ticks] * 2  # round 0, then the last round


def test_clients_and_data_tables_read_as_words(run_dir):
    page = _page(run_dir)
    columns = next(csv.reader((run_dir / "clients.csv").open()))
    (part,) = records_of(run_dir, "partition")
    assert [c for c in columns if c not in WORDS] == []
    assert [f for f in part if f not in DATA_WORDS and f != "kind"] == []
    cells = re.findall(r"<td>(.*?)</td>", page)
    assert "[]" not in cells and not [c for c in cells if re.search(r"\d:\d", c)]
    assert "&lt;92: " in page or "%, " in page  # the bucket shares, as percentages


def test_one_count_of_samples_cut_to_their_window(run_dir):
    """The data level counted samples cut at the measuring cap as "truncated" (0) beside the
    clients' samples cut to their window; now each has its own name, and the sum is one number."""
    (part,) = records_of(run_dir, "partition")
    clients = records_of(run_dir, "client_stats")
    assert "truncated" not in part and part["measure_truncated"] == 0
    assert part["train_truncated"] == sum(c["truncated"] for c in clients) > 0
    row = f"<tr><td>{WORDS['train_truncated']}</td><td>{part['train_truncated']}</td></tr>"
    assert row in _page(run_dir)
    log = (run_dir / "run.log").read_text()
    assert f"train truncated {part['train_truncated']}," in log


def test_a_client_with_one_test_sample_is_warned_once_and_marked(run_dir):
    clients = [c["client"] for c in records_of(run_dir, "client_stats")]
    log = (run_dir / "run.log").read_text()
    for name in clients:
        assert log.count(f"WARNING cllora: client {name} has 1 test sample(s)") == 1
    page = _page(run_dir)
    assert page.count("<td>1 &#9888;</td>") == len(clients)
    assert "fewer than 2 test samples" in page
