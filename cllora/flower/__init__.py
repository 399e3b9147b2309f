"""cllora on Flower: a ServerApp and a ClientApp over cllora's algorithms, training and records.

Usage::

    cllora flower simulate examples/demo.yaml fed.rounds=2      # virtual clients, one machine
    cllora flower app flower-app/                               # the Flower App for `flwr run`

    from cllora.flower import require_flower
    require_flower()        # a ConfigError naming the extra to install when flwr is missing

Modules: :mod:`~cllora.flower.messages` (what travels, as Flower records),
:mod:`~cllora.flower.node` (one SuperNode's client: its data, model and handlers),
:mod:`~cllora.flower.client_app` (the ClientApp), :mod:`~cllora.flower.pool`
(the rounds, driven over a Flower ``Grid``), :mod:`~cllora.flower.server_app` (the ServerApp),
:mod:`~cllora.flower.secagg` (secure aggregation with Flower's SecAgg+),
:mod:`~cllora.flower.privacy` (the DP accountant),
:mod:`~cllora.flower.simulation` (Flower's simulation engine), :mod:`~cllora.flower.app_dir`
(the Flower App for ``flwr run``), :mod:`~cllora.flower.credentials` (TLS certificates, node
keys) and :mod:`~cllora.flower.cli` (``cllora flower``). Flower is an optional extra
(``pip install -e ".[flower]"``); nothing else in cllora imports this package. Design and
decisions: ``docs/flower.md``.
"""

from __future__ import annotations

import importlib.util

from cllora.config import ConfigError

EXTRA = 'pip install -e ".[flower]"'


def require_flower(simulation: bool = False) -> None:
    """Raise :class:`ConfigError` (one line, the install command) when flwr (or, for the
    simulation engine, ray) is not installed."""
    missing = [m for m in ("flwr", *(("ray",) if simulation else ())) if not _found(m)]
    if missing:
        raise ConfigError(
            f"cllora flower needs {' and '.join(missing)}, which is not installed: run {EXTRA}"
        )


def _found(module: str) -> bool:
    return importlib.util.find_spec(module) is not None
