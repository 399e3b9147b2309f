"""The generation metric beside the loss (cllora/generation.py): prompt and reference of a
sample, the library's scores against hand-computed ROUGE-L and token F1, batched greedy decoding,
the ``generation`` records of a tiny run, their paired effects in a sweep, and the config."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from cllora.config import ConfigError, load_config
from cllora.data.formatting import IGNORE_INDEX, Sample
from cllora.fed.resume import truncate_metrics
from cllora.fed.runner import run_experiment
from cllora.generation import generate_ids, score_answers, split_sample
from cllora.report.effects import METHOD_T, higher_is_better, row_label, sweep_effects
from cllora.report.records import GLOBAL, Generation, SchemaRecord
from cllora.report.sample_losses import COLUMNS
from tests.conftest import records_of, tiny_run_overrides

X = IGNORE_INDEX


def test_prompt_is_before_the_first_target_and_reference_the_first_target_run():
    s = Sample(input_ids=[1, 5, 6, 7, 8, 2, 9, 10, 11, 2], labels=[X, X, X, 7, 8, 2, X, X, 11, 2])
    assert split_sample(s) == ([1, 5, 6], [7, 8, 2])  # the second assistant turn is not in it
    every = Sample(input_ids=[1, 5, 6], labels=[1, 5, 6])  # data.response_only=false
    assert split_sample(every) == ([1], [5, 6])
    with pytest.raises(ValueError, match="no target"):
        split_sample(Sample(input_ids=[1, 5], labels=[X, X]))


def test_scores_match_hand_computed_rouge_l_and_token_f1():
    answers = ["the cat sat on the mat", "The answer: Paris!"]
    references = ["the cat is on the mat", "paris is the answer"]
    first, second = score_answers(answers, references)
    # ROUGE-L: LCS "the cat on the mat" = 5 of 6 words each way -> F = 5/6. Token F1 (SQuAD:
    # articles and punctuation dropped): {cat, sat, on, mat} vs {cat, is, on, mat}: 3/4, 3/4
    assert (first.rouge_l, first.f1) == (pytest.approx(5 / 6, abs=1e-6), pytest.approx(0.75))
    # ROUGE-L keeps order: LCS "the answer" = 2, P 2/3, R 2/4 -> 4/7; token F1 is a bag:
    # {answer, paris} in {paris, is, answer}: P 1, R 2/3 -> 0.8
    assert second.rouge_l == pytest.approx(4 / 7, abs=1e-6)
    assert second.f1 == pytest.approx(0.8, abs=1e-6)


def test_batched_left_padded_greedy_equals_one_by_one():
    from transformers import LlamaForCausalLM

    from cllora.model.load import tiny_config

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config("llama", 300)).eval()
    prompts = [[1, 17, 40, 99, 5], [1, 8], [1, 250, 3, 77, 120, 9, 61, 33]]
    batched = generate_ids(model, prompts, pad_id=2, eos=[2], max_new_tokens=6, batch_size=3)
    single = generate_ids(model, prompts, pad_id=2, eos=[2], max_new_tokens=6, batch_size=1)
    assert batched == single and all(0 < len(ids) <= 6 for ids in batched)
    assert not model.training


def test_tiny_run_writes_generation_records_at_round_0_and_the_last(tmp_path):
    cfg = load_config(
        None,
        tiny_run_overrides(
            tmp_path,
            run_name="g",
            train__local_steps=1,
            partition__method="iid",
            partition__num_clients=2,
            partition__max_train_per_client=4,
            partition__max_test_per_client=2,
            eval__local="false",
            quality__score_samples=0,
            eval__generate_samples=2,
            eval__max_new_tokens=4,
        ),
    )
    run = run_experiment(cfg).run_dir  # fed.rounds=2
    gens = records_of(run, "generation")
    assert [g["round"] for g in gens] == [0, 2]
    (tests,) = records_of(run, "test_samples")
    for g in gens:
        assert g["samples"] == tests["sets"][GLOBAL]["samples"][:2]
        assert g["model"] == "global" and g["test"] == GLOBAL and g["max_new_tokens"] == 4
        assert all(0 <= v <= 1 for v in g["rouge_l"] + g["f1"]) and len(g["f1"]) == 2
        assert g["rouge_l_mean"] == pytest.approx(np.mean(g["rouge_l"]))
        assert all(0 <= n <= 4 for n in g["new_tokens"]) and all(g["references"])
        scores = score_answers(g["answers"], g["references"])
        assert [s.rouge_l for s in scores] == pytest.approx(g["rouge_l"])
        assert [s.f1 for s in scores] == pytest.approx(g["f1"])
    # the round records' seconds leave generation out; timing.json counts it apart
    assert json.loads((run / "timing.json").read_text())["generation"] > 0
    truncate_metrics(run / "metrics.jsonl", 1)  # a resume after round 1 regenerates round 2
    assert [g["round"] for g in records_of(run, "generation")] == [0]


# --- paired effects of the scores -------------------------------------------------------------


def _cell(run_dir: Path, scores: dict[int, dict[str, tuple[float, float]]]) -> Path:
    """A cell with a loss row per sample (every loss 1.0) and ``generation`` records: round ->
    sample id -> (rouge_l, f1)."""
    run_dir.mkdir(parents=True)
    ids = sorted({s for by_id in scores.values() for s in by_id})
    with (run_dir / "sample_losses.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(COLUMNS)
        writer.writerows((2, "global", "", GLOBAL, s, 10, 2, 2.0) for s in ids)
    lines = [SchemaRecord().as_dict()]
    for rnd, by_id in scores.items():
        rouge, f1 = [v[0] for v in by_id.values()], [v[1] for v in by_id.values()]
        lines.append(
            Generation(
                round=rnd, model="global", test=GLOBAL, samples=list(by_id), rouge_l=rouge,
                f1=f1, rouge_l_mean=float(np.mean(rouge)), f1_mean=float(np.mean(f1)),
                max_new_tokens=4, new_tokens=[4] * len(rouge), answers=[""] * len(rouge),
                references=["x"] * len(rouge), seconds=0.1,
            ).as_dict()
        )  # fmt: skip
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return run_dir


def test_sweep_effects_pair_generation_scores_by_sample_and_seed(tmp_path):
    knob = "partition.alpha_len"
    cells = [  # seed 0: rouge +0.2, f1 -0.1; seed 1 (sample y only in the ref: left out): +0.4, 0
        ({knob: 0.1, "seed": 0}, {0: {"a": (0.0, 0.0)}, 2: {"a": (0.2, 0.5), "b": (0.4, 0.5)}}),
        ({knob: 1.0, "seed": 0}, {0: {"a": (0.9, 0.9)}, 2: {"b": (0.5, 0.4), "a": (0.5, 0.4)}}),
        ({knob: 0.1, "seed": 1}, {2: {"x": (0.1, 0.3), "y": (0.9, 0.9)}}),
        ({knob: 1.0, "seed": 1}, {2: {"x": (0.5, 0.3)}}),
    ]
    dirs = [(v, _cell(tmp_path / f"c{i}", s)) for i, (v, s) in enumerate(cells)]
    rows = sweep_effects(dirs)
    gen = {r.scope: r for r in rows if r.scope in ("rouge-l", "token-f1")}
    assert [r.scope for r in rows] == ["all", "rouge-l", "token-f1"]  # after the loss scopes
    rouge, f1 = gen["rouge-l"], gen["token-f1"]
    assert (rouge.model, rouge.round, rouge.method, rouge.n_seeds) == ("global", 2, METHOD_T, 2)
    half = 12.7062 * np.std([0.2, 0.4], ddof=1) / math.sqrt(2)
    assert rouge.effect == pytest.approx(0.3)
    assert (rouge.lo, rouge.hi) == (pytest.approx(0.3 - half), pytest.approx(0.3 + half))
    assert f1.effect == pytest.approx(-0.05) and rouge.n_samples == 3
    assert higher_is_better(rouge) and not higher_is_better(rows[0])
    assert row_label(rouge).endswith("global model, ROUGE-L of greedy answers (higher = better)")
    (at0,) = [r for r in sweep_effects(dirs, round=0) if r.scope == "rouge-l"]
    assert at0.effect == pytest.approx(0.9) and at0.n_seeds == 1  # seed 1 has no round 0


@pytest.mark.parametrize(
    ("override", "allowed"),
    [("eval.generate_samples=-1", ">= 0 (0 = off)"), ("eval.max_new_tokens=0", ">= 1")],
)
def test_generation_config_is_validated(override, allowed):
    assert load_config(None, []).eval.generate_samples == 0  # off by default
    with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")) as err:
        load_config(None, [override])
    assert allowed in str(err.value)


def test_round_0_answers_come_from_the_loss_cache_in_a_second_run(tmp_path, caplog):
    """Two runs of one seed that differ in training only, sharing eval.base_cache: the second
    reads its round-0 answers (and losses) from the cache, with the first run's very texts."""
    import logging

    def run(name: str, lr: float):
        overrides = tiny_run_overrides(
            tmp_path, run_name=name, train__local_steps=1, train__lr=lr, fed__rounds=1,
            partition__method="iid", partition__num_clients=2,
            partition__max_train_per_client=4, partition__max_test_per_client=2,
            eval__local="false", quality__score_samples=0, eval__generate_samples=2,
            eval__max_new_tokens=4, eval__base_cache=str(tmp_path / "cache"),
        )  # fmt: skip
        return run_experiment(load_config(None, overrides)).run_dir

    first = records_of(run("a", 5e-3), "generation")
    answers = list((tmp_path / "cache").rglob("answer-4-*.json"))
    assert len(answers) == 2
    rec = json.loads(answers[0].read_text())
    answers[0].write_text(json.dumps({**rec, "text": rec["text"] + " (planted)"}))
    with caplog.at_level(logging.INFO, logger="cllora"):
        second = records_of(run("b", 1e-2), "generation")
    assert any(a.endswith(" (planted)") for a in second[0]["answers"])  # read, not generated
    assert [a.removesuffix(" (planted)") for a in second[0]["answers"]] == first[0]["answers"]
    assert "round 0: 4 of 4 test losses from the loss cache" in caplog.text
