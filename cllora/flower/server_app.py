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
:class:`~cllora.flower.server.FlowerSettings`, dashes for underscores).
"""

from __future__ import annotations

import shlex
from dataclasses import fields
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from cllora.config import Config, load_config
from cllora.flower.server import FlowerSettings, run_federation


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
        try:
            if cfg is not None or settings is not None:
                run_cfg, run_settings = cfg, settings or FlowerSettings()
            else:
                run_cfg, run_settings = settings_from_run_config(dict(context.run_config))
            result = run_federation(grid, run_cfg, run_settings)
        except BaseException as err:
            if outcome is None:
                raise
            outcome["error"] = err
            return
        if outcome is not None:
            outcome["result"] = result

    return server


app = make_server_app()
