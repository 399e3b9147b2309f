"""Pieces of the per-client tables and reports that need no run."""

from __future__ import annotations

import pytest

from cllora.data.tables import count_sentences, heterogeneity_summary
from cllora.report.html import markdown_table


@pytest.mark.parametrize(
    "text, n",
    [
        ("Hello there. How are you? Fine", 3),
        ("Take 1.5 mg per day.", 1),
        ("Symptoms\n\n- fever\n- cough.", 2),
        ("", 0),
        ("...", 0),
    ],
)
def test_count_sentences(text, n):
    assert count_sentences(text) == n


def test_heterogeneity_summary():
    rows = [
        {"train_samples": 10, "corrupted": 0.0, "tv_len": 0.2},
        {"train_samples": 30, "corrupted": 0.5, "tv_len": 0.4},
    ]
    s = heterogeneity_summary(rows)
    assert s["mean_tv_len"] == pytest.approx(0.3) and s["cv_samples"] == pytest.approx(0.5)
    assert s["mean_corrupted"] == pytest.approx(0.25) and s["std_corrupted"] == pytest.approx(0.25)


def test_markdown_table():
    text = markdown_table([{"cell": "a=1", "loss": 2.345678}, {"cell": "a=2", "x": 1}])
    assert text.splitlines()[0] == "| cell | loss | x |"
    assert "| a=1 | 2.346 |  |" in text


def test_results_table_leaves_out_columns_that_are_nan_everywhere():
    from cllora.report.metrics import format_table

    nan = float("nan")
    rows = [
        {"round": 0, "global_loss": 2.5, "local_own": nan, "local_global": nan},
        {"round": 1, "global_loss": 2.25, "local_own": nan, "local_global": 2.0},
    ]
    header = format_table(rows).splitlines()[0].split()
    assert header == ["round", "global_loss", "local_global"]


def test_round_and_step_axes_tick_only_whole_numbers():
    import matplotlib.pyplot as plt

    from cllora.report.plots import _integer_x

    fig, ax = plt.subplots()
    ax.plot([0, 1, 2], [2.5, 2.4, 2.3])
    _integer_x(ax)
    fig.canvas.draw()
    ticks = [t for t in ax.get_xticks() if 0 <= t <= 2]
    plt.close(fig)
    assert ticks and all(float(t).is_integer() for t in ticks)


def test_column_names_read_as_words():
    from cllora.report.html import words

    assert words("global_change") == "change since round 0"
    assert words("loss[client-03]") == "global model, test of client-03"
    assert words("global[<128]") == "global model, <128"
    assert words("some_new_field") == "some new field"


def test_markdown_tables_keep_text_as_it_is():
    text = markdown_table([{"comparison": "length <128 | a", "effect": 0.0123456}])
    assert "| length <128 \\| a | 0.01235 |" in text


def test_bucket_labels_sort_by_length_not_as_text():
    from cllora.data.partition import bucket_labels, bucket_sort_key

    labels = bucket_labels([128, 256, 512])
    assert sorted(labels) != labels  # as text: "128-255", "256-511", "<128", ">=512"
    assert sorted(reversed(labels), key=bucket_sort_key) == ["<128", "128-255", "256-511", ">=512"]
    sent = bucket_labels([3, 6, 12], "sentences")
    assert sorted(sent[::-1], key=bucket_sort_key) == sent == ["<3sent", "3-5sent", "6-11sent",
                                                                ">=12sent"]  # fmt: skip
    assert sorted(["92-129", "all", ">=220", "<92"], key=bucket_sort_key)[0] == "all"


def test_sweep_legends_list_buckets_by_length():
    from cllora.report.plots import knob_figure

    points = {0.1: {f"global, {b}": [1.0] for b in ("128-255", "256-511", "<128", ">=512")}}
    fig = knob_figure(points, "alpha_len")
    legend = [t.get_text().split(" (n=")[0] for t in fig.axes[0].get_legend().get_texts()]
    assert legend == ["global, <128", "global, 128-255", "global, 256-511", "global, >=512"]


def test_table_values_read_as_words():
    from cllora.report.html import readable

    assert readable("malformed_examples", []) == "—"
    assert readable("length_buckets", [92, 130, 220]) == "92, 130, 220"
    shares = "92-129:0.08 <92:0.25 >=220:0.42 130-219:0.25"
    assert readable("hist", shares) == "<92: 25%, 92-129: 8%, 130-219: 25%, >=220: 42%"
    assert readable("bucket_counts", "<3sent:4 >=3sent:2") == "<3sent: 4, >=3sent: 2"
    assert readable("operators", "swap:3 noise:1") == "swap: 3, noise: 1"
    assert readable("operators", "") == "—" and readable("client", "a:b") == "a:b"


def _effect(scope: str, effect: float):
    from cllora.report.effects import EffectRow

    return EffectRow("train.lr", 0.01, 0.001, "global", scope, 1, effect, effect - 0.01,
                     effect + 0.01, 3, 20, "t", True)  # fmt: skip


def test_forest_plot_axis_text_is_true_for_every_row_on_it():
    """Score rows (higher = better) sit on their own panel, under an axis that says positive =
    better; the loss rows' axis says negative = better and holds no score row."""
    import matplotlib.pyplot as plt

    from cllora.report.plots import forest_figure

    rows = [_effect("all", -0.05), _effect("rouge-l", 0.04), _effect("length <128", 0.01)]
    fig = forest_figure(rows)
    (loss, score) = fig.axes
    assert "negative = better" in loss.get_xlabel() and "positive" not in loss.get_xlabel()
    assert "positive = better" in score.get_xlabel() and "negative" not in score.get_xlabel()
    assert ["ROUGE-L" in t.get_text() for t in loss.get_yticklabels()] == [False, False]
    assert ["ROUGE-L" in t.get_text() for t in score.get_yticklabels()] == [True]
    plt.close(fig)
    (only,) = forest_figure(rows[:1]).axes
    assert "negative = better" in only.get_xlabel()
