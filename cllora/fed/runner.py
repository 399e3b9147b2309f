"""The experiment runner: set a run up, run its rounds, checkpoint each, resume, finish.

Usage::

    from cllora.config import load_config
    from cllora.fed.runner import run_experiment

    result = run_experiment(load_config("examples/demo.yaml"))
    print(result.table)          # the printed results table
    result.run_dir               # config.yaml, metrics.jsonl, summary.csv, adapter/, run.log
    run_experiment(None, resume=result.run_dir)   # continue a killed run

One base model is loaded per process and never aggregated; only what the algorithm sends
(:mod:`cllora.fed.algorithms`, chosen by ``fed.strategy``) moves between the clients and the
server, its bytes counted every round. Each round (:func:`run_round`): the server samples
``ceil(sample_fraction * N)`` clients (seeded), the algorithm's trainees train
(:func:`cllora.fed.rounds.train_round`), their uplinks are aggregated by the algorithm, the
global model is evaluated on every client's test set and on the global test set (``__global__``:
their union, or the held-out set of ``partition.global_test_fraction``), and a checkpoint is
written (the global adapter, the algorithm's state, RNG states, rows, config and data
fingerprint). A failed client is left out of its round; fewer than ``fed.min_clients`` successes
stop the run with :class:`~cllora.fed.guards.TooFewClientsError`, a non-finite global model with
:class:`~cllora.fed.guards.NonFiniteModelError`, both keeping the last good checkpoint.

Everything a round needs is one :class:`Run` (no long argument lists, no side channels).
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from cllora.config import Config, ConfigError, config_to_dict, save_config
from cllora.data.fingerprint import data_changes, file_digests, sample_digests
from cllora.data.pipeline import ClientData
from cllora.eval_cache import LossCache
from cllora.fed.algorithms import make_algorithm
from cllora.fed.algorithms.base import Algorithm
from cllora.fed.checkpoint import Checkpoint, rng_states, save_checkpoint, set_rng_states
from cllora.fed.distributed import DistContext
from cllora.fed.evaluation import Evaluator, add_local_means
from cllora.fed.guards import NonFiniteModelError, RunInterrupted, TooFewClientsError, non_finite
from cllora.fed.prepare import check_combination, client_stats, json_safe, prepare_run
from cllora.fed.resume import has_checkpoint, open_resume, start_over
from cllora.fed.rounds import train_round
from cllora.fed.rundir import attach_log_file, make_run_dir, remove_unstarted
from cllora.fed.strategy import client_weights
from cllora.fed.timing import PhaseTimer
from cllora.model.attention import use_backend
from cllora.model.lora import lora_state_dict
from cllora.report.metrics import MetricsLog, format_table, read_metrics, write_summary
from cllora.report.records import RoundRecord
from cllora.report.sample_losses import FILE_NAME as SAMPLE_LOSSES
from cllora.report.sample_losses import write_sample_losses
from cllora.text import round_line

log = logging.getLogger("cllora")


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


@dataclass
class Run:
    """One experiment's shared state: what every round reads and the runner updates."""

    cfg: Config
    run_dir: Path
    model: Any
    tokenizer: Any
    data: ClientData
    algorithm: Algorithm
    evaluator: Evaluator
    metrics: MetricsLog
    stats: dict[str, dict[str, float]]
    fingerprint: dict[str, Any]
    ctx: DistContext | None
    rng: random.Random  # client sampling
    rng_fail: random.Random  # simulated client failures
    result: RunResult
    timer: PhaseTimer = field(default_factory=PhaseTimer)

    @property
    def main(self) -> bool:
        return self.ctx is None or self.ctx.is_main

    @property
    def clients(self) -> list[Any]:
        return self.data.clients

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def global_state(self) -> dict[str, torch.Tensor]:
        return self.result.global_state


def sample_clients(n: int, fraction: float, rng: random.Random) -> list[int]:
    """Indices of the clients that train this round (sorted; at least one)."""
    k = max(1, math.ceil(fraction * n))
    return sorted(rng.sample(range(n), k)) if k < n else list(range(n))


def run_experiment(cfg: Config | None, resume: Path | None = None) -> RunResult:
    """Run a whole federated experiment as ``cfg`` says; write and return its results.

    ``resume``: a run directory killed or stopped earlier; the run goes on from its newest
    intact checkpoint and ends as the uninterrupted run would have. ``cfg`` may then be None
    (the run's saved config); a config that differs from the saved one, or data that changed
    since the run started, is refused naming what differs (:func:`cllora.fed.resume.open_resume`).
    A run directory without a checkpoint (its start failed or was killed) is started over.

    A start that fails (bad data, a model that cannot load, Ctrl-C) before the round-0
    checkpoint removes the run directory it created, so nothing blocks a retry. Ctrl-C raises
    :class:`cllora.fed.guards.RunInterrupted` naming the directory to resume.
    """
    ctx = DistContext.from_env()  # started by torchrun with WORLD_SIZE > 1
    main = ctx is None or ctx.is_main
    created: Path | None = None  # a run directory this call made (removed on a failed start)
    run_dir = Path()
    try:
        ckpt = None
        if resume is not None:
            if ctx is not None:
                ctx.barrier()  # rank 0 cuts metrics.jsonl back; the others only read
            cfg, ckpt = open_resume(Path(resume), cfg, truncate=main)
            run_dir = Path(resume)
        elif cfg is None:
            raise ValueError("run_experiment needs a config or a run directory to resume")
        check_combination(cfg)  # before the run directory exists: a bad config leaves nothing
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        if resume is None:
            run_dir = make_run_dir(cfg) if main else Path()
            created = run_dir if main else None
            if ctx is not None:  # every rank uses rank 0's directory (its timestamp)
                run_dir = Path(ctx.all_gather_json(str(run_dir))[0])
        elif ckpt is None and main:
            log.info(
                "%s has no checkpoint (its start failed or was killed): starting over", run_dir
            )
            start_over(run_dir, keep_config=True)
        return _logged_run(cfg, run_dir, ckpt, ctx)
    except KeyboardInterrupt:
        remove_unstarted(created)
        raise RunInterrupted(run_dir if main and has_checkpoint(run_dir) else None) from None
    except BaseException:
        remove_unstarted(created)
        raise
    finally:
        if ctx is not None:
            ctx.close()


def _logged_run(
    cfg: Config, run_dir: Path, ckpt: Checkpoint | None, ctx: DistContext | None
) -> RunResult:
    """The run with its log file and metrics file open around it."""
    main = ctx is None or ctx.is_main
    handler = attach_log_file(run_dir) if main else logging.NullHandler()
    if ckpt is None and main:
        save_config(cfg, run_dir / "config.yaml")
    metrics = MetricsLog(run_dir / "metrics.jsonl") if main else MetricsLog(None)
    backend = None if cfg.model.attn_backend == "auto" else cfg.model.attn_backend
    try:
        with use_backend(backend):
            run = _setup(cfg, run_dir, metrics, ckpt, ctx)
            first = _start(run, ckpt)
            for r in tqdm(
                range(first, cfg.fed.rounds + 1), desc="rounds", disable=not cfg.progress
            ):
                run_round(run, r)
            _finish(run)
            return run.result
    finally:
        metrics.close()
        logging.getLogger("cllora").removeHandler(handler)
        handler.close()


def _setup(
    cfg: Config, run_dir: Path, metrics: MetricsLog, ckpt: Checkpoint | None,
    ctx: DistContext | None,
) -> Run:  # fmt: skip
    """Load the model and clients, measure them, build the algorithm and the evaluator."""
    timer = PhaseTimer()
    with timer.phase("load"):
        model, tokenizer, data = prepare_run(cfg)
    fingerprint = {
        "files": file_digests(cfg.data.path, cfg.data.format),
        "samples": sample_digests(data.clients, data.global_test),
    }
    if ckpt is not None:
        _check_same_data(run_dir, ckpt, fingerprint)
    result = RunResult(run_dir=run_dir, global_state=lora_state_dict(model), config=cfg)
    # before a resumed adapter is loaded: the quality score is the base model's
    cache = LossCache(cfg.eval.base_cache) if cfg.eval.base_cache else None
    with timer.phase("client_stats"):
        stats = client_stats(
            model, tokenizer, data, cfg, metrics, run_dir, write=ckpt is None, cache=cache
        )
    evaluator = Evaluator(
        data.clients, data.edges, tokenizer.pad_token_id, cfg, metrics, ctx, data.global_test,
        cache,
    )  # fmt: skip
    return Run(
        cfg=cfg, run_dir=run_dir, model=model, tokenizer=tokenizer, data=data,
        algorithm=make_algorithm(cfg), evaluator=evaluator, metrics=metrics, stats=stats,
        fingerprint=fingerprint, ctx=ctx, rng=random.Random(cfg.seed),
        rng_fail=random.Random(cfg.seed + 7919), result=result, timer=timer,
    )  # fmt: skip


def _start(run: Run, ckpt: Checkpoint | None) -> int:
    """Round 0 (the initial evaluation and checkpoint), or the state of a resumed checkpoint;
    returns the first round to run."""
    if ckpt is None:
        run.evaluator.write_test_samples()
        if run.cfg.fed.eval_initial:
            with run.timer.phase("global_eval"):
                run.result.rows.append(run.evaluator.global_round(run.model, 0))
            _generate(run, 0)
        _checkpoint(run, 0, rng_states(run.rng, run.rng_fail))
        return 1
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
    start = time.perf_counter()
    rng_before = rng_states(run.rng, run.rng_fail)  # the state a checkpoint of round r-1 holds
    chosen = sample_clients(len(run.clients), run.cfg.fed.sample_fraction, run.rng)
    out = train_round(run, r, chosen)
    if len(out.uplinks) < run.cfg.fed.min_clients:
        _checkpoint(run, r - 1, rng_before)
        raise TooFewClientsError.of(
            r, len(out.uplinks), len(out.trainees), run.cfg.fed.min_clients, run.run_dir
        )
    weights = _weights(run, [out.trainees[k].name for k in sorted(out.uplinks)])
    with run.timer.phase("aggregate"):
        agg = run.algorithm.aggregate(run.global_state, out.results(weights))
        _check_global(run, r, agg.state)
        run.algorithm.apply_global(run.model, agg.state)
    if r == run.cfg.fed.rounds or run.cfg.eval.global_rounds == "every":
        with run.timer.phase("global_eval"):
            row = run.evaluator.global_round(run.model, r)  # a non-finite loss stops the run
    else:
        row = run.evaluator.skipped_row(r)
    run.result.global_state = agg.state
    add_local_means(row, out.local)
    run.result.rows.append(row)
    run.metrics.write(
        RoundRecord(
            round=r, clients=[run.clients[i].name for i in chosen], succeeded=len(out.uplinks),
            weights=weights, bytes_down=out.bytes_down, bytes_up=out.bytes_up,
            seconds=round(time.perf_counter() - start, 3), global_loss=row["global_loss"],
            extra=json_safe(agg.info),
        )
    )  # fmt: skip
    if r == run.cfg.fed.rounds:  # after the round record: its seconds leave generation out
        _generate(run, r)
    _checkpoint(run, r, rng_states(run.rng, run.rng_fail))
    seconds = time.perf_counter() - start
    log.info("%s", round_line(r, run.cfg.fed.rounds, len(out.uplinks), len(out.trainees),
                              row["global_loss"], row["global_ppl"], seconds))  # fmt: skip
    return row


def _generate(run: Run, r: int) -> None:
    """The global model's scored greedy answers (``eval.generate_samples``; none when 0)."""
    if run.cfg.eval.generate_samples:
        with run.timer.phase("generation"):
            run.evaluator.generation(run.model, run.tokenizer, r)


def _weights(run: Run, names: list[str]) -> list[float]:
    """Aggregation weights of the successful trainees (``fed.weighting``); a trainee that is
    no client (a pool) has the summed numbers of every client."""
    weighting = run.cfg.fed.weighting
    key = weighting if weighting != "uniform" else "samples"
    total = {k: sum(s.get(k, 0.0) for s in run.stats.values()) for k in ("samples", "tokens")}
    counts = [run.stats[n][key] if n in run.stats else total.get(key, 1.0) for n in names]
    return client_weights(counts, weighting)


def _finish(run: Run) -> None:
    if run.main:
        run.algorithm.export(run.model, run.global_state, run.run_dir / "adapter")
        write_summary(run.run_dir / "summary.csv", run.result.rows)
        records = read_metrics(run.run_dir / "metrics.jsonl")
        write_sample_losses(records, run.run_dir / SAMPLE_LOSSES)
        timing = json.dumps(run.timer.as_dict(), indent=1) + "\n"
        (run.run_dir / "timing.json").write_text(timing, encoding="utf-8")


def _checkpoint(run: Run, r: int, rng: list) -> None:
    """Round ``r``'s checkpoint (main process only)."""
    if not run.main:
        return
    extra = {"rng": rng, "config": config_to_dict(run.cfg), "data": run.fingerprint,
             "metrics_records": run.metrics.records}  # fmt: skip
    with run.timer.phase("checkpoint"):
        save_checkpoint(run.run_dir / "checkpoint", r, run.global_state,
                        run.algorithm.state_dict(), run.result.rows, extra=extra)  # fmt: skip


def _check_same_data(run_dir: Path, ckpt: Checkpoint, fingerprint: dict) -> None:
    """A resumed run must rebuild the very samples it trained on (a changed tokenizer or chat
    template shows here even when the files are unchanged)."""
    changes = data_changes(ckpt.extra.get("data", {}), fingerprint)
    if changes:
        raise ConfigError(
            f"cannot resume {run_dir}: its data changed since the run started ({'; '.join(changes)}"
            "); restore the data it trained on, or start a new run"
        )


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
