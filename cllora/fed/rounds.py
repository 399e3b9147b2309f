"""One federated round: who trains, local training, what travels, aggregation.

Usage::

    from cllora.fed.rounds import RoundOutcome, train_round
    out = train_round(run, r, chosen)    # run: a cllora.fed.runner.Run; chosen: client indices
    out.results, out.bytes_down, out.bytes_up, out.local   # for aggregation and the round record

Everything a round needs comes in the :class:`~cllora.fed.runner.Run` it is given (config,
model, clients, algorithm, evaluator, metrics, process group); it returns what happened instead
of writing through side channels: each trainee's records are written here, in trainee order,
by the main process. The algorithm (:mod:`cllora.fed.algorithms`) decides who trains
(:meth:`~cllora.fed.algorithms.base.Algorithm.trainees`), what goes down and up and how the
client trains; the round counts the bytes of what goes down and up. A trainee that fails (an
exception, a non-finite loss, adapter or local evaluation, a simulated crash) is left out and
logged (``client_failed``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cllora.config import Config
from cllora.fed.algorithms.base import ClientResult, Downlink, Trainee, Uplink
from cllora.fed.client import client_update
from cllora.report.records import ClientFailed, ClientTrain, LocalEval, Record

if TYPE_CHECKING:
    from cllora.fed.runner import Run

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


def train_trainee(run: Run, r: int, t: Trainee, down: Downlink, fail: bool) -> TraineeOutcome:
    """Local training (and local evaluation) of one trainee; failures become a record.

    Reads only ``run``'s ``cfg``, ``model``, ``pad_id``, ``algorithm``, ``evaluator`` and
    ``timer``, so a process that holds one client (a Flower ClientApp, :mod:`cllora.flower`)
    passes an object with those six attributes instead of a whole :class:`Run`."""
    cfg, out = run.cfg, TraineeOutcome(t)
    rules = run.algorithm.local_rules(t.index, down)
    try:
        with run.timer.phase("train"):
            u = client_update(
                run.model, down.adapter, t.train, cfg.train, run.pad_id,
                seed=client_seed(cfg.seed, r, max(t.index, 0)),
                rules=rules, steps=t.steps,
                fail_after=t.steps // 2 if fail else None,
                desc=f"round {r} {t.name}", progress=cfg.progress,
            )  # fmt: skip
        local = []
        if _evaluates_local(cfg, r) and t.index >= 0:  # the model holds the local adapter
            with run.timer.phase("local_eval"):  # non-finite: fails the client
                local = run.evaluator.local(run.model, t.index, r)
        out.uplink = run.algorithm.uplink(t.index, down, u.state)
    except Exception as err:  # one client's failure must not stop the round
        log.warning("round %d: client %s failed: %s: %s", r, t.name, type(err).__name__, err)
        log.debug("traceback", exc_info=True)
        out.records = [ClientFailed(round=r, client=t.name, error=f"{type(err).__name__}: {err}")]
        return out
    rank = run.algorithm.client_rank(t.index)
    out.records = [
        ClientTrain(round=r, client=t.name, rank=rank, losses=u.losses, samples=u.samples,
                    tokens_seen=u.tokens_seen, seconds=round(u.seconds, 3)),
        *local,
    ]  # fmt: skip
    return out


def train_round(run: Run, r: int, chosen: list[int]) -> RoundOutcome:
    """Local training of round ``r``'s trainees from their downlinks; see the module doc.

    Under torchrun each rank trains the trainees it owns; every rank then receives every uplink
    and every record, and the main rank writes the records in trainee order, so the metrics read
    as the in-process run's."""
    trainees = run.algorithm.trainees(chosen, run.clients)
    fails = [run.rng_fail.random() < run.cfg.fed.client_failure_rate for _ in trainees]
    downs = [run.algorithm.downlink(t.index, run.global_state) for t in trainees]
    bytes_down = sum(d.nbytes() for d in downs)
    mine = range(len(trainees)) if run.ctx is None else run.ctx.owned(range(len(trainees)))
    outcomes = {k: train_trainee(run, r, trainees[k], downs[k], fails[k]) for k in mine}
    if run.ctx is not None:
        outcomes = _share(run, trainees, downs, outcomes)
    local: list[LocalEval] = []
    for k in range(len(trainees)):
        for rec in outcomes[k].records:
            run.metrics.write(rec)
            if isinstance(rec, LocalEval):
                local.append(rec)
    uplinks = {k: o.uplink for k, o in outcomes.items() if o.uplink is not None}
    return RoundOutcome(trainees, uplinks, bytes_down, local)


def _share(
    run: Run, trainees: list[Trainee], downs: list[Downlink], mine: dict[int, TraineeOutcome]
) -> dict[int, TraineeOutcome]:
    """Every trainee's outcome on every rank (records as JSON, uplinks as tensors)."""
    from cllora.report.records import record_from_dict

    ctx = run.ctx
    assert ctx is not None
    gathered = ctx.all_gather_json({k: [x.as_dict() for x in o.records] for k, o in mine.items()})
    records = {int(k): v for part in gathered for k, v in part.items()}
    templates = {k: _flat(run.algorithm.uplink(t.index, downs[k], downs[k].adapter))
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
