"""Per-sample losses of an exact model kept on disk, so runs that start from the same model share
its evaluation (a sweep's cells all evaluate the base model at round 0, mostly on the same
samples).

Usage::

    from cllora.eval_cache import LossCache
    cache = LossCache("runs/study/base_cache")
    results = cache.evaluate_samples(model, samples, pad_id, batch_size=8)   # like eval's
    cache.hits, cache.misses                                                 # of the last call

    cache.generate_answers(model, tokenizer, samples, max_new_tokens=64)     # greedy answers

``cllora sweep`` gives every cell ``eval.base_cache = <sweep>/base_cache`` (unless the file sets
it; ``""`` switches it off), and a run uses it for the evaluations of its initial model: the
quality score of each client, the round-0 evaluation of the global model and its round-0 greedy
answers (``eval.generate_samples``). Nothing else: a model that has trained is never looked up.

**What a hit means.** A file is keyed by the model's fingerprint and the sample's: the model's is
a SHA-256 over every parameter and buffer (name, dtype, shape, bytes), the class of every module
(so kernel swaps and the attention implementation count), the model config and the torch
version; the sample's is a SHA-256 of its input ids and labels. Equal keys mean the same
arithmetic on the same tokens (an answer's key adds the tokenizer and ``max_new_tokens``); the
loss may still differ from a fresh evaluation in its last bits, because a batch's padding and
order change the float reductions (the same holds between any two runs whose test sets
differ), and a greedy answer may then differ where two tokens tie. A cached value therefore
makes cells of a seed agree exactly at round 0 on the samples they share.

**Damage.** Each file repeats its keys and the sample's target count; a file that cannot be
read, or whose keys or count do not match, is reported (one warning) and evaluated again, and
the fresh value replaces it. Files are written to a temporary name and renamed, so runs in
parallel can share one directory. A lookup holds an exclusive ``flock`` on the model's directory
(``<model>/.lock``) while it reads, evaluates what is missing and stores it: two cells of a new
seed that start together evaluate the initial model once (the second waits, then reads it all
from the cache) instead of both missing it.

Only a single process uses it: under torchrun the sharded global evaluation ignores the cache.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from cllora.data.formatting import IGNORE_INDEX, Sample
from cllora.eval import EvalResult, evaluate_samples
from cllora.generation import Answer, generate_answers

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

    @contextlib.contextmanager
    def _locked(self, model_key: str) -> Iterator[None]:
        """Hold the model directory's lock: one process at a time looks up and fills it."""
        lock = self.root / model_key[:32] / ".lock"
        lock.parent.mkdir(parents=True, exist_ok=True)
        with lock.open("a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _path(self, model_key: str, sample_key: str, prefix: str = "") -> Path:
        return self.root / model_key[:32] / f"{prefix}{sample_key[:32]}.json"

    def _load(self, path: Path, expect: dict[str, Any]) -> dict[str, Any] | None:
        """The record at ``path`` if it holds ``expect``'s values (None when absent; damaged or
        another's: a warning, and None)."""
        if not path.exists():
            return None
        try:
            rec = json.loads(path.read_text())
            ok = isinstance(rec, dict) and all(rec.get(k) == v for k, v in expect.items())
        except (OSError, ValueError):
            ok = False
        if not ok:
            log.warning("loss cache: %s is damaged or not this sample's; evaluating again", path)
            return None
        return rec

    def _store(self, path: Path, rec: dict[str, Any]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(rec))
        tmp.replace(path)

    def _read(self, path: Path, model_key: str, sample_key: str, targets: int) -> EvalResult | None:
        rec = self._load(path, {"model": model_key, "sample": sample_key, "tokens": targets})
        try:
            return None if rec is None else EvalResult(float(rec["loss_sum"]), targets)
        except (KeyError, TypeError, ValueError):
            log.warning("loss cache: %s is damaged or not this sample's; evaluating again", path)
            return None

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
        with self._locked(model_key):
            return self._evaluate(model, model_key, samples, pad_id, batch_size, desc, progress)

    def _evaluate(self, model, model_key, samples, pad_id, batch_size, desc, progress):
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
                rec = {"model": model_key, "sample": keys[i], "tokens": result.tokens,
                       "loss_sum": result.loss_sum}  # fmt: skip
                self._store(self._path(model_key, keys[i]), rec)
        self.hits, self.misses = len(samples) - len(todo), len(todo)
        return [r for r in out if r is not None]

    def generate_answers(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        samples: Sequence[Sample],
        max_new_tokens: int = 64,
        batch_size: int = 8,
        desc: str | None = None,
        progress: bool = False,
    ) -> list[Answer]:
        """:func:`cllora.generation.generate_answers` of this model, reading the answers it
        already gave to these prompts (same tokenizer, same ``max_new_tokens``) from the cache."""
        model_key = model_fingerprint(model)
        with self._locked(model_key):
            return self._generate(model, model_key, tokenizer, samples, max_new_tokens,
                                  batch_size, desc, progress)  # fmt: skip

    def _generate(self, model, model_key, tokenizer, samples, max_new_tokens, batch_size, desc,
                  progress):  # fmt: skip
        setting = f"{getattr(tokenizer, 'name_or_path', '')} {len(tokenizer)} {max_new_tokens}"
        keys = [sample_fingerprint(s) for s in samples]
        paths = [self._path(model_key, k, f"answer-{max_new_tokens}-") for k in keys]
        out: list[Answer | None] = []
        for path, key in zip(paths, keys, strict=True):
            rec = self._load(path, {"model": model_key, "sample": key, "setting": setting})
            ok = rec is not None and isinstance(rec.get("text"), str)
            out.append(Answer(rec["text"], int(rec["new_tokens"])) if ok else None)
        todo = [i for i, a in enumerate(out) if a is None]
        picked = [samples[i] for i in todo]
        fresh = generate_answers(model, tokenizer, picked, max_new_tokens, batch_size, desc,
                                 progress)  # fmt: skip
        for i, answer in zip(todo, fresh, strict=True):
            out[i] = answer
            rec = {"model": model_key, "sample": keys[i], "setting": setting,
                   "text": answer.text, "new_tokens": answer.new_tokens}  # fmt: skip
            self._store(paths[i], rec)
        self.hits, self.misses = len(samples) - len(todo), len(todo)
        return [a for a in out if a is not None]
