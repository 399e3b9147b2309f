"""The in-process federated server, as one import: the runner and what tests and tools use.

Usage::

    from cllora.fed.server import run_experiment
    result = run_experiment(load_config("examples/demo.yaml"))

The code lives in :mod:`cllora.fed.runner` (opening a run, resume, torchrun),
:mod:`cllora.fed.loop` (the rounds, checkpoints, the finish), :mod:`cllora.fed.pool` (the
in-process clients), :mod:`cllora.fed.rounds` (one trainee's local training),
:mod:`cllora.fed.prepare` (model, clients, stats), :mod:`cllora.fed.rundir` (run directories)
and :mod:`cllora.fed.algorithms` (one file per ``fed.strategy``).
"""

from __future__ import annotations

from cllora.fed.guards import NonFiniteModelError, TooFewClientsError
from cllora.fed.loop import RunResult, sample_clients
from cllora.fed.prepare import prepare, prepare_run
from cllora.fed.rounds import client_seed
from cllora.fed.runner import run_experiment
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
