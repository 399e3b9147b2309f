"""Evaluation bookkeeping of a federated run: global and local models, by client and length.

Usage::

    from cllora.fed.evaluation import Evaluator
    ev = Evaluator(clients, edges, pad_id, cfg, metrics)
    row = ev.global_round(model, round_idx)        # writes `global_eval` records; a summary row
    records = ev.local(model, client_idx, round_idx)   # `local_eval` records, for the caller
    add_local_means(row, records)                  # the round's mean local losses, into the row
    ev.generation(model, tokenizer, round_idx)     # a `generation` record (eval.generate_samples)

The **global test set** is the union of the clients' test sets (each clean and cut to the common
window ``data.max_length``), or, with ``partition.global_test_fraction`` > 0, the samples held out
before partitioning (``global_test``: the same for every run with the same data and seed, so
sweep cells are compared on the same samples). Every sample is evaluated once per model: the
global model's results
are split by owner (``global_eval``, one record per client plus ``client="__global__"``); a local
model (the client's adapter after local training, before aggregation) gets two ``local_eval``
records, ``test="own"`` (its own test set, a slice of the same pass; none for a client without
one, as in pool mode, :mod:`cllora.data.pool`) and ``test="__global__"``
(with ``eval.local_global_samples`` = N > 0: the first N samples of the held-out set only; their
``loss_sums`` then cover those N, a prefix of the set in ``test_samples``).
A non-finite loss is never written: a local model's raises
:class:`~cllora.fed.guards.NonFiniteError` (its client fails the round), the global model's
:class:`~cllora.fed.guards.NonFiniteModelError` (the run stops).
Each record holds ``loss``, ``ppl``, ``tokens`` and ``buckets``: ``{label: {loss, tokens}}`` per
length bucket with at least one target token (buckets of ``partition.length_measure``, the
measured token length or the response's sentences, see
:func:`cllora.data.partition.sample_length`; sentence labels read ``<3sent``), and ``loss_sums``:
each sample's summed loss, in the order of the set in the ``test_samples`` record
(:meth:`Evaluator.write_test_samples`, once per run; a sample's id is its ``file:line``, made
unique within a set by ``#2``, ``#3``; ``lengths`` its measure, in the same unit).

**Generation** (``eval.generate_samples`` = N > 0; :meth:`Evaluator.generation`, called by the
runner at round 0 and at the last round): the global model's greedy answers to the first N
samples of the global test set, in the order above, scored against their references
(ROUGE-L and token F1, :mod:`cllora.generation`) into one ``generation`` record.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import Any

from cllora.config import Config
from cllora.data.formatting import IGNORE_INDEX, Sample
from cllora.data.partition import Client, sample_length
from cllora.eval import EvalResult, by_bucket, evaluate_samples
from cllora.eval_cache import LossCache
from cllora.fed.distributed import DistContext
from cllora.fed.guards import NonFiniteError, NonFiniteModelError, non_finite_values
from cllora.generation import Answer, generate_answers, reference_text, score_answers
from cllora.report.metrics import MetricsLog
from cllora.report.records import GLOBAL, OWN, Generation, GlobalEval, LocalEval, TestSamples

log = logging.getLogger("cllora")


class Evaluator:
    """Evaluates models on the clients' test sets and writes the records (see module doc)."""

    def __init__(
        self,
        clients: Sequence[Client],
        edges: Sequence[int],
        pad_id: int,
        cfg: Config,
        metrics: MetricsLog,
        ctx: DistContext | None = None,
        global_test: Sequence[Sample] = (),
        cache: LossCache | None = None,
    ) -> None:
        self.clients, self.edges, self.pad_id = list(clients), list(edges), pad_id
        self.cache = cache  # the initial model's losses and answers shared by runs (round 0)
        self.measure = cfg.partition.length_measure  # the unit of the edges
        self.cfg, self.metrics, self.ctx = cfg, metrics, ctx
        self.samples = [s for c in self.clients for s in c.test]
        self.slices: dict[str, slice] = {}
        start = 0
        for c in self.clients:
            self.slices[c.name] = slice(start, start + len(c.test))
            start += len(c.test)
        # the held-out set goes after the clients' test sets, in the same pass
        self.held_out = bool(global_test)
        self.samples += list(global_test)
        self.global_slice = slice(start if self.held_out else 0, len(self.samples))
        # what local models read of the held-out set: its first eval.local_global_samples
        n_local = cfg.eval.local_global_samples if self.held_out else 0
        stop = min(start + n_local, len(self.samples)) if n_local else len(self.samples)
        self.local_global_slice = slice(self.global_slice.start, stop)

    def write_test_samples(self) -> None:
        """Write the ``test_samples`` record: every test set's sample ids, lengths, targets."""
        parts = {**self.slices, GLOBAL: self.global_slice}
        sets = {name: _test_set(self.samples[part], self.measure) for name, part in parts.items()}
        self.metrics.write(TestSamples(sets=sets))

    def _local_indices(self, name: str) -> list[int] | None:
        """The samples a local model needs: all (None) when the global set is the union, else
        its own test set and the held-out global set (the other clients' are not read)."""
        if not self.held_out:
            return None
        n = len(self.samples)
        return [*range(n)[self.slices[name]], *range(n)[self.local_global_slice]]

    def _pass(
        self, model: Any, desc: str, shard: bool = False, only: list[int] | None = None
    ) -> list[EvalResult]:
        """Every test sample's result; ``shard`` (a distributed global evaluation, the same
        model on every rank): each rank evaluates every world-th sample, results gathered.
        ``only``: evaluate these sample indices (the others' results are empty)."""
        bs, progress = self.cfg.train.eval_batch_size, self.cfg.progress
        if only is not None:
            picked = [self.samples[i] for i in only]
            out = [EvalResult(0.0, 0)] * len(self.samples)
            for i, r in zip(only, evaluate_samples(model, picked, self.pad_id, bs, desc, progress),
                            strict=True):  # fmt: skip
                out[i] = r
            return out
        if not shard or self.ctx is None:
            return evaluate_samples(model, self.samples, self.pad_id, bs, desc, progress)
        rank, world = self.ctx.rank, self.ctx.world
        mine = evaluate_samples(model, self.samples[rank::world], self.pad_id, bs, desc, progress)
        parts = self.ctx.all_gather_json([[r.loss_sum, r.tokens] for r in mine])
        out: list[EvalResult] = [EvalResult(0.0, 0)] * len(self.samples)
        for k, part in enumerate(parts):
            for j, (loss_sum, tokens) in enumerate(part):
                out[k + j * world] = EvalResult(loss_sum, tokens)
        return out

    def _record(self, results: list[EvalResult], part: slice) -> dict[str, Any]:
        buckets = by_bucket(self.samples[part], results[part], self.edges, self.measure)
        total = EvalResult.combine(results[part])
        per_bucket = {k: {"loss": b.loss, "tokens": b.tokens} for k, b in buckets.items()}
        per_bucket = {k: v for k, v in per_bucket.items() if v["tokens"]}
        loss_sums = [r.loss_sum for r in results[part]]
        return {**total.as_dict(), "buckets": per_bucket, "loss_sums": loss_sums}

    def global_round(self, model: Any, round_idx: int) -> dict[str, Any]:
        """Evaluate the global model; write its records; return the round's summary row."""
        results = self._initial(model) if round_idx == 0 else None
        if results is None:
            results = self._pass(model, f"eval round {round_idx}", shard=True)
        records = {
            name: self._record(results, part)
            for name, part in self.slices.items()
            if part.stop > part.start
        }  # fmt: skip  (pool mode: no own test sets)
        records[GLOBAL] = self._record(results, self.global_slice)
        bad = non_finite_values({k: v["loss"] for k, v in records.items() if v["tokens"]})
        if bad:  # nothing written: the run stops on its last good checkpoint
            raise NonFiniteModelError(
                f"round {round_idx}: the global model's test loss is not finite on "
                f"{', '.join(bad)}; the run stopped"
            )
        for name, rec in records.items():
            self.metrics.write(GlobalEval(round=round_idx, client=name, **rec))
        row: dict[str, Any] = {
            "round": round_idx,
            "global_loss": records[GLOBAL]["loss"],
            "global_ppl": records[GLOBAL]["ppl"],
        }
        row.update({f"loss[{c.name}]": records[c.name]["loss"] for c in self.clients
                    if c.name in records})  # fmt: skip
        row.update(local_own=math.nan, local_global=math.nan)
        return row

    def skipped_row(self, round_idx: int) -> dict[str, Any]:
        """The summary row of a round whose global model is not evaluated
        (``eval.global_rounds=last``): NaN losses."""
        row: dict[str, Any] = {"round": round_idx, "global_loss": math.nan, "global_ppl": math.nan}
        row.update({f"loss[{c.name}]": math.nan for c in self.clients if c.test})
        row.update(local_own=math.nan, local_global=math.nan)
        return row

    def _initial(self, model: Any) -> list[EvalResult] | None:
        """The initial model's results through the loss cache (None: no cache, or torchrun,
        whose ranks share the pass instead)."""
        if self.cache is None or (self.ctx is not None and self.ctx.world > 1):
            return None
        bs, progress = self.cfg.train.eval_batch_size, self.cfg.progress
        out = self.cache.evaluate_samples(model, self.samples, self.pad_id, bs, "eval round 0",
                                          progress)  # fmt: skip
        log.info("round 0: %d of %d test losses from the loss cache %s", self.cache.hits,
                 len(self.samples), self.cache.root)  # fmt: skip
        return out

    def local(self, model: Any, client_idx: int, round_idx: int) -> list[LocalEval]:
        """Evaluate client ``client_idx``'s local model (now in ``model``): its two records
        (own test set, global test set), for the caller to write; a non-finite loss raises
        :class:`~cllora.fed.guards.NonFiniteError` (the caller fails that client)."""
        c = self.clients[client_idx]
        results = self._pass(model, f"eval local {c.name}", only=self._local_indices(c.name))
        sets = {OWN: self._record(results, self.slices[c.name]),
                GLOBAL: self._record(results, self.local_global_slice)}  # fmt: skip
        sets = {test: rec for test, rec in sets.items() if rec["tokens"]}  # no own set: pool mode
        bad = non_finite_values({test: rec["loss"] for test, rec in sets.items()})
        if bad:
            raise NonFiniteError(
                f"the local model of {c.name} evaluates to a non-finite loss on "
                + ", ".join(f"{test} test {rec['loss']}" for test, rec in sets.items())
            )
        return [LocalEval(round=round_idx, client=c.name, test=test, **rec)
                for test, rec in sets.items()]  # fmt: skip

    def generation(self, model: Any, tokenizer: Any, round_idx: int) -> Generation | None:
        """The global model's greedy answers to the first ``eval.generate_samples`` samples of
        the global test set, scored against their references (:mod:`cllora.generation`): the
        ``generation`` record, written and returned (None when off). Under torchrun every rank
        answers every world-th sample (the same model on every rank) and the answers are
        gathered, so the ranks stay in step."""
        n, max_new = self.cfg.eval.generate_samples, self.cfg.eval.max_new_tokens
        samples = self.samples[self.global_slice][:n]
        if not samples:
            return None
        start = time.perf_counter()
        answers = self._answers(model, tokenizer, samples, round_idx)
        references = [reference_text(tokenizer, s) for s in samples]
        scores = score_answers([a.text for a in answers], references)
        rouge, f1 = [sc.rouge_l for sc in scores], [sc.f1 for sc in scores]
        record = Generation(
            round=round_idx, model="global", test=GLOBAL,
            samples=_test_set(self.samples[self.global_slice])["samples"][: len(samples)],
            rouge_l=rouge, f1=f1, rouge_l_mean=sum(rouge) / len(rouge),
            f1_mean=sum(f1) / len(f1), max_new_tokens=max_new,
            new_tokens=[a.new_tokens for a in answers], answers=[a.text for a in answers],
            references=references, seconds=round(time.perf_counter() - start, 3),
        )  # fmt: skip
        self.metrics.write(record)
        return record

    def _answers(
        self, model: Any, tokenizer: Any, samples: list[Sample], round_idx: int
    ) -> list[Answer]:
        """Every sample's answer (round 0's through the cache, in a single process); under
        torchrun each rank answers every world-th sample."""
        cfg, desc = self.cfg, f"generate round {round_idx}"
        args = (cfg.eval.max_new_tokens, cfg.train.eval_batch_size, desc, cfg.progress)
        if self.cache is not None and round_idx == 0 and (self.ctx is None or self.ctx.world == 1):
            return self.cache.generate_answers(model, tokenizer, samples, *args)
        if self.ctx is None:
            return generate_answers(model, tokenizer, samples, *args)
        rank, world = self.ctx.rank, self.ctx.world
        mine = generate_answers(model, tokenizer, samples[rank::world], *args)
        parts = self.ctx.all_gather_json([[a.text, a.new_tokens] for a in mine])
        out: list[Answer] = [Answer("", 0)] * len(samples)
        for k, part in enumerate(parts):
            for j, (text, new_tokens) in enumerate(part):
                out[k + j * world] = Answer(text, new_tokens)
        return out


def _test_set(samples: Sequence[Sample], measure: str = "tokens") -> dict[str, list]:
    """Ids (``where``, repeats numbered), lengths (in ``measure``, the unit of the buckets) and
    target counts of one test set."""
    ids, seen = [], {}
    for k, s in enumerate(samples):
        where = str(s.meta.get("where") or f"sample{k}")
        seen[where] = seen.get(where, 0) + 1
        ids.append(where if seen[where] == 1 else f"{where}#{seen[where]}")
    return {
        "samples": ids,
        "lengths": [sample_length(s, measure) for s in samples],
        "tokens": [sum(t != IGNORE_INDEX for t in s.labels[1:]) for s in samples],
    }


def add_local_means(row: dict[str, Any], local: Sequence[LocalEval]) -> None:
    """Put the mean loss of a round's local models (own / global test) into ``row``."""
    own = [r.loss for r in local if r.test == OWN]
    glob = [r.loss for r in local if r.test == GLOBAL]
    if own:
        row.update(local_own=sum(own) / len(own), local_global=sum(glob) / len(glob))
