"""The loss cache of the initial model (``cllora/eval_cache.py``): hits give the evaluated values,
any change of weights, module classes or tokens misses, damaged files are evaluated again, and
a sweep's cells share their round-0 evaluation."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from cllora.cli import main
from cllora.config import ModelConfig
from cllora.data.formatting import IGNORE_INDEX, Sample
from cllora.eval import evaluate_samples
from cllora.eval_cache import LossCache, model_fingerprint
from cllora.model.load import load_model
from tests.conftest import records_of
from tests.test_sweep import _sweep_file


@pytest.fixture(scope="module")
def tiny():
    model, _ = load_model(ModelConfig(name="tiny-llama", dtype="fp32"), seed=0)
    return model.eval()


def _samples(n: int = 5) -> list[Sample]:
    g = torch.Generator().manual_seed(1)
    out = []
    for k in range(n):
        ids = torch.randint(3, 200, (6 + 3 * k,), generator=g).tolist()
        out.append(Sample(ids, [IGNORE_INDEX] * 3 + ids[3:]))
    return out


def test_hits_return_what_was_evaluated_and_new_samples_are_added(tiny, tmp_path):
    samples = _samples()
    cache = LossCache(tmp_path / "c")
    first = cache.evaluate_samples(tiny, samples[:3], pad_id=0, batch_size=2)
    assert (cache.hits, cache.misses) == (0, 3)
    fresh = evaluate_samples(tiny, samples[:3], pad_id=0, batch_size=2)
    for a, b in zip(first, fresh, strict=True):
        assert a.tokens == b.tokens and a.loss_sum == pytest.approx(b.loss_sum, rel=1e-6)
    again = LossCache(tmp_path / "c").evaluate_samples(tiny, samples, pad_id=0, batch_size=4)
    assert [r.loss_sum for r in again[:3]] == [r.loss_sum for r in first]  # exact: read back
    assert len(list((tmp_path / "c").rglob("*.json"))) == 5


def test_another_model_or_another_sample_never_hits(tiny, tmp_path):
    samples = _samples(2)
    cache = LossCache(tmp_path / "c")
    cache.evaluate_samples(tiny, samples, pad_id=0)
    key = model_fingerprint(tiny)
    other, _ = load_model(ModelConfig(name="tiny-llama", dtype="fp32"), seed=0)
    assert model_fingerprint(other) == key  # the same weights and classes: the same key
    with torch.no_grad():
        next(other.parameters()).view(-1)[0] += 1e-3
    assert model_fingerprint(other) != key
    cache.evaluate_samples(other, samples, pad_id=0)
    assert cache.misses == 2
    swapped, _ = load_model(ModelConfig(name="tiny-llama", dtype="fp32"), seed=0)
    swapped.model.norm.__class__ = type("OtherNorm", (type(swapped.model.norm),), {})
    assert model_fingerprint(swapped) != key  # a kernel swap changes the arithmetic
    changed = Sample(samples[0].input_ids, [IGNORE_INDEX] * 4 + samples[0].input_ids[4:])
    cache.evaluate_samples(tiny, [changed, samples[1]], pad_id=0)
    assert (cache.hits, cache.misses) == (1, 1)  # other labels: another sample


@pytest.mark.parametrize("damage", ["garbage", "other_tokens", "truncated", "other_sample"])
def test_a_damaged_cache_file_is_reported_and_evaluated_again(tiny, tmp_path, caplog, damage):
    samples = _samples(2)
    cache = LossCache(tmp_path / "c")
    good = cache.evaluate_samples(tiny, samples, pad_id=0)
    files = sorted((tmp_path / "c").rglob("*.json"))
    rec = json.loads(files[0].read_text())
    text = {
        "garbage": "\x00not json",
        "other_tokens": json.dumps({**rec, "tokens": rec["tokens"] + 1, "loss_sum": 0.0}),
        "truncated": files[0].read_text()[:20],
        "other_sample": files[1].read_text(),
    }[damage]
    files[0].write_text(text)
    with caplog.at_level(logging.WARNING, logger="cllora"):
        out = cache.evaluate_samples(tiny, samples, pad_id=0)
    assert "damaged or not this sample's" in caplog.text and cache.misses == 1
    by_key = {json.loads(f.read_text())["sample"]: f for f in files}
    assert len(by_key) == 2  # the file was rewritten with its own sample
    assert sorted(r.loss_sum for r in out) == pytest.approx(sorted(r.loss_sum for r in good))


def test_sweep_cells_share_the_round_0_evaluation(tmp_path, caplog):
    """Two cells of one seed that differ in training only: the second reads its whole round-0
    evaluation from <sweep>/base_cache and records exactly the first one's values."""
    path = _sweep_file(tmp_path, {"train.lr": [0.001, 0.01]})
    with caplog.at_level(logging.INFO, logger="cllora"):
        assert main(["sweep", path]) == 0
    root = tmp_path / "sw"
    assert any((root / "base_cache").rglob("*.json"))
    r0 = {}
    for cell in ("train.lr=0.001", "train.lr=0.01"):
        recs = records_of(root / "cells" / cell, "global_eval")
        r0[cell] = [(r["client"], r["loss_sums"]) for r in recs if r["round"] == 0]
    assert r0["train.lr=0.001"] == r0["train.lr=0.01"]
    n = sum(len(sums) for _, sums in r0["train.lr=0.001"][:-1])  # the union: own sets
    assert f"round 0: {n} of {n} test losses from the loss cache" in caplog.text
    off = _sweep_file(tmp_path, {"train.lr": [0.001]}, eval__base_cache="''")
    assert main(["sweep", off, "sweep.name=nocache"]) == 0
    assert not (tmp_path / "nocache" / "base_cache").exists()


_RACER = """
import sys, time, torch
from cllora.config import ModelConfig
from cllora.data.formatting import IGNORE_INDEX, Sample
from cllora.eval_cache import LossCache
from cllora.model.load import load_model
model, _ = load_model(ModelConfig(name="tiny-llama", dtype="fp32"), seed=0)
g = torch.Generator().manual_seed(1)
samples = []
for k in range(12):
    ids = torch.randint(3, 200, (40 + 3 * k,), generator=g).tolist()
    samples.append(Sample(ids, [IGNORE_INDEX] * 3 + ids[3:]))
start = float(sys.argv[2])
while time.time() < start:  # both processes look up the cache at the same moment
    time.sleep(0.005)
cache = LossCache(sys.argv[1])
cache.evaluate_samples(model.eval(), samples, pad_id=0, batch_size=2)
print(cache.hits, cache.misses)
"""


def test_two_cells_starting_together_evaluate_the_initial_model_once(tmp_path):
    """The shared round-0 cache is locked per model: the second of two processes that start at
    once waits for the first and reads everything (no ~1,400 CPU-s lost per sweep)."""
    import subprocess
    import sys
    import time

    start = str(time.time() + 20)  # after both have imported torch and built the model
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RACER, str(tmp_path / "c"), start],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = sorted(tuple(map(int, p.communicate(timeout=300)[0].split())) for p in procs)
    assert all(p.returncode == 0 for p in procs)
    assert outs == [(0, 12), (12, 0)], outs  # one evaluated all 12, the other read all 12
