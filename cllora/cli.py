"""Command line: ``cllora run``, ``cllora config``.

Usage::

    cllora run                                   # the demo: embedded SmolLM2-135M, builtin corpus
    cllora run examples/medquad.yaml fed.rounds=5 train.lr=5e-4
    cllora config examples/demo.yaml seed=3      # print the resolved config, run nothing
    python -m cllora run ...                     # same thing

Arguments after the optional config file are ``key=value`` overrides (see README's config
reference). Exit status: 0 on success, 2 on a bad config or bad input (the message says which
key, file or line), 1 on any other failure.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import yaml

from cllora.config import ConfigError, config_to_dict, load_config


def _split_args(items: list[str]) -> tuple[str | None, list[str]]:
    """First argument is the config file unless it looks like an override."""
    if items and "=" not in items[0]:
        return items[0], items[1:]
    return None, items


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cllora", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a federated LoRA experiment")
    run.add_argument(
        "args", nargs="*", metavar="[CONFIG] key=value", help="config file, then overrides"
    )
    cfg = sub.add_parser("config", help="print the resolved config and exit")
    cfg.add_argument("args", nargs="*", metavar="[CONFIG] key=value")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``cllora`` console script."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    from cllora.data.readers import DataError
    from cllora.fed.server import TooFewClientsError
    from cllora.model.load import ModelNotFoundError

    try:
        path, overrides = _split_args(args.args)
        cfg = load_config(path, overrides)
        if args.command == "config":
            print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
            return 0
        return _run(cfg)
    except (ConfigError, DataError, ModelNotFoundError, FileExistsError) as err:
        print(f"cllora: error: {err}", file=sys.stderr)
        return 2
    except TooFewClientsError as err:
        print(f"cllora: stopped: {err}", file=sys.stderr)
        return 1


def _run(cfg) -> int:
    from cllora.fed.server import run_experiment

    start = time.perf_counter()
    result = run_experiment(cfg)
    print()
    n_clients = len(result.rows[0]) - 3
    print(f"Federated LoRA: {cfg.model.name}, {n_clients} clients, {cfg.fed.rounds} rounds")
    print(result.table)
    first, last = result.rows[0]["global_loss"], result.final_global_loss
    print(
        f"\nglobal test loss {first:.4f} -> {last:.4f} ({(last - first) / first:+.1%})"
        f" in {time.perf_counter() - start:.0f} s"
    )
    print(f"run directory: {result.run_dir} (config.yaml, metrics.jsonl, summary.csv, adapter/)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
