"""The in-process client pool: every client in this process, one shared model.

Usage::

    from cllora.fed.loop import Run, run_loop
    from cllora.fed.pool import LocalPool
    pool, model = LocalPool.open(cfg, run_dir, metrics, algorithm, ckpt, ctx, timer)
    run_loop(Run(cfg, run_dir, model, algorithm, pool, metrics, result, timer), ckpt)

:meth:`LocalPool.open` loads the model and the clients (:func:`cllora.fed.prepare.prepare_run`),
fingerprints their data (a resumed run must rebuild the very samples it trained on), measures
them (``clients.csv``, quality scores) and builds the evaluator of every test set. Each trainee
trains on the shared model (:func:`cllora.fed.rounds.train_trainee`), which it overwrites.

Under torchrun (``ctx``, :class:`cllora.fed.distributed.DistContext`) each rank trains the
trainees it owns (round-robin by position); every rank then receives every uplink and record
(:meth:`LocalPool.share`), so every rank aggregates alike and holds the same algorithm state;
rank 0 writes the records in trainee order, so the metrics read as the in-process run's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cllora.config import Config, ConfigError
from cllora.data.fingerprint import data_changes, file_digests, sample_digests
from cllora.data.formatting import Sample
from cllora.data.pipeline import ClientData
from cllora.eval_cache import LossCache
from cllora.fed.algorithms.base import Algorithm, Downlink, Trainee, Uplink
from cllora.fed.checkpoint import Checkpoint
from cllora.fed.distributed import DistContext
from cllora.fed.evaluation import Evaluator
from cllora.fed.loop import ClientPool, Run
from cllora.fed.prepare import client_stats, prepare_run
from cllora.fed.rounds import RoundOutcome, TraineeOutcome, train_trainee, write_outcomes
from cllora.fed.strategy import AggregateResult
from cllora.fed.timing import PhaseTimer
from cllora.report.metrics import MetricsLog
from cllora.report.records import record_from_dict


@dataclass
class LocalPool(ClientPool):
    """Every client in this process; see the module doc. Also what
    :func:`~cllora.fed.rounds.train_trainee` reads (``cfg``, ``model``, ``pad_id``,
    ``algorithm``, ``evaluator``, ``timer``)."""

    cfg: Config
    model: Any
    tokenizer: Any
    data: ClientData
    algorithm: Algorithm
    evaluator: Evaluator
    stats: dict[str, dict[str, float]]
    fingerprint: dict[str, Any]
    ctx: DistContext | None
    timer: PhaseTimer

    @classmethod
    def open(
        cls, cfg: Config, run_dir: Path, metrics: MetricsLog, algorithm: Algorithm,
        ckpt: Checkpoint | None, ctx: DistContext | None, timer: PhaseTimer,
    ) -> LocalPool:  # fmt: skip
        """Load the model and the clients, check a resumed run's data, measure the clients."""
        with timer.phase("load"):
            model, tokenizer, data = prepare_run(cfg)
        fingerprint = {
            "files": file_digests(cfg.data.path, cfg.data.format),
            "samples": sample_digests(data.clients, data.global_test),
        }
        if ckpt is not None:
            _check_same_data(run_dir, ckpt, fingerprint)
        # before a resumed adapter is loaded: the quality score is the base model's
        cache = LossCache(cfg.eval.base_cache) if cfg.eval.base_cache else None
        with timer.phase("client_stats"):
            stats = client_stats(
                model, tokenizer, data, cfg, metrics, run_dir, write=ckpt is None, cache=cache
            )
        evaluator = Evaluator(
            data.clients, data.edges, tokenizer.pad_token_id, cfg, metrics, ctx,
            data.global_test, cache,
        )  # fmt: skip
        return cls(cfg, model, tokenizer, data, algorithm, evaluator, stats, fingerprint, ctx,
                   timer)  # fmt: skip

    @property
    def names(self) -> list[str]:  # type: ignore[override]
        return [c.name for c in self.data.clients]

    @property
    def main(self) -> bool:  # type: ignore[override]
        return self.ctx is None or self.ctx.is_main

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    def data_of(self, t: Trainee) -> list[Sample]:
        """The training samples of trainee ``t`` (its own client's, or those of its sources)."""
        clients = self.data.clients
        if t.sources is None:
            return clients[t.index].train
        return [s for i in t.sources for s in clients[i].train]

    # -- the loop's hooks ------------------------------------------------------------------

    def start(self, run: Run) -> None:
        self.evaluator.write_test_samples()

    def checkpoint_extra(self) -> dict[str, Any]:
        return {"data": self.fingerprint}

    def train(
        self, run: Run, r: int, trainees: list[Trainee], downs: list[Downlink], fails: list[bool]
    ) -> RoundOutcome:
        mine = range(len(trainees)) if self.ctx is None else self.ctx.owned(range(len(trainees)))
        outcomes = {k: train_trainee(self, r, trainees[k], self.data_of(trainees[k]), downs[k],
                                     fails[k]) for k in mine}  # fmt: skip
        if self.ctx is not None:
            outcomes = self.share(trainees, downs, outcomes)
        local = write_outcomes(run.metrics, [outcomes[k].records for k in range(len(trainees))])
        uplinks = {k: o.uplink for k, o in outcomes.items() if o.uplink is not None}
        return RoundOutcome(trainees, uplinks, sum(d.nbytes() for d in downs), local)

    def aggregate(
        self, run: Run, r: int, out: RoundOutcome, weights: list[float]
    ) -> AggregateResult:
        """Every client lives here, so what each finisher keeps is stored here, once the round
        is aggregated (a round stopped for too few finishers leaves the state, and so the
        previous round's checkpoint, as it was); then the algorithm's aggregation."""
        for k in sorted(out.uplinks):
            self.algorithm.keep(out.trainees[k].index, out.uplinks[k].kept)
        return super().aggregate(run, r, out, weights)

    def evaluate(self, run: Run, r: int, state: dict[str, torch.Tensor]) -> dict[str, Any]:
        return self.evaluator.global_round(self.model, r)

    def skipped_row(self, r: int) -> dict[str, Any]:
        return self.evaluator.skipped_row(r)

    def generate(self, run: Run, r: int) -> None:
        self.evaluator.generation(self.model, self.tokenizer, r)

    # -- torchrun ----------------------------------------------------------------------------

    def share(
        self, trainees: list[Trainee], downs: list[Downlink], mine: dict[int, TraineeOutcome]
    ) -> dict[int, TraineeOutcome]:
        """Every trainee's outcome on every rank (records as JSON, uplinks as tensors)."""
        ctx = self.ctx
        assert ctx is not None
        gathered = ctx.all_gather_json(
            {k: [x.as_dict() for x in o.records] for k, o in mine.items()}
        )
        records = {int(k): v for part in gathered for k, v in part.items()}
        templates = {k: _flat(self.algorithm.uplink(t.index, downs[k], downs[k].adapter))
                     for k, t in enumerate(trainees)}  # fmt: skip
        flat = {k: _flat(o.uplink) if o.uplink is not None else None for k, o in mine.items()}
        shared = ctx.share_states(flat, templates)
        out = {}
        for k, t in enumerate(trainees):
            up = _unflat(shared[k]) if k in shared else None
            out[k] = TraineeOutcome(t, [record_from_dict(d) for d in records[k]], up)
        return out


def _flat(up: Uplink) -> dict[str, Any]:
    parts = {"adapter": up.adapter, **{f"extra.{n}": s for n, s in up.extra.items()},
             **{f"kept.{n}": s for n, s in up.kept.items()}}  # fmt: skip
    return {f"{p}/{k}": t for p, state in parts.items() for k, t in state.items()}


def _unflat(flat: dict[str, Any]) -> Uplink:
    up = Uplink(adapter={})
    for key, t in flat.items():
        part, k = key.split("/", 1)
        if part == "adapter":
            up.adapter[k] = t
        else:
            where, name = part.split(".", 1)
            (up.extra if where == "extra" else up.kept).setdefault(name, {})[k] = t
    return up


def _check_same_data(run_dir: Path, ckpt: Checkpoint, fingerprint: dict) -> None:
    """A resumed run must rebuild the very samples it trained on (a changed tokenizer or chat
    template shows here even when the files are unchanged)."""
    changes = data_changes(ckpt.extra.get("data", {}), fingerprint)
    if changes:
        raise ConfigError(
            f"cannot resume {run_dir}: its data changed since the run started ({'; '.join(changes)}"
            "); restore the data it trained on, or start a new run"
        )
