"""The in-process federated server, as one import: the runner and what tests and tools use.

Usage::

    from cllora.fed.server import run_experiment
    result = run_experiment(load_config("examples/demo.yaml"))

The code lives in :mod:`cllora.fed.runner` (the experiment: set-up, rounds, checkpoints,
resume), :mod:`cllora.fed.rounds` (one round's local training and traffic),
:mod:`cllora.fed.prepare` (model, clients, stats), :mod:`cllora.fed.rundir` (run directories)
and :mod:`cllora.fed.algorithms` (one file per ``fed.strategy``).
"""

from __future__ import annotations

from cllora.fed.guards import NonFiniteModelError, TooFewClientsError
from cllora.fed.prepare import prepare, prepare_run
from cllora.fed.rounds import client_seed
from cllora.fed.runner import RunResult, run_experiment, sample_clients
from cllora.report.records import GLOBAL

__all__ = [
    "GLOBAL",
    "NonFiniteModelError",
    "RunResult",
    "TooFewClientsError",
    "client_seed",
    "prepare",
    "prepare_run",
    "run_experiment",
    "sample_clients",
]
