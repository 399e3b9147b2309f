"""The Flower ServerApp: a cllora run whose clients are SuperNodes.

Usage::

    from cllora.flower.server_app import app, make_server_app   # flwr.serverapp.ServerApp
    server = make_server_app(cfg, FlowerSettings(nodes=4))        # a config in hand (simulation)

``app`` (what ``flwr run`` loads from the Flower App that ``cllora flower app DIR`` writes)
reads its run config (``[tool.flwr.app.config]`` of the app, overridden by ``flwr run
--run-config``): ``config`` (the cllora YAML on the coordinator; empty: the defaults),
``overrides`` (``key=value`` overrides, space separated), ``nodes``, ``node-wait``,
``round-timeout``, ``dp-clipping-norm``, ``dp-noise-multiplier``, ``dp-delta``, ``secagg``,
``secagg-num-shares``, ``secagg-reconstruction-threshold``, ``secagg-clipping-range``,
``secagg-quantization-range`` and ``resume`` (the fields of
:class:`~cllora.flower.pool.FlowerSettings`, dashes for underscores).

Under ``flwr run``, cllora's log lines go to the ServerApp's output (which ``flwr run --stream``
shows) as well as to the run's ``run.log``. An error that is the user's to fix (a node's
malformed data, a bad setting, too few clients: :data:`~cllora.flower.pool.STOPS`) ends the
ServerApp with its one line there, and no traceback; Flower then records the run as finished,
not failed (any exception out of a ServerApp is logged by Flower with its traceback). Any other
exception (a bug) is raised to Flower, traceback and all.
"""

from __future__ import annotations

import logging
import shlex
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import fields
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from cllora.config import Config, load_config
from cllora.flower.pool import STOPS, FlowerSettings, run_federation

log = logging.getLogger("cllora")


def settings_from_run_config(run_config: dict[str, Any]) -> tuple[Config | None, FlowerSettings]:
    """The cllora config (None when resuming without one) and the Flower settings."""
    values = {}
    for f in fields(FlowerSettings):
        key = f.name.replace("_", "-")
        if key in run_config:
            values[f.name] = type(getattr(FlowerSettings(), f.name))(run_config[key])
    settings = FlowerSettings(**values)
    path = str(run_config.get("config", "")) or None
    overrides = shlex.split(str(run_config.get("overrides", "")))
    cfg = None if settings.resume and not (path or overrides) else load_config(path, overrides)
    return cfg, settings


def make_server_app(
    cfg: Config | None = None, settings: FlowerSettings | None = None, outcome: dict | None = None
) -> ServerApp:
    """A ServerApp that runs ``cfg`` with ``settings`` (both None: read from the run config, see
    the module doc); ``outcome`` gets the run's result (``"result"``) or its error
    (``"error"``)."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        with _log_to_stderr(outcome is None):  # under `flwr run`: where the user reads it
            try:
                result = run_federation(grid, *_config(context))
            except BaseException as err:
                if outcome is not None:
                    outcome["error"] = err
                    return
                if isinstance(err, STOPS):  # its one line is logged
                    return
                raise
        if outcome is not None:
            outcome["result"] = result

    def _config(context: Context) -> tuple[Config | None, FlowerSettings]:
        if cfg is not None or settings is not None:
            return cfg, settings or FlowerSettings()
        try:
            return settings_from_run_config(dict(context.run_config))
        except STOPS as err:
            log.error("error: %s", err)
            raise

    return server


@contextmanager
def _log_to_stderr(on: bool) -> Iterator[None]:
    """The ``cllora`` logger also on stderr (``cllora: <message>``) within the block."""
    if not on:
        yield
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("cllora: %(message)s"))
    logging.getLogger("cllora").addHandler(handler)
    logging.getLogger("cllora").setLevel(logging.INFO)
    try:
        yield
    finally:
        logging.getLogger("cllora").removeHandler(handler)


app = make_server_app()
