"""``cllora flower``: run cllora on Flower (simulation), and prepare a deployment.

Usage::

    cllora flower simulate examples/demo.yaml fed.rounds=2 --nodes 4        # one machine
    cllora flower simulate run.yaml --cpus 32 --gpus 4 --client-cpus 8 --client-gpus 1
    cllora flower simulate --resume runs/20261201-101500                   # continue it
    cllora flower simulate run.yaml --secagg --dp-clipping-norm 1 --dp-noise-multiplier 1
    cllora flower app flower-app run.yaml --nodes 3     # the Flower App for `flwr run`
    cllora flower certs certs --host link.example.org   # CA + SuperLink certificate
    cllora flower keys keys hospital-a hospital-b       # SuperNode key pairs
    cllora flower sites sites                           # the data as one file per client

Decision: a simulation is a cllora command (it needs nothing but the config, like ``cllora
run``); a deployment is Flower's own commands (``flower-superlink``, ``flower-supernode``,
``flwr supernode register``, ``flwr run``), for which ``cllora flower app`` writes the Flower
App (a ``pyproject.toml`` naming cllora's ServerApp and ClientApp and holding the run config),
and ``certs`` / ``keys`` make the TLS certificates and node keys. docs/deploy.md ("Deploying
across organisations") shows the whole sequence. Bad input: one line and exit status 2 (through
:func:`cllora.cli.main`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cllora.config import load_config
from cllora.flower import require_flower
from cllora.helptext import HelpFormatter, examples


def _settings_args(p: argparse.ArgumentParser, nodes: str) -> None:
    p.add_argument("--nodes", type=int, default=0, help=nodes)
    p.add_argument(
        "--dp-clipping-norm",
        type=float,
        default=0.0,
        help="differential privacy: clip each update to this L2 norm (0: off)",
    )
    p.add_argument(
        "--dp-noise-multiplier",
        type=float,
        default=0.0,
        help="differential privacy: noise std = multiplier*norm/clients",
    )
    p.add_argument(
        "--round-timeout",
        type=float,
        default=3600.0,
        help="seconds the server waits for a round's replies",
    )
    p.add_argument(
        "--dp-delta",
        type=float,
        default=1e-5,
        help="differential privacy: the delta epsilon is recorded at",
    )
    p.add_argument(
        "--secagg",
        action="store_true",
        help="secure aggregation (Flower's SecAgg+): the server sees sums",
    )
    p.add_argument(
        "--secagg-num-shares",
        type=float,
        default=1.0,
        help="SecAgg+ shares per client (<= 1: of the trainees)",
    )
    p.add_argument(
        "--secagg-reconstruction-threshold",
        type=float,
        default=0.75,
        help="SecAgg+ shares that rebuild a secret (<= 1: of the shares)",
    )


_CONFIG = (
    "a config file (YAML; default: the built-in defaults), then key=value overrides, in any "
    "order with the options"
)
_SIM_NODES = (
    "virtual SuperNodes, one per client: must equal the partition's clients (default: the "
    "config's clients, counted before anything starts)"
)
_APP_NODES = (
    "SuperNodes the server waits for before round 0; each holds one client, its own data "
    "(default: partition.num_clients)"
)


def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The ``cllora flower`` parser and each action's own (read intermixed by :func:`main`)."""
    p = argparse.ArgumentParser(
        prog="cllora flower",
        formatter_class=HelpFormatter,
        description="Run cllora on Flower: a simulation on this machine, or the pieces of a "
        "deployment\n(the Flower App for `flwr run`, TLS certificates, SuperNode keys).",
        epilog=examples(
            "cllora flower simulate examples/demo.yaml fed.rounds=2",
            "cllora flower app flower-app run.yaml --nodes 3",
        )
        + "\n\n'cllora flower ACTION --help' describes an action's options; docs/deploy.md, "
        '"Deploying across organisations",\nshows a whole deployment.',
    )
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    def action(name: str, what: str, description: str, *example: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=what,
            description=description,
            epilog=examples(*example),
            formatter_class=HelpFormatter,
        )

    sim = action(
        "simulate",
        "virtual clients on Flower's simulation engine",
        "Run the experiment on Flower's simulation engine (Ray): one virtual SuperNode per "
        "client;\nthe same records as cllora run.",
        "cllora flower simulate examples/demo.yaml fed.rounds=2",
        "cllora flower simulate run.yaml --cpus 32 --gpus 4 --client-cpus 8 --client-gpus 1",
        "cllora flower simulate --resume runs/20261201-101500",
        "cllora flower simulate run.yaml --secagg --dp-clipping-norm 1 --dp-noise-multiplier 1",
    )
    sim.add_argument("args", nargs="*", metavar="[CONFIG] key=value", help=_CONFIG)
    sim.add_argument(
        "--resume", metavar="RUN_DIR", help="continue a stopped simulation (default: a new run)"
    )
    sim.add_argument("--cpus", type=int, default=1, help="CPUs Ray may use")
    sim.add_argument("--gpus", type=int, default=0, help="GPUs Ray may use")
    sim.add_argument("--client-cpus", type=float, default=1.0, help="CPUs per ClientApp")
    sim.add_argument("--client-gpus", type=float, default=0.0, help="GPUs per ClientApp")
    _settings_args(sim, _SIM_NODES)
    app = action(
        "app",
        "write the Flower App directory for `flwr run`",
        "Write the Flower App (pyproject.toml naming cllora's ServerApp and ClientApp, and the "
        "run\nconfig) that `flwr run` starts on a SuperLink.",
        "cllora flower app flower-app run.yaml --nodes 3",
        "flwr run flower-app <superlink connection> --stream",
    )
    app.add_argument("directory", help="the Flower App directory to write")
    app.add_argument("args", nargs="*", metavar="[CONFIG] key=value", help=_CONFIG)
    _settings_args(app, _APP_NODES)
    sites = action(
        "sites",
        "the config's data as one file per client, to try a deployment",
        "Write the config's data as one JSONL file per client (partition.method=field: one per "
        "value\nof partition.field; otherwise partition.num_clients IID files), each to be one "
        "SuperNode's\ndata-path when a deployment is tried on one machine.",
        "cllora flower sites sites",
        "cllora flower sites sites examples/medquad.yaml partition.method=iid "
        "partition.num_clients=3",
    )
    sites.add_argument("directory", help="where the files are written (new or empty)")
    sites.add_argument("args", nargs="*", metavar="[CONFIG] key=value", help=_CONFIG)
    certs = action(
        "certs",
        "a CA and the SuperLink's TLS certificate",
        "Write a certificate authority and the SuperLink's TLS certificate and key.",
        "cllora flower certs certs --host link.example.org",
    )
    certs.add_argument("directory", help="where the certificates are written")
    certs.add_argument(
        "--host",
        action="append",
        required=True,
        help="an address the SuperNodes dial (repeat for several; required)",
    )
    keys = action(
        "keys",
        "SuperNode authentication key pairs",
        "Write one authentication key pair per SuperNode (the private key stays on its node).",
        "cllora flower keys keys hospital-a hospital-b",
    )
    keys.add_argument("directory", help="where the key pairs are written")
    keys.add_argument("names", nargs="+", help="one name per SuperNode")
    return p, dict(sub.choices)


def _config_args(items: list[str]) -> tuple[str | None, list[str]]:
    if items and "=" not in items[0]:
        return items[0], items[1:]
    return None, items


def main(argv: list[str]) -> int:
    """Entry point of ``cllora flower`` (errors go up to :func:`cllora.cli.main`)."""
    parser, actions = _parser()
    args, _ = parser.parse_known_args(argv)
    rest = argv[argv.index(args.action) + 1 :]
    args = actions[args.action].parse_intermixed_args(rest, argparse.Namespace(action=args.action))
    require_flower(simulation=args.action == "simulate")  # certs and keys: its cryptography
    if args.action == "certs":
        from cllora.flower.credentials import write_tls

        paths = write_tls(Path(args.directory), args.host)
        print("; ".join(f"{k}: {v}" for k, v in paths.items()))
        return 0
    if args.action == "keys":
        from cllora.flower.credentials import write_node_keys

        for name in args.names:
            private, public = write_node_keys(Path(args.directory), name)
            print(f"{name}: private key {private} (stays on its node), public key {public}")
        return 0
    if args.action == "sites":
        return _sites(args)
    keys = ("nodes", "dp_clipping_norm", "dp_noise_multiplier", "round_timeout", "dp_delta",
            "secagg", "secagg_num_shares", "secagg_reconstruction_threshold")  # fmt: skip
    settings = {k: getattr(args, k) for k in keys}
    path, overrides = _config_args(args.args)
    if args.action == "app":
        from cllora.flower.app_dir import write_app

        load_config(path, overrides)  # a bad config fails here, not on the SuperLink
        where = str(Path(path).resolve()) if path else ""
        out = write_app(Path(args.directory), where, " ".join(overrides), **settings)
        print(f"Flower App: {out} (run it with: flwr run {out} <superlink connection> --stream)")
        return 0
    return _simulate(args, path, overrides, settings)


def _sites(args: argparse.Namespace) -> int:
    from cllora.flower.sites import write_sites

    path, overrides = _config_args(args.args)
    written = write_sites(load_config(path, overrides), Path(args.directory))
    for file, count in written:
        print(f"{file}: {count} records")
    first = written[0][0]
    print(f"{len(written)} sites: start one SuperNode per file with --node-config "
          f"\"data-path='{first}' name='{first.stem}'\" (docs/flower.md)")  # fmt: skip
    return 0


def _simulate(args: argparse.Namespace, path: str | None, overrides: list[str],
              settings: dict) -> int:  # fmt: skip
    from cllora.flower.pool import FlowerSettings
    from cllora.flower.simulation import simulate

    resume = args.resume or ""
    cfg = load_config(path, overrides) if (path or overrides or not resume) else None
    result = simulate(
        cfg, FlowerSettings(resume=resume, **settings), cpus=args.cpus, gpus=args.gpus,
        client_cpus=args.client_cpus, client_gpus=args.client_gpus,
    )  # fmt: skip
    print(result.table)
    print(f"run directory: {result.run_dir}")
    return 0
