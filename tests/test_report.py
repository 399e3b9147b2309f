"""Pieces of the per-client tables and reports that need no run."""

from __future__ import annotations

import pytest

from cllora.report.html import markdown_table
from cllora.report.tables import count_sentences, heterogeneity_summary


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
