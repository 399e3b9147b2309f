"""The experiment runner: set a run up, run its rounds, checkpoint each, resume, finish.

Usage::

    from cllora.config import load_config
    from cllora.fed.runner import run_experiment

    result = run_experiment(load_config("examples/demo.yaml"))
    print(result.table)          # the printed results table
    result.run_dir               # config.yaml, metrics.jsonl, summary.csv, adapter/, run.log
    run_experiment(None, resume=result.run_dir)   # continue a killed run

This module opens the run (a new run directory, or a killed run's to resume; torchrun's ranks
agree on one) and hands it to the round loop (:func:`cllora.fed.loop.run_loop`) over the
in-process client pool (:class:`cllora.fed.pool.LocalPool`): one base model per process, never
aggregated; only what the algorithm sends (:mod:`cllora.fed.algorithms`, chosen by
``fed.strategy``) moves between the clients and the server, its bytes counted every round. The
global model is evaluated on every client's test set and on the global test set
(``__global__``: their union, or the held-out set of ``partition.global_test_fraction``); every
round ends with a checkpoint (the global adapter, the algorithm's state, RNG states, rows,
config and data fingerprint). A failed client is left out of its round; fewer than
``fed.min_clients`` successes stop the run with :class:`~cllora.fed.guards.TooFewClientsError`, a
non-finite global model with :class:`~cllora.fed.guards.NonFiniteModelError`, both keeping the
last good checkpoint.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from cllora.config import Config, save_config
from cllora.fed.algorithms import make_algorithm
from cllora.fed.checkpoint import Checkpoint
from cllora.fed.distributed import DistContext
from cllora.fed.guards import RunInterrupted
from cllora.fed.loop import Run, RunResult, run_loop, sample_clients
from cllora.fed.pool import LocalPool
from cllora.fed.prepare import check_combination
from cllora.fed.resume import has_checkpoint, open_resume, start_over
from cllora.fed.rundir import attach_log_file, make_run_dir, remove_unstarted
from cllora.fed.timing import PhaseTimer
from cllora.model.attention import use_backend
from cllora.model.lora import lora_state_dict
from cllora.report.metrics import MetricsLog

__all__ = ["RunResult", "run_experiment", "sample_clients"]

log = logging.getLogger("cllora")


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
            timer, algorithm = PhaseTimer(), make_algorithm(cfg)
            pool = LocalPool.open(cfg, run_dir, metrics, algorithm, ckpt, ctx, timer)
            result = RunResult(run_dir, config=cfg, global_state=lora_state_dict(pool.model))
            run = Run(cfg, run_dir, pool.model, algorithm, pool, metrics, result, timer)
            return run_loop(run, ckpt)
    finally:
        metrics.close()
        logging.getLogger("cllora").removeHandler(handler)
        handler.close()
