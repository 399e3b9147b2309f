"""Per-sample losses of an exact model kept on disk, so runs that start from the same model share
its evaluation (a sweep's cells all evaluate the base model at round 0, mostly on the same
samples).

Usage::

    from cllora.eval_cache import LossCache
    cache = LossCache("runs/study/base_cache")
    results = cache.evaluate_samples(model, samples, pad_id, batch_size=8)   # like eval's
    cache.hits, cache.misses                                                 # of the last call

``cllora sweep`` gives every cell ``eval.base_cache = <sweep>/base_cache`` (unless the file sets
it; ``""`` switches it off), and a run uses it for the evaluations of its initial model: the
quality score of each client and the round-0 evaluation of the global model. Nothing else: a
model that has trained is never looked up.

**What a hit means.** A file is keyed by the model's fingerprint and the sample's: the model's is
a SHA-256 over every parameter and buffer (name, dtype, shape, bytes), the class of every module
(so kernel swaps and the attention implementation count), the model config and the torch
version; the sample's is a SHA-256 of its input ids and labels. Equal keys mean the same
arithmetic on the same tokens; the loss may still differ from a fresh evaluation in its last
bits, because a batch's padding and order change the float reductions (the same holds between
any two runs whose test sets differ). A cached value therefore makes cells of a seed agree
exactly at round 0 on the samples they share.

**Damage.** Each file repeats its keys and the sample's target count; a file that cannot be
read, or whose keys or count do not match, is reported (one warning) and evaluated again, and
the fresh value replaces it. Files are written to a temporary name and renamed, so runs in
parallel can share one directory.

Only a single process uses it: under torchrun the sharded global evaluation ignores the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from cllora.data.formatting import IGNORE_INDEX, Sample
from cllora.eval import EvalResult, evaluate_samples

log = logging.getLogger("cllora")

FORMAT = 1  # bump when what a file holds, or how a key is formed, changes


def model_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of everything that decides the model's outputs on given tokens (module doc)."""
    h = hashlib.sha256(f"cllora-loss-cache {FORMAT} torch {torch.__version__}\n".encode())
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        h.update(config.to_json_string(use_diff=False).encode())
    for name, module in model.named_modules():
        h.update(f"{name}:{type(module).__module__}.{type(module).__qualname__}\n".encode())
    tensors = [*model.named_parameters(), *model.named_buffers()]
    for name, t in tensors:
        data = t.detach()
        h.update(f"{name} {data.dtype} {tuple(data.shape)}\n".encode())
        data = data.cpu().contiguous()
        if data.numel():
            h.update(data.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def sample_fingerprint(sample: Sample) -> str:
    """SHA-256 of a sample's input ids and labels."""
    text = json.dumps([list(sample.input_ids), list(sample.labels)], separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _targets(sample: Sample) -> int:
    return sum(t != IGNORE_INDEX for t in sample.labels[1:])


class LossCache:
    """A directory of per-sample loss sums, one subdirectory per model fingerprint."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.hits = self.misses = 0

    def _path(self, model_key: str, sample_key: str) -> Path:
        return self.root / model_key[:32] / f"{sample_key[:32]}.json"

    def _read(self, path: Path, model_key: str, sample_key: str, targets: int) -> EvalResult | None:
        if not path.exists():
            return None
        try:
            rec = json.loads(path.read_text())
            ok = (rec["model"], rec["sample"], rec["tokens"]) == (model_key, sample_key, targets)
            value = EvalResult(float(rec["loss_sum"]), int(rec["tokens"]))
        except (OSError, ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            log.warning("loss cache: %s is damaged or not this sample's; evaluating again", path)
            return None
        return value

    def _write(self, path: Path, model_key: str, sample_key: str, result: EvalResult) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        rec = {"model": model_key, "sample": sample_key, "tokens": result.tokens,
               "loss_sum": result.loss_sum}  # fmt: skip
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(rec))
        tmp.replace(path)

    def evaluate_samples(
        self,
        model: torch.nn.Module,
        samples: Sequence[Sample],
        pad_id: int,
        batch_size: int = 8,
        desc: str | None = None,
        progress: bool = False,
    ) -> list[EvalResult]:
        """:func:`cllora.eval.evaluate_samples`, reading the samples this model has already
        evaluated from the cache and adding the others to it."""
        model_key = model_fingerprint(model)
        keys = [sample_fingerprint(s) for s in samples]
        out: list[EvalResult | None] = [
            self._read(self._path(model_key, k), model_key, k, _targets(s))
            for s, k in zip(samples, keys, strict=True)
        ]
        todo = [i for i, r in enumerate(out) if r is None]
        fresh = evaluate_samples(model, [samples[i] for i in todo], pad_id, batch_size, desc,
                                 progress)  # fmt: skip
        for i, result in zip(todo, fresh, strict=True):
            out[i] = result
            if math.isfinite(result.loss_sum):  # a non-finite loss is the caller's error
                self._write(self._path(model_key, keys[i]), model_key, keys[i], result)
        self.hits, self.misses = len(samples) - len(todo), len(todo)
        return [r for r in out if r is not None]
