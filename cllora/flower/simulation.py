"""Many virtual clients on one machine through Flower's simulation engine (Ray).

Usage::

    from cllora.flower.simulation import simulate
    result = simulate(cfg, cpus=1, client_cpus=1)            # like run_experiment(cfg)
    result = simulate(cfg, gpus=4, client_gpus=1.0)          # one client per GPU at a time
    result = simulate(None, settings=FlowerSettings(resume=str(run_dir)))   # continue a run

One virtual SuperNode per client of the run's partition (Flower's ``partition-id`` is the
client's number): the ServerApp and the ClientApps of :mod:`cllora.flower` run in this process
and in Ray workers, ``client_cpus`` / ``client_gpus`` each (Ray runs as many at once as the
machine's ``cpus`` / ``gpus`` allow). Each worker process loads the model and the data once. With
the same config and seed, the metrics are ``cllora run``'s (tests/flower: within 1e-5 relative,
the order of the float sums being the only difference).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from cllora.config import Config, ConfigError
from cllora.fed.loop import RunResult
from cllora.fed.prepare import check_combination
from cllora.flower import require_flower
from cllora.flower.pool import FlowerSettings, check_flower_config

log = logging.getLogger("cllora")


def simulation_nodes(cfg: Config, nodes: int = 0) -> int:
    """Virtual SuperNodes of a simulation: one per client of the run's partition. ``nodes``,
    when given, must be that number: fewer would leave a client out of every round, more would
    start nodes that hold no client (:class:`ConfigError`, one line naming both numbers)."""
    from cllora.data.pipeline import count_clients

    clients = count_clients(cfg)
    part = cfg.partition
    how = (
        f"one per value of {part.field!r} in {cfg.data.path}"
        if part.method == "field" and not part.pool
        else "partition.num_clients"
    )
    if not clients:
        raise ConfigError(
            f"no record of {cfg.data.path} has the field {part.field!r}: set partition.field, or "
            "partition.method=iid with partition.num_clients"
        )
    if nodes and nodes != clients:
        cost = "a client would never train" if nodes < clients else "a node would hold no client"
        raise ConfigError(
            f"--nodes {nodes} but the partition has {clients} clients ({how}): a simulation "
            f"runs one virtual SuperNode per client ({cost}); give --nodes {clients} or leave "
            "--nodes out"
        )
    return clients


def backend_config(cpus: int, gpus: int, client_cpus: float, client_gpus: float) -> dict:
    """Ray's resources for the simulation and for each ClientApp."""
    init: dict[str, Any] = {"num_cpus": cpus, "num_gpus": gpus, "include_dashboard": False,
                            "log_to_driver": False}  # fmt: skip
    return {"client_resources": {"num_cpus": client_cpus, "num_gpus": client_gpus},
            "init_args": init}  # fmt: skip


def simulate(
    cfg: Config | None,
    settings: FlowerSettings | None = None,
    *,
    cpus: int = 1,
    gpus: int = 0,
    client_cpus: float = 1.0,
    client_gpus: float = 0.0,
) -> RunResult:
    """Run ``cfg`` (or continue ``settings.resume``) on Flower's simulation engine."""
    require_flower(simulation=True)
    settings = settings or FlowerSettings()
    run_cfg = cfg
    if run_cfg is None:
        from cllora.fed.resume import open_resume

        run_cfg, _ = open_resume(Path(settings.resume), None, truncate=False)
    check_combination(run_cfg)  # a bad config fails here, before Flower and Ray start
    n = simulation_nodes(run_cfg, settings.nodes)
    settings.nodes = n
    check_flower_config(run_cfg, settings)
    from flwr.simulation import run_simulation

    from cllora.flower.client_app import app as client_app
    from cllora.flower.server_app import make_server_app

    logging.getLogger("flwr").propagate = False  # Flower prints its own log lines once
    outcome: dict[str, Any] = {}
    server = make_server_app(cfg, settings, outcome)  # cfg None: the resumed run's own
    run_simulation(
        server_app=server, client_app=client_app, num_supernodes=n,
        backend_config=backend_config(cpus, gpus, client_cpus, client_gpus),
    )  # fmt: skip
    if "error" in outcome:
        raise outcome["error"]
    if "result" not in outcome:
        raise RuntimeError("the Flower simulation ended without a result (see its log above)")
    return outcome["result"]
