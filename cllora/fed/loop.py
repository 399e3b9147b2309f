"""The federated round loop, written once for every place the clients can live.

Usage::

    from cllora.fed.loop import Run, run_loop
    run = Run(cfg, run_dir, model, make_algorithm(cfg), pool, metrics)
    result = run_loop(run, ckpt)   # round 0 (or a checkpoint's state), every round, the finish
    result.rows, result.global_state

A :class:`ClientPool` is where the clients are and train: :class:`cllora.fed.pool.LocalPool`
(this process holds every client and one shared model; under torchrun each rank trains the
trainees it owns) and :class:`cllora.flower.pool.FlowerPool` (each client on its SuperNode,
reached through a Flower ``Grid``, in a simulation or a deployment). The loop never asks which
one it drives; what differs between them is the pool's to say:

- ``names`` and ``stats``: the clients, in the run's order, and their sizes (for the weights);
- :meth:`ClientPool.start` / :meth:`ClientPool.resume`: round 0's tables and records, or the
  checks a resumed run must pass; :meth:`ClientPool.checkpoint_extra`: what it adds to every
  checkpoint;
- :meth:`ClientPool.train`: the round's trainees from their downlinks, their records written in
  trainee order;
- :meth:`ClientPool.aggregate`: the algorithm's aggregation, which a pool may wrap (Flower's
  SecAgg+ hands the algorithm the securely summed mean, central DP adds noise to the result);
- :meth:`ClientPool.evaluate` / :meth:`ClientPool.generate`: the global model's evaluation and
  greedy answers.

One round (:func:`run_round`): sample ``ceil(sample_fraction * N)`` clients (seeded), the
algorithm's trainees and their downlinks, the pool trains them; fewer than ``fed.min_clients``
uplinks stop the run on the previous round's checkpoint; weights (``fed.weighting``), the
pool's aggregation, the non-finite guard, the new global model into the model, its evaluation
(every round, or the last, ``eval.global_rounds``), the round record, the answers at the last
round, a checkpoint, one line in the log.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from cllora.config import Config, config_to_dict
from cllora.fed.algorithms import ignored_settings
from cllora.fed.algorithms.base import Algorithm, Downlink, Trainee
from cllora.fed.checkpoint import Checkpoint, rng_states, save_checkpoint, set_rng_states
from cllora.fed.evaluation import add_local_means
from cllora.fed.guards import NonFiniteModelError, TooFewClientsError, non_finite
from cllora.fed.prepare import json_safe
from cllora.fed.rounds import RoundOutcome
from cllora.fed.strategy import AggregateResult, client_weights
from cllora.fed.timing import PhaseTimer
from cllora.report.metrics import MetricsLog, format_table, read_metrics, write_summary
from cllora.report.records import RoundRecord
from cllora.report.sample_losses import FILE_NAME as SAMPLE_LOSSES
from cllora.report.sample_losses import write_sample_losses
from cllora.text import round_line

log = logging.getLogger("cllora")

FAILURE_SEED = 7919  # the simulated failures' generator is seeded with seed + this


@dataclass
class RunResult:
    run_dir: Path
    rows: list[dict[str, Any]] = field(default_factory=list)
    config: Config | None = None
    global_state: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def table(self) -> str:
        return format_table(self.rows)

    @property
    def final_global_loss(self) -> float:
        return self.rows[-1]["global_loss"]


class ClientPool:
    """Where a run's clients are and train; see the module doc. Subclasses set ``names`` and
    ``stats`` and implement :meth:`train`, :meth:`evaluate` and :meth:`skipped_row`."""

    names: list[str]  # the clients, in the run's order (a trainee's index is its position)
    stats: dict[str, dict[str, float]]  # per client: "samples", "tokens", "quality", ...
    main: bool = True  # this process writes the run directory (False: another torchrun rank)
    progress: bool = True  # a progress bar over the rounds (when cfg.progress)

    def start(self, run: Run) -> None:
        """Round 0's tables and records (``clients.csv``, ``test_samples``, ...)."""

    def resume(self, run: Run, ckpt: Checkpoint) -> None:
        """Refuse (a one-line ConfigError) a checkpoint this pool cannot go on from."""

    def checkpoint_extra(self) -> dict[str, Any]:
        """What this pool adds to every checkpoint's ``extra`` (checked by :meth:`resume`)."""
        return {}

    def train(
        self, run: Run, r: int, trainees: list[Trainee], downs: list[Downlink], fails: list[bool]
    ) -> RoundOutcome:
        """Round ``r``'s local trainings (``fails[k]``: trainee k crashes halfway, a simulated
        failure); the trainees' records written in trainee order."""
        raise NotImplementedError

    def aggregate(
        self, run: Run, r: int, out: RoundOutcome, weights: list[float]
    ) -> AggregateResult:
        """The new global model: the algorithm's aggregation of the round's uplinks."""
        agg = run.algorithm.aggregate(run.global_state, out.results(weights))
        agg.info.update(out.info)
        return agg

    def evaluate(self, run: Run, r: int, state: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Evaluate the global model ``state`` (already in ``run.model``); write its records;
        the round's summary row (a non-finite loss raises NonFiniteModelError)."""
        raise NotImplementedError

    def skipped_row(self, r: int) -> dict[str, Any]:
        """The summary row of a round whose global model is not evaluated (NaN losses)."""
        raise NotImplementedError

    def generate(self, run: Run, r: int) -> None:
        """The global model's scored greedy answers (``eval.generate_samples``)."""


@dataclass
class Run:
    """One experiment's shared state: what every round reads and the loop updates."""

    cfg: Config
    run_dir: Path
    model: Any
    algorithm: Algorithm
    pool: ClientPool
    metrics: MetricsLog
    result: RunResult
    timer: PhaseTimer = field(default_factory=PhaseTimer)
    rng: random.Random = field(init=False)  # client sampling
    rng_fail: random.Random = field(init=False)  # simulated client failures

    def __post_init__(self) -> None:
        self.rng = random.Random(self.cfg.seed)
        self.rng_fail = random.Random(self.cfg.seed + FAILURE_SEED)

    @property
    def main(self) -> bool:
        return self.pool.main

    @property
    def global_state(self) -> dict[str, torch.Tensor]:
        return self.result.global_state


def trainees_per_round(n: int, fraction: float) -> int:
    """How many of ``n`` clients a round samples: ``ceil(fraction * n)``, at least one."""
    return max(1, math.ceil(fraction * n))


def sample_clients(n: int, fraction: float, rng: random.Random) -> list[int]:
    """Indices of the clients that train this round (sorted; at least one)."""
    k = trainees_per_round(n, fraction)
    return sorted(rng.sample(range(n), k)) if k < n else list(range(n))


def aggregation_weights(
    stats: dict[str, dict[str, float]], names: Sequence[str], weighting: str
) -> list[float]:
    """Aggregation weights of the trainees ``names`` (``fed.weighting``); a trainee that is no
    client (a pool of every client's data) has the summed numbers of every client."""
    key = weighting if weighting != "uniform" else "samples"
    total = {k: sum(s.get(k, 0.0) for s in stats.values()) for k in ("samples", "tokens")}
    counts = [stats[n][key] if n in stats else total.get(key, 1.0) for n in names]
    return client_weights(counts, weighting)


def run_loop(run: Run, ckpt: Checkpoint | None) -> RunResult:
    """Round 0 (or ``ckpt``'s state), every round to ``fed.rounds``, the finish; the result."""
    ignored = ignored_settings(run.cfg)
    if ignored:  # said once, in run.log: a sweep may set a setting for every arm
        log.warning("%s: fed.strategy=%s does not read %s (another algorithm's setting)",
                    ", ".join(ignored), run.cfg.fed.strategy,
                    "it" if len(ignored) == 1 else "them")  # fmt: skip
    first = start(run, ckpt)
    show = run.cfg.progress and run.pool.progress
    for r in tqdm(range(first, run.cfg.fed.rounds + 1), desc="rounds", disable=not show):
        run_round(run, r)
    finish(run)
    return run.result


def start(run: Run, ckpt: Checkpoint | None) -> int:
    """Round 0 (the pool's records, the initial evaluation and checkpoint), or the state of a
    resumed checkpoint; returns the first round to run."""
    if ckpt is None:
        run.pool.start(run)
        if run.cfg.fed.eval_initial:
            with run.timer.phase("global_eval"):
                run.result.rows.append(run.pool.evaluate(run, 0, run.global_state))
            _generate(run, 0)
        checkpoint(run, 0, rng_states(run.rng, run.rng_fail))
        return 1
    run.pool.resume(run, ckpt)
    device = next(iter(run.global_state.values())).device
    run.result.global_state = _to_device(ckpt.global_state, device)
    run.algorithm.load_state_dict(_to_device(ckpt.server_state, device), run.model)
    run.result.rows = list(ckpt.rows)
    set_rng_states(ckpt.extra["rng"], run.rng, run.rng_fail)
    run.algorithm.apply_global(run.model, run.global_state)
    log.info("resuming %s after round %d of %d", run.run_dir, ckpt.round, run.cfg.fed.rounds)
    return ckpt.round + 1


def run_round(run: Run, r: int) -> dict[str, Any]:
    """Round ``r``: sample, train, aggregate, evaluate, record, checkpoint; its summary row."""
    cfg, pool = run.cfg, run.pool
    started = time.perf_counter()
    rng_before = rng_states(run.rng, run.rng_fail)  # the state a checkpoint of round r-1 holds
    chosen = sample_clients(len(pool.names), cfg.fed.sample_fraction, run.rng)
    log.info("round %d of %d: training on %s", r, cfg.fed.rounds,
             ", ".join(pool.names[i] for i in chosen))  # fmt: skip
    trainees = run.algorithm.trainees(chosen, pool.names)
    fails = [run.rng_fail.random() < cfg.fed.client_failure_rate for _ in trainees]
    downs = [run.algorithm.downlink(t.index, run.global_state) for t in trainees]
    out = pool.train(run, r, trainees, downs, fails)
    if len(out.uplinks) < cfg.fed.min_clients:
        checkpoint(run, r - 1, rng_before)
        raise TooFewClientsError.of(
            r, len(out.uplinks), len(trainees), cfg.fed.min_clients, run.run_dir
        )
    names = [trainees[k].name for k in sorted(out.uplinks)]
    weights = aggregation_weights(pool.stats, names, cfg.fed.weighting)
    with run.timer.phase("aggregate"):
        agg = pool.aggregate(run, r, out, weights)
        _check_global(run, r, agg.state)
        run.algorithm.apply_global(run.model, agg.state)
    if r == cfg.fed.rounds or cfg.eval.global_rounds == "every":
        with run.timer.phase("global_eval"):
            row = pool.evaluate(run, r, agg.state)  # a non-finite loss stops the run
    else:
        row = pool.skipped_row(r)
    run.result.global_state = agg.state
    add_local_means(row, out.local)
    run.result.rows.append(row)
    run.metrics.write(
        RoundRecord(
            round=r, clients=[pool.names[i] for i in chosen], succeeded=len(out.uplinks),
            weights=weights, bytes_down=out.bytes_down, bytes_up=out.bytes_up,
            seconds=round(time.perf_counter() - started, 3), global_loss=row["global_loss"],
            extra=json_safe(agg.info),
        )
    )  # fmt: skip
    if r == cfg.fed.rounds:  # after the round record: its seconds leave generation out
        _generate(run, r)
    checkpoint(run, r, rng_states(run.rng, run.rng_fail))
    seconds = time.perf_counter() - started
    log.info("%s", round_line(r, cfg.fed.rounds, len(out.uplinks), len(trainees),
                              row["global_loss"], row["global_ppl"], seconds))  # fmt: skip
    return row


def _generate(run: Run, r: int) -> None:
    if run.cfg.eval.generate_samples:
        with run.timer.phase("generation"):
            run.pool.generate(run, r)


def finish(run: Run) -> None:
    """The PEFT adapter, ``summary.csv``, ``sample_losses.csv`` and ``timing.json``."""
    if not run.main:
        return
    run.algorithm.export(run.model, run.global_state, run.run_dir / "adapter")
    write_summary(run.run_dir / "summary.csv", run.result.rows)
    write_sample_losses(read_metrics(run.run_dir / "metrics.jsonl"), run.run_dir / SAMPLE_LOSSES)
    timing = json.dumps(run.timer.as_dict(), indent=1) + "\n"
    (run.run_dir / "timing.json").write_text(timing, encoding="utf-8")


def checkpoint(run: Run, r: int, rng: list) -> None:
    """Round ``r``'s checkpoint (the main process only)."""
    if not run.main:
        return
    extra = {"rng": rng, "config": config_to_dict(run.cfg),
             "metrics_records": run.metrics.records, **run.pool.checkpoint_extra()}  # fmt: skip
    with run.timer.phase("checkpoint"):
        save_checkpoint(run.run_dir / "checkpoint", r, run.global_state,
                        run.algorithm.state_dict(), run.result.rows, extra=extra)  # fmt: skip


def _check_global(run: Run, r: int, global_state: dict) -> None:
    """A non-finite aggregate stops the run (round ``r - 1``'s checkpoint is the last good)."""
    bad = non_finite(global_state) + non_finite(run.algorithm.state_dict())
    if bad:
        raise NonFiniteModelError(
            f"round {r}: the aggregated global adapter holds NaN/inf values ({', '.join(bad[:3])}"
            f"); the run stopped; the last good global adapter (round {r - 1}) is in "
            f"{run.run_dir / 'checkpoint'} (lower train.lr or fed.server_lr, or raise "
            "train.grad_clip)"
        )


def _to_device(tree: Any, device: torch.device) -> Any:
    if isinstance(tree, torch.Tensor):
        return tree.to(device)
    if isinstance(tree, dict):
        return {k: _to_device(v, device) for k, v in tree.items()}
    return tree
