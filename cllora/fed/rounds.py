"""What one trainee of a round does, and what a round's trainees produced.

Usage::

    from cllora.fed.rounds import RoundOutcome, train_trainee, write_outcomes
    out = train_trainee(trainer, r, trainee, data, down, fail=False)   # records + uplink
    local = write_outcomes(metrics, [out.records, ...])   # in trainee order; the local evals

Every client pool (:mod:`cllora.fed.loop`) trains a trainee with :func:`train_trainee`: in this
process (:class:`cllora.fed.pool.LocalPool`) or on the SuperNode that holds its data
(:mod:`cllora.flower.node`). The algorithm (:mod:`cllora.fed.algorithms`) decides how the client
trains (:meth:`~cllora.fed.algorithms.base.Algorithm.local_rules`) and what goes up
(:meth:`~cllora.fed.algorithms.base.Algorithm.uplink`). A trainee that fails (an exception, a
non-finite loss, adapter or local evaluation, a simulated crash) is left out and logged
(``client_failed``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cllora.config import Config
from cllora.data.formatting import Sample
from cllora.fed.algorithms.base import ClientResult, Downlink, Trainee, Uplink
from cllora.fed.client import client_update
from cllora.report.metrics import MetricsLog
from cllora.report.records import ClientFailed, ClientTrain, LocalEval, Record

log = logging.getLogger("cllora")


def client_seed(seed: int, round_idx: int, client_idx: int) -> int:
    """Seed of one client's local training in one round (independent of which others ran)."""
    return (seed * 1_000_003 + round_idx * 10_007 + client_idx * 101) % (2**31)


@dataclass
class TraineeOutcome:
    """One trainee's round: its records, and its uplink (None when it failed)."""

    trainee: Trainee
    records: list[Record] = field(default_factory=list)
    uplink: Uplink | None = None


@dataclass
class RoundOutcome:
    """What the trainees of a round produced, in trainee order."""

    trainees: list[Trainee]
    uplinks: dict[int, Uplink]  # trainee position -> uplink, for those that succeeded
    bytes_down: int
    local: list[LocalEval]
    info: dict[str, Any] = field(default_factory=dict)  # for the round record (e.g. SecAgg+)

    @property
    def bytes_up(self) -> int:
        return sum(u.nbytes() for u in self.uplinks.values())

    def results(self, weights: list[float]) -> list[ClientResult]:
        """The successful uplinks with their aggregation weights (in trainee order)."""
        ok = sorted(self.uplinks)
        return [
            ClientResult(self.trainees[k].index, self.uplinks[k], w)
            for k, w in zip(ok, weights, strict=True)
        ]


def _evaluates_local(cfg: Config, r: int) -> bool:
    """Whether round ``r``'s local models are evaluated (``eval.local``, ``eval.local_rounds``)."""
    return cfg.eval.local and (cfg.eval.local_rounds == "every" or r == cfg.fed.rounds)


def train_trainee(
    trainer: Any, r: int, t: Trainee, data: Sequence[Sample], down: Downlink, fail: bool
) -> TraineeOutcome:
    """Local training (and local evaluation) of one trainee on ``data``; failures become a
    record.

    ``trainer``: what holds the model and the client's evaluation: an object with the
    attributes ``cfg``, ``model``, ``pad_id``, ``algorithm``, ``evaluator`` and ``timer`` (the
    in-process pool, or a Flower node)."""
    cfg, out = trainer.cfg, TraineeOutcome(t)
    rules = trainer.algorithm.local_rules(t.index, down)
    try:
        with trainer.timer.phase("train"):
            u = client_update(
                trainer.model, down.adapter, data, cfg.train, trainer.pad_id,
                seed=client_seed(cfg.seed, r, max(t.index, 0)),
                rules=rules, steps=t.steps,
                fail_after=t.steps // 2 if fail else None,
                desc=f"round {r} {t.name}", progress=cfg.progress,
            )  # fmt: skip
        local = []
        if _evaluates_local(cfg, r) and t.index >= 0:  # the model holds the local adapter
            with trainer.timer.phase("local_eval"):  # non-finite: fails the client
                local = trainer.evaluator.local(trainer.model, t.index, r)
        out.uplink = trainer.algorithm.uplink(t.index, down, u.state)
    except Exception as err:  # one client's failure must not stop the round
        log.warning("round %d: client %s failed: %s: %s", r, t.name, type(err).__name__, err)
        log.debug("traceback", exc_info=True)
        out.records = [ClientFailed(round=r, client=t.name, error=f"{type(err).__name__}: {err}")]
        return out
    rank = trainer.algorithm.client_rank(t.index)
    out.records = [
        ClientTrain(round=r, client=t.name, rank=rank, losses=u.losses, samples=u.samples,
                    tokens_seen=u.tokens_seen, seconds=round(u.seconds, 3)),
        *local,
    ]  # fmt: skip
    return out


def write_outcomes(metrics: MetricsLog, records: Sequence[Sequence[Record]]) -> list[LocalEval]:
    """Write every trainee's records (``records[k]``: trainee k's) in trainee order; the local
    evaluations among them."""
    local: list[LocalEval] = []
    for mine in records:
        for rec in mine:
            metrics.write(rec)
            if isinstance(rec, LocalEval):
                local.append(rec)
    return local
