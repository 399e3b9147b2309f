"""Command line: ``cllora run``, ``config``, ``sweep``, ``report``, ``list``, ``bench``,
``profile``, ``plan``, ``flower`` (``cllora --help`` lists them, ``cllora COMMAND --help``
describes each option with its default and ends with examples: :mod:`cllora.helptext`).

Usage::

    cllora run                                   # the demo: embedded SmolLM2-135M, builtin corpus
    cllora run examples/medquad.yaml fed.rounds=5 train.lr=5e-4
    cllora run --resume runs/20261126-101500     # continue a killed run where it stopped
    cllora config examples/demo.yaml seed=3      # print the resolved config, run nothing
    cllora config --keys                         # every config key: default, allowed, meaning
    cllora list models                           # or: cllora list algorithms
    cllora --version
    cllora sweep examples/length_heterogeneity.yaml [key=value ...]   # a grid of runs, resumable
    cllora report runs/length                    # plots + report.html of a run or a sweep
    cllora bench --contexts 512,1024,2048        # training-step speed and memory per context
    cllora profile --contexts 512,1024,2048      # where the step's time goes, traces, cost model
    cllora plan --providers cllora-4bit --contexts 4096,32768 --gpu h100   # GPU cost, on the CPU
    cllora flower simulate examples/demo.yaml    # on Flower (extra: cllora[flower])
    python -m cllora run ...                     # same thing

Arguments after the optional config file are ``key=value`` overrides (``cllora config --keys``),
in any order with the options (each command's parser reads them intermixed). ``bench`` and
``profile`` pass their options to the benchmark engine, :mod:`cllora.bench.e2e` and
:mod:`cllora.bench.profile` (``cllora bench --help`` lists them), installed with cllora.

Errors: one line on stderr naming the cause and the fix, never a traceback unless ``--debug``
is given (before or after the subcommand). Exit status: 0 on success; 2 on a bad config or bad
input (the message names the key, file or line); 1 when a run stops (too few clients, a
non-finite global model: its last good checkpoint is kept) or on any other failure; 130 on
Ctrl-C and 143 on SIGTERM, after printing the exact command that resumes the run.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import threading
import time
from pathlib import Path

import yaml

from cllora.config import ConfigError, config_to_dict, load_config
from cllora.helptext import HelpFormatter, examples
from cllora.logs import configure_logging
from cllora.model.cpu_memory import align_large_buffers, wants_aligned_buffers


def _split_args(items: list[str]) -> tuple[str | None, list[str]]:
    """First argument is the config file unless it looks like an override."""
    if items and "=" not in items[0]:
        return items[0], items[1:]
    return None, items


_DESCRIPTION = (
    "cllora: federated LoRA / QLoRA fine-tuning that measures how each client's context length\n"
    "and quality shape the local and the global model."
)
_EPILOG = (
    examples(
        "cllora run                          # the demo: embedded SmolLM2-135M, builtin corpus",
        "cllora run examples/medquad.yaml fed.rounds=5 train.lr=5e-4",
        "cllora config --keys                # every config key, default and meaning",
        "cllora sweep examples/length_heterogeneity.yaml && cllora report runs/length",
        "cllora flower simulate examples/demo.yaml fed.rounds=1",
    )
    + "\n\n'cllora COMMAND --help' describes a command's options. A bad config or bad input is "
    "one line on\nstderr naming the key, file or line, and exit status 2; 1 when a run stops or "
    "fails; 130 on\nCtrl-C and 143 on SIGTERM, after printing the command that resumes the run."
)


_COMMANDS = (
    ("run", "run a federated LoRA experiment"),
    ("config", "print the resolved config (or every config key: --keys) and exit"),
    ("sweep", "run a grid of experiments (resumable), one results CSV"),
    ("report", "plots and an HTML report of a run or sweep directory"),
    ("list", "list the models or the federated algorithms cllora knows"),
    ("bench", "training-step speed and memory per context length"),
    ("profile", "where a training step's time goes, per context length"),
    ("plan", "predicted GPU memory, FLOPs, bytes and time of a step, on the CPU"),
    ("flower", "simulate on Flower, or prepare a Flower deployment (extra: cllora[flower])"),
)
# their own parsers read their options (`cllora bench --help` shows them)
_PASS_THROUGH = ("bench", "profile", "plan", "flower")
_OVERRIDES = (
    "a config file (YAML; default: the demo settings), then key=value overrides, in any order "
    "with the options (cllora config --keys lists the keys)"
)


def _version() -> str:
    """``cllora <version>``, with the torch and transformers installed (read without importing)."""
    from importlib.metadata import PackageNotFoundError, version

    from cllora import __version__

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    deps = ", ".join(f"{n} {installed(n)}" for n in ("torch", "transformers"))
    return f"cllora {__version__} ({deps}, Python {sys.version.split()[0]})"


def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The ``cllora`` parser and each command's own (which :func:`_parse` reads intermixed)."""
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show the traceback of an error, debug logs and the warnings cllora hides",
    )
    p = argparse.ArgumentParser(
        prog="cllora",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        parents=[debug],
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "--version",
        action="version",
        version=_version(),
        help="print cllora's version (and torch's, transformers') and exit",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    what = dict(_COMMANDS)

    def command(name: str, description: str, *example: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=what[name],
            description=description,
            epilog=examples(*example),
            parents=[debug],
            formatter_class=HelpFormatter,
        )

    run = command(
        "run",
        "Run a federated LoRA experiment: the config (file, then overrides) decides the model, "
        "data,\nclients and algorithm; the run directory holds its config, metrics and adapter.",
        "cllora run                                   # the demo: embedded SmolLM2-135M",
        "cllora run examples/medquad.yaml fed.rounds=5 train.lr=5e-4",
        "cllora run --resume runs/20261126-101500     # continue a killed run",
        "cllora run fed.rounds=1 --resume runs/x progress=false   # options and overrides mix",
    )
    run.add_argument("args", nargs="*", metavar="[CONFIG] key=value", help=_OVERRIDES)
    run.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue a killed run from its last complete round (a config or overrides given "
        "too must not change the experiment; default: a new run)",
    )
    cfg = command(
        "config",
        "Print the resolved config (defaults < file < overrides) as YAML, and run nothing; or,\n"
        "with --keys, every config key with its default, allowed values and meaning.",
        "cllora config examples/demo.yaml seed=3",
        "cllora config --keys                # the reference of every key",
        "cllora config --keys --markdown     # the table of docs/config.md",
    )
    cfg.add_argument("args", nargs="*", metavar="[CONFIG] key=value", help=_OVERRIDES)
    cfg.add_argument(
        "--keys",
        action="store_true",
        help="print every config key: default, allowed values, meaning",
    )
    cfg.add_argument(
        "--markdown", action="store_true", help="with --keys: as docs/config.md's Markdown table"
    )
    sweep = command(
        "sweep",
        "Run every cell of a sweep file (a grid over config keys, seeds), one run directory "
        "each;\nrunning it again skips the finished cells.",
        "cllora sweep examples/length_heterogeneity.yaml",
        "cllora sweep examples/length_heterogeneity.yaml fed.rounds=1 progress=false",
    )
    sweep.add_argument("sweep_file", metavar="SWEEP.yaml", help="the sweep file")
    sweep.add_argument(
        "args",
        nargs="*",
        metavar="key=value",
        help="overrides of every cell, in any order with the options",
    )
    report = command(
        "report",
        "Plots and report/report.html of a run or sweep directory (and a study's tables).",
        "cllora report runs/20261126-101500",
        "cllora report runs/length            # a sweep: one figure per setting",
    )
    report.add_argument(
        "directory", metavar="RUN_OR_SWEEP_DIR", help="a run directory or a sweep directory"
    )
    listing = command(
        "list",
        "List what cllora knows: models (embedded, tiny test models, random-weight presets with\n"
        "their sizes) or federated algorithms (fed.strategy values, from cllora/fed/algorithms).",
        "cllora list models",
        "cllora list algorithms",
    )
    listing.add_argument("what", choices=("models", "algorithms"), help="what to list")
    for name in _PASS_THROUGH:  # their own parsers describe their options
        tool = sub.add_parser(name, help=what[name], add_help=False)
        tool.add_argument("args", nargs="*")
    commands = {n: sub.choices[n] for n, _ in _COMMANDS if n not in _PASS_THROUGH}
    return p, commands


def _parse(argv: list[str]) -> argparse.Namespace:
    """The command and its arguments; options and ``key=value`` overrides in any order."""
    parser, commands = _parser()
    args, _ = parser.parse_known_args(argv)
    if args.command in _PASS_THROUGH:
        return args
    rest = argv[argv.index(args.command) + 1 :]
    parsed = commands[args.command].parse_intermixed_args(rest)
    parsed.command = args.command
    if getattr(args, "debug", False):  # given before the command
        parsed.debug = True
    return parsed


def _configs(args: argparse.Namespace) -> list:
    """The config(s) ``cllora run`` / ``sweep`` will run (loading them imports no torch)."""
    if args.command == "sweep":
        from cllora.sweep import load_sweep

        return [cell.cfg for cell in load_sweep(args.sweep_file, args.args).cells]
    path, overrides = _split_args(args.args)
    if args.resume and not path:
        path = str(Path(args.resume) / "config.yaml")
    return [load_config(path, overrides)]


def _cpu_buffer_policy(args: argparse.Namespace) -> None:
    """Page-aligned big CPU buffers (:func:`cllora.model.cpu_memory.align_large_buffers`) for
    runs that checkpoint or release memory: glibc's heap then fragments far less and the peak RSS
    drops. Not for the others: there it saves nothing and costs speed (benchmarks/results/
    e2e-cpu.md, "Page-aligned CPU buffers against heap fragmentation"). torch reads the setting
    once, so this runs before torch is imported; bench/profile decide it per cell."""
    try:
        configs = _configs(args)
    except Exception:  # the real load below reports a bad config, with its exit status
        return
    if any(wants_aligned_buffers(c) for c in configs):
        align_large_buffers()


class _Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C (a scheduler stopping the job): exit status 143."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise _Terminated()


def _interrupted(args: argparse.Namespace, err: KeyboardInterrupt) -> int:
    """One line saying how to go on after Ctrl-C / SIGTERM; the exit status 130 / 143."""
    from cllora.fed.guards import RunInterrupted

    what = (
        "terminated"
        if isinstance(err, _Terminated) or isinstance(err.__context__, _Terminated)
        else "interrupted"
    )
    if args.command == "sweep":
        again = shlex.join(["cllora", "sweep", args.sweep_file, *args.args])
        hint = f"finished cells are kept; continue with: {again}"
    elif isinstance(err, RunInterrupted) and err.run_dir is not None:
        hint = f"resume with: cllora run --resume {shlex.quote(str(err.run_dir))}"
    elif args.command == "run":
        hint = "no round was checkpointed yet, nothing to resume: run the same command again"
    else:
        hint = "nothing was written"
    print(f"cllora: {what}; {hint}", file=sys.stderr)
    return 143 if what == "terminated" else 130


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``cllora`` console script."""
    args = _parse(list(argv if argv is not None else sys.argv[1:]))
    debug = getattr(args, "debug", False)
    configure_logging(debug)
    previous = None
    if args.command in ("run", "sweep"):
        _cpu_buffer_policy(args)  # before anything imports torch
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _dispatch(args, argv)
    except KeyboardInterrupt as err:
        if debug:
            raise
        return _interrupted(args, err)
    except Exception as err:
        if debug:
            raise
        return _report_error(err)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _report_error(err: Exception) -> int:
    """Print one line for ``err``; its exit status (2: the user's input, 1: anything else)."""
    from cllora.data.readers import DataError
    from cllora.fed.guards import RunStopped
    from cllora.model.load import ModelNotFoundError

    if isinstance(err, ConfigError | DataError | ModelNotFoundError | FileExistsError):
        print(f"cllora: error: {err}", file=sys.stderr)
        return 2
    if isinstance(err, FileNotFoundError):
        print(f"cllora: error: {err.strerror or err}: {err.filename or ''}".rstrip(": "),
              file=sys.stderr)  # fmt: skip
        return 2
    if isinstance(err, RunStopped):
        print(f"cllora: stopped: {err}", file=sys.stderr)
        return 1
    text = str(err).strip().splitlines()
    print(
        f"cllora: error: {type(err).__name__}: {text[0] if text else ''} (unexpected: rerun with "
        "--debug for the traceback and report it)",
        file=sys.stderr,
    )
    return 1


def _dispatch(args: argparse.Namespace, argv: list[str] | None) -> int:
    """Run the subcommand ``args`` names."""
    if args.command == "sweep":
        return _sweep(args.sweep_file, args.args)
    if args.command in ("bench", "profile"):
        if args.command == "bench":
            from cllora.bench.e2e import main as tool_main
        else:
            from cllora.bench.profile import main as tool_main
        try:
            return tool_main(list(argv if argv is not None else sys.argv[1:])[1:])
        except ValueError as err:  # an unknown provider, preset or option value
            print(f"cllora {args.command}: error: {err}", file=sys.stderr)
            return 2
    if args.command == "plan":
        from cllora.plan.cli import main as plan_main

        return plan_main(list(argv if argv is not None else sys.argv[1:])[1:])
    if args.command == "flower":
        from cllora.flower.cli import main as flower_main

        rest = list(argv if argv is not None else sys.argv[1:])
        return flower_main([a for a in rest[rest.index("flower") + 1 :] if a != "--debug"])
    if args.command == "report":
        from cllora.report.html import make_report

        print(f"report: {make_report(Path(args.directory))}")
        study = Path(args.directory) / "report" / "study.md"
        if (Path(args.directory) / "study.yaml").is_file() and study.is_file():
            print(f"\n{study.read_text(encoding='utf-8')}")  # controls, primary, exploratory
        return 0
    if args.command == "list":
        from cllora.catalog import algorithms_text, models_text

        print(models_text() if args.what == "models" else algorithms_text(), end="")
        return 0
    if args.command == "config" and (args.keys or args.markdown):
        return _config_keys(args)
    path, overrides = _split_args(args.args)
    if args.command == "run" and args.resume:
        saved = Path(args.resume) / "config.yaml"
        # overrides alone apply to the run's saved config (e.g. progress=false)
        cfg = load_config(path or str(saved), overrides) if path or overrides else None
        return _run(cfg, Path(args.resume))
    cfg = load_config(path, overrides)
    if args.command == "config":
        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
        return 0
    return _run(cfg)


def _config_keys(args: argparse.Namespace) -> int:
    """``cllora config --keys [--markdown]``: every key's reference (docs/config.md's table)."""
    from cllora.config_reference import reference_markdown, reference_text

    if not args.keys:
        raise ConfigError("--markdown goes with --keys: cllora config --keys --markdown")
    if args.args:
        raise ConfigError(
            f"config --keys lists the keys and their defaults; it takes no config or overrides "
            f"(got {' '.join(args.args)}): drop them, or leave out --keys to see their values"
        )
    print(reference_markdown() if args.markdown else reference_text(), end="")
    return 0


def _run(cfg, resume: Path | None = None) -> int:
    from cllora.fed.server import run_experiment

    start = time.perf_counter()
    result = run_experiment(cfg, resume)
    cfg = result.config
    print()
    clients_csv = Path(result.run_dir) / "clients.csv"  # pool mode has no loss[client] columns
    n_clients = len(clients_csv.read_text().splitlines()) - 1 if clients_csv.is_file() else 0
    print(f"Federated LoRA: {cfg.model.name}, {n_clients} clients, {cfg.fed.rounds} rounds")
    print(result.table)
    first, last = result.rows[0]["global_loss"], result.final_global_loss
    print(
        f"\nglobal test loss {first:.4f} -> {last:.4f} ({(last - first) / first:+.1%})"
        f" in {time.perf_counter() - start:.0f} s"
    )
    print(
        f"run directory: {result.run_dir} (config.yaml, metrics.jsonl, summary.csv, clients.csv,"
        " adapter/); plots and report: cllora report " + str(result.run_dir)
    )
    return 0


def _sweep(path: str, overrides: list[str]) -> int:
    from cllora.sweep import load_sweep, run_sweep

    sweep = load_sweep(path, overrides)
    print(f"sweep {sweep.name}: {len(sweep.cells)} cells in {sweep.root}", file=sys.stderr)
    results = run_sweep(sweep)
    print(f"results: {results}; report: cllora report {sweep.root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
