"""The rounds of a cllora run driven over a Flower ``Grid``: the server side of the ServerApp.

Usage::

    from cllora.flower.server import FlowerSettings, run_federation
    result = run_federation(grid, cfg, FlowerSettings(nodes=3, round_timeout=600))
    result.run_dir        # config.yaml, metrics.jsonl, summary.csv, clients.csv, adapter/, ...

One round is ``cllora run``'s (:func:`cllora.fed.runner.run_round`) with the clients on
SuperNodes: the server samples clients (seeded), the algorithm makes each trainee's downlink,
which goes to the trainee's node as a ``train`` Message (:mod:`cllora.flower.messages`); the
replies' uplinks are aggregated by the algorithm, the new global adapter goes to every node as
an ``evaluate`` Message, and the server writes the same records, summary row, checkpoint and,
at the end, PEFT adapter as ``cllora run``.

**The server never holds a client's data.** It learns each client's name, sizes, quality
score, ``clients.csv`` row and test sample ids from a ``query`` Message at the start; the
global model is evaluated by every node on its own test set, and the server combines the nodes'
records into the ``__global__`` one (the union of the clients' test sets, as in ``cllora run``).
It loads the base model only to make the initial adapter (seeded, as ``cllora run`` does) and to
export the final one.

**Failures.** A trainee whose node is not connected, errs or does not answer within
``round_timeout`` seconds is left out of the round (a ``client_failed`` record); fewer than
``fed.min_clients`` successes stop the run with its last good checkpoint, from which
``FlowerSettings(resume=run_dir)`` continues. A node missing at an evaluation has no
``global_eval`` record that round (its column of the summary is empty). A node that cannot load
its client at the start (a malformed record, a missing ``data-path``) is left out of the run,
one line naming it in ``run.log`` (``flower.json``: ``"left_out"``); fewer than
``fed.min_clients`` nodes left stop the run before round 0 with one line naming each failed node
(its name, the error's file:line and the fix). Errors that are the user's to fix are logged as
one line (``run.log`` and, under ``flwr run``, the coordinator's output), then raised; a node's
unexpected exception (a bug) is logged with its traceback, still naming the node.

**Differential privacy** (``dp_clipping_norm`` > 0): central DP with client-side fixed
clipping, Flower's scheme: each node clips its update with Flower's ``fixedclipping_mod``, the
server adds Gaussian noise of standard deviation ``noise_multiplier * clipping_norm / n`` to the
mean of the ``n`` clipped updates (Flower's ``compute_stdv`` and ``add_gaussian_noise_inplace``).
The parameters, and epsilon at ``dp_delta`` after every round (:mod:`cllora.flower.privacy`),
are in ``flower.json`` and in every round record.

**Secure aggregation** (``secagg``): the trainings of a round run under Flower's SecAgg+
(:mod:`cllora.flower.secagg`), and the server learns only the weighted mean of the uplinks; for
the algorithms that declare it possible (``Algorithm.sums_securely``), refused for the others. The
protocol's parameters are in every round record.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from flwr.app import Message, MessageType
from flwr.serverapp import Grid
from flwr.supercore.differential_privacy import add_gaussian_noise_inplace, compute_stdv

from cllora.config import Config, ConfigError, config_to_dict, save_config
from cllora.data.tables import heterogeneity_summary, write_csv
from cllora.fed.algorithms import algorithm_class, algorithm_names, make_algorithm
from cllora.fed.algorithms.base import Algorithm, Trainee
from cllora.fed.checkpoint import (
    Checkpoint,
    CheckpointError,
    rng_states,
    save_checkpoint,
    set_rng_states,
)
from cllora.fed.evaluation import add_local_means
from cllora.fed.guards import NonFiniteModelError, RunStopped, TooFewClientsError, non_finite
from cllora.fed.prepare import check_combination, global_rank, json_safe
from cllora.fed.resume import open_resume
from cllora.fed.rounds import RoundOutcome
from cllora.fed.rundir import attach_log_file, make_run_dir
from cllora.fed.runner import RunResult, sample_clients
from cllora.fed.strategy import client_weights
from cllora.flower.client_app import CONFIG_KEY, DP_ACTION
from cllora.flower.messages import (
    config_content,
    config_of,
    downlink_content,
    read_error,
    read_uplink,
    state_content,
)
from cllora.flower.node import USER_ERRORS
from cllora.flower.privacy import privacy_info
from cllora.flower.secagg import SecureOutcome, check_secagg, secure_train
from cllora.model.lora import lora_state_dict
from cllora.model.setup import build_model
from cllora.report.metrics import MetricsLog, read_metrics, write_summary
from cllora.report.records import (
    GLOBAL,
    ClientFailed,
    FreeRecord,
    GlobalEval,
    Kind,
    LocalEval,
    RoundRecord,
    TestSamples,
    record_from_dict,
)
from cllora.report.sample_losses import FILE_NAME as SAMPLE_LOSSES
from cllora.report.sample_losses import write_sample_losses
from cllora.text import round_line

log = logging.getLogger("cllora")

POLL = 0.5  # seconds between two pulls of replies
#: errors that end a run with one line (its cause and fix), no traceback
STOPS = (*USER_ERRORS, CheckpointError, RunStopped)


@dataclass
class FlowerSettings:
    """How the server runs on Flower (Flower run-config keys, not cllora config keys)."""

    nodes: int = 0  # SuperNodes to wait for at the start (0: partition.num_clients)
    node_wait: float = 300.0  # seconds to wait for them
    round_timeout: float = 3600.0  # seconds a round's replies are waited for
    dp_clipping_norm: float = 0.0  # > 0: differential privacy on the LoRA updates
    dp_noise_multiplier: float = 0.0
    dp_delta: float = 1e-5  # the delta at which epsilon is recorded
    secagg: bool = False  # secure aggregation (SecAgg+) of the updates
    secagg_num_shares: float = 1.0  # <= 1: a fraction of the trainees, else a count
    secagg_reconstruction_threshold: float = 0.75  # <= 1: a fraction of the shares, else a count
    secagg_clipping_range: float = 8.0  # Flower's: |weight * update| entries quantized within it
    secagg_quantization_range: int = 2**22  # Flower's: the quantization levels
    resume: str = ""  # a run directory to continue


@dataclass
class Site:
    """One client as the server knows it: its node and what the node told (no data)."""

    name: str
    node_id: int
    partition: int
    stats: dict[str, float]
    row: dict[str, Any]
    test_set: dict[str, list]
    length_counts: list[int]
    data_stats: dict[str, Any]
    train: list = field(default_factory=list)  # the data stays on the node


@dataclass
class FlowerRun:
    cfg: Config
    settings: FlowerSettings
    grid: Grid
    run_dir: Path
    metrics: MetricsLog
    algorithm: Algorithm
    model: Any
    sites: list[Site]
    result: RunResult
    rng: random.Random
    rng_fail: random.Random
    config_yaml: str
    info: dict[str, Any] = field(default_factory=dict)  # flower.json

    @property
    def global_state(self) -> dict[str, torch.Tensor]:
        return self.result.global_state


def check_flower_config(cfg: Config, settings: FlowerSettings) -> None:
    """What the Flower apps cannot run (one-line :class:`ConfigError`), before anything loads."""
    strategy, algorithm = cfg.fed.strategy, algorithm_class(cfg.fed.strategy)
    if not algorithm.runs_on_flower():
        runs = [n for n in algorithm_names() if algorithm_class(n).runs_on_flower()]
        raise ConfigError(
            f"fed.strategy={strategy} keeps per-client state on the server or changes the base "
            f"weights, which the Flower apps do not carry; use one of {', '.join(runs)}"
        )
    if cfg.partition.global_test_fraction:
        raise ConfigError(
            "partition.global_test_fraction > 0 needs a held-out set on the server, which holds "
            "no data under Flower: set partition.global_test_fraction=0"
        )
    if cfg.eval.generate_samples:
        raise ConfigError(
            "eval.generate_samples needs test samples on the server, which holds no data under "
            "Flower: set eval.generate_samples=0"
        )
    if settings.dp_clipping_norm < 0 or settings.dp_noise_multiplier < 0:
        raise ConfigError("dp-clipping-norm and dp-noise-multiplier must be >= 0")
    if settings.dp_noise_multiplier and not settings.dp_clipping_norm:
        raise ConfigError("dp-noise-multiplier needs dp-clipping-norm > 0 (the clipping bound)")
    if not 0 < settings.dp_delta < 1:
        raise ConfigError(f"dp-delta must be in (0, 1), got {settings.dp_delta}")
    if settings.secagg:
        nodes = settings.nodes or cfg.partition.num_clients
        trainees = len(sample_clients(nodes, cfg.fed.sample_fraction, random.Random(0)))
        check_secagg(cfg, settings, trainees)
    if settings.dp_clipping_norm and (not algorithm.mean_of_uplinks
                                      or cfg.fed.weighting != "uniform"):  # fmt: skip
        means = [n for n in algorithm_names() if algorithm_class(n).mean_of_uplinks]
        raise ConfigError(
            f"differential privacy needs the uniform mean of the clients' updates: set "
            f"fed.strategy to one of {', '.join(means)} and fed.weighting=uniform (got "
            f"{strategy}, {cfg.fed.weighting})"
        )


def run_federation(grid: Grid, cfg: Config | None, settings: FlowerSettings) -> RunResult:
    """Run (or, with ``settings.resume``, continue) a whole experiment over ``grid``; an error
    of :data:`STOPS` is logged as one line (in ``run.log`` once the run directory exists) and
    raised."""
    try:
        cfg, ckpt, run_dir = _open(cfg, settings)
    except STOPS as err:
        log.error("error: %s", err)
        raise
    handler = attach_log_file(run_dir)
    if ckpt is None:
        save_config(cfg, run_dir / "config.yaml")
    metrics = MetricsLog(run_dir / "metrics.jsonl")
    try:
        run = _setup(grid, cfg, settings, run_dir, metrics)
        first = _start(run, ckpt)
        for r in range(first, cfg.fed.rounds + 1):
            flower_round(run, r)
        _finish(run)
        return run.result
    except RunStopped as err:  # the coordinator's run.log says why, and how to go on
        log.error("stopped: %s; continue with the run config resume='%s'", err, run_dir)
        raise
    except STOPS as err:
        log.error("error: %s", err)
        raise
    finally:
        metrics.close()
        logging.getLogger("cllora").removeHandler(handler)
        handler.close()


def _open(cfg: Config | None, settings: FlowerSettings) -> tuple[Config, Checkpoint | None, Path]:
    """The run's config, checkpoint (None: a new run) and directory, after the checks."""
    ckpt = None
    if settings.resume:
        cfg, ckpt = open_resume(Path(settings.resume), cfg)
    elif cfg is None:
        raise ValueError("run_federation needs a config or a run directory to resume")
    check_combination(cfg)
    check_flower_config(cfg, settings)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    return cfg, ckpt, Path(settings.resume) if settings.resume else make_run_dir(cfg)


def _setup(
    grid: Grid, cfg: Config, settings: FlowerSettings, run_dir: Path, metrics: MetricsLog
) -> FlowerRun:
    model, _, _ = build_model(cfg, global_rank(cfg))  # the seeded initial adapter, the export
    config_yaml = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    nodes = settings.nodes or cfg.partition.num_clients
    sites, failed = discover(grid, config_yaml, nodes, settings.node_wait)
    lines = _failure_lines(failed)
    if failed and len(sites) < max(1, cfg.fed.min_clients):
        raise ConfigError(
            f"{' | '.join(lines)} ({len(sites)} of {len(sites) + len(failed)} SuperNodes loaded "
            f"their client, fewer than fed.min_clients={cfg.fed.min_clients})"
        )
    if len(sites) < cfg.fed.min_clients:
        raise ConfigError(f"fed.min_clients={cfg.fed.min_clients} exceeds the {len(sites)} nodes")
    for line in lines:
        log.warning("left out of the run: %s", line)
    info = {"settings": asdict(settings), "sites": {s.name: s.node_id for s in sites}}
    if failed:
        info["left_out"] = lines
    _write_info(run_dir, info)
    return FlowerRun(
        cfg=cfg, settings=settings, grid=grid, run_dir=run_dir, metrics=metrics,
        algorithm=make_algorithm(cfg), model=model, sites=sites,
        result=RunResult(run_dir=run_dir, global_state=lora_state_dict(model), config=cfg),
        rng=random.Random(cfg.seed), rng_fail=random.Random(cfg.seed + 7919),
        config_yaml=config_yaml, info=info,
    )  # fmt: skip


def _write_info(run_dir: Path, info: dict[str, Any]) -> None:
    (run_dir / "flower.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")


def discover(
    grid: Grid, config_yaml: str, nodes: int, wait: float
) -> tuple[list[Site], dict[int, tuple[str, str]]]:
    """Wait for ``nodes`` SuperNodes, ask each for its client; the sites in the run's client
    order (the partition's, in a simulation; by name, in a deployment), and the nodes that
    could not load theirs (by node id: its name and the one-line error)."""
    deadline = time.monotonic() + wait
    ids = sorted(grid.get_node_ids())
    while len(ids) < nodes:
        if time.monotonic() > deadline:
            raise ConfigError(
                f"only {len(ids)} of {nodes} SuperNodes connected within {wait:.0f} s: start "
                "the missing ones, or lower the run config's nodes"
            )
        time.sleep(1.0)
        ids = sorted(grid.get_node_ids())
    msgs = {n: Message(config_content({CONFIG_KEY: config_yaml}), dst_node_id=n,
                       message_type=MessageType.QUERY) for n in ids}  # fmt: skip
    sites, failed = [], {}
    replies = exchange(grid, msgs, wait)
    for node in ids:
        if node not in replies:
            failed[node] = (str(node), f"no answer to the query within {wait:.0f} s")
            continue
        reply = replies[node]
        if reply.has_error():
            failed[node] = _node_error(node, reply)
            continue
        got = json.loads(str(config_of(reply.content)["info"]))
        sites.append(Site(got["name"], node, got["partition"],
                          got["stats"], got["row"], got["test_set"], got["length_counts"],
                          got["data_stats"]))  # fmt: skip
    sites.sort(key=lambda s: (s.partition, s.name))
    names = [s.name for s in sites]
    if len(set(names)) != len(names):
        raise ConfigError(f"two SuperNodes hold a client of the same name ({names}): rename one")
    log.info("flower: %d SuperNodes: %s", len(sites), ", ".join(names))
    return sites, failed


def _node_error(node_id: int, reply: Message) -> tuple[str, str]:
    """The name (as the node gave it, else its node id) and the one-line error of an error
    reply; an unexpected exception's traceback is logged here."""
    name, line, trace = read_error(reply.error)
    if trace:
        log.error("SuperNode %s: %s\n%s", name or node_id, line, trace)
    return name or str(node_id), line


def _failure_lines(failed: dict[int, tuple[str, str]]) -> list[str]:
    """One line per distinct error, naming its nodes (a simulation's virtual nodes read the same
    data, so they fail alike)."""
    by_error: dict[str, list[str]] = {}
    for name, line in failed.values():
        by_error.setdefault(line, []).append(name)
    return [f"SuperNode{'s' if len(names) > 1 else ''} {', '.join(names)}: {line}"
            for line, names in by_error.items()]  # fmt: skip


def _start(run: FlowerRun, ckpt: Checkpoint | None) -> int:
    """Round 0 (client tables, test ids, the initial evaluation, a checkpoint), or a resumed
    checkpoint's state; the first round to run."""
    if ckpt is None:
        _write_sites(run)
        if run.cfg.fed.eval_initial:
            run.result.rows.append(evaluate_global(run, 0, run.global_state))
        _checkpoint(run, 0)
        return 1
    saved = ckpt.extra.get("flower", {})
    if saved.get("sites", [s.name for s in run.sites]) != [s.name for s in run.sites]:
        raise ConfigError(
            f"cannot resume {run.run_dir}: it ran with clients {saved['sites']}, the SuperNodes "
            f"now hold {[s.name for s in run.sites]}; start the same nodes"
        )
    mine = _privacy(run.settings)  # a key an older checkpoint lacks may change
    if any(mine.get(k) != v for k, v in saved.get("privacy", {}).items()):
        raise ConfigError(
            f"cannot resume {run.run_dir} with other privacy settings (it ran with "
            f"{saved['privacy']}); give the same dp-* and secagg* run-config keys"
        )
    if not (run.run_dir / "clients.csv").exists():
        log.warning("clients.csv was missing from %s: rewritten (recomputed)", run.run_dir)
        write_csv(run.run_dir / "clients.csv", _site_rows(run))
    run.result.global_state = ckpt.global_state
    run.algorithm.load_state_dict(ckpt.server_state, run.model)
    run.result.rows = list(ckpt.rows)
    set_rng_states(ckpt.extra["rng"], run.rng, run.rng_fail)
    log.info("resuming %s after round %d of %d", run.run_dir, ckpt.round, run.cfg.fed.rounds)
    return ckpt.round + 1


def _site_rows(run: FlowerRun) -> list[dict[str, Any]]:
    """The rows of ``clients.csv``, from what the nodes told (``tv_len``: each client's length
    mix against the federation's)."""
    counts = np.array([s.length_counts for s in run.sites], dtype=float)  # (clients, buckets)
    mix = counts.sum(axis=0) / max(1.0, counts.sum())
    for s, c in zip(run.sites, counts, strict=True):
        s.row["tv_len"] = float(0.5 * np.abs(c / max(1.0, c.sum()) - mix).sum())
    return [s.row for s in run.sites]


def _write_sites(run: FlowerRun) -> None:
    """``clients.csv``, the ``partition`` / ``client_stats`` / ``test_samples`` records."""
    rows = _site_rows(run)
    write_csv(run.run_dir / "clients.csv", rows)
    summary = {**heterogeneity_summary(rows), **_data_stats([s.data_stats for s in run.sites])}
    run.metrics.write(FreeRecord(Kind.PARTITION, summary))
    for s in run.sites:
        fields = {**s.row, "samples": int(s.stats["samples"]), "tokens": int(s.stats["tokens"])}
        run.metrics.write(FreeRecord(Kind.CLIENT_STATS, fields))
    sets = {s.name: s.test_set for s in run.sites}
    sets[GLOBAL] = {k: [v for s in run.sites for v in s.test_set[k]] for k in
                    ("samples", "lengths", "tokens")}  # fmt: skip
    run.metrics.write(TestSamples(sets=sets))


def _data_stats(per_node: list[dict[str, Any]]) -> dict[str, Any]:
    """The data pipeline's counts of the whole federation: a value every node reports alike
    (a simulation's nodes read the same data) as it is, else integers summed."""
    out = {}
    for key in per_node[0]:
        values = [d.get(key) for d in per_node]
        if all(v == values[0] for v in values):
            out[key] = values[0]
        elif all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            out[key] = sum(values)
    return out


def _send(run: FlowerRun, msgs: dict[int, Message]) -> dict[int, Message]:
    """Send messages (by node id) to the connected nodes; their replies by node id."""
    live = set(run.grid.get_node_ids())
    return exchange(run.grid, {n: m for n, m in msgs.items() if n in live},
                    run.settings.round_timeout)  # fmt: skip


def exchange(grid: Grid, msgs: dict[int, Message], timeout: float) -> dict[int, Message]:
    """Send one message per node; the replies by node, waiting at most ``timeout`` seconds and
    not for a node that leaves the federation meanwhile (an error the SuperLink itself answers,
    e.g. a node gone, counts as that node's reply)."""
    ids = list(grid.push_messages(list(msgs.values())))
    waiting = {i: n for i, n in zip(ids, msgs, strict=True) if i}
    replies: dict[int, Message] = {}
    deadline = time.monotonic() + timeout
    while waiting and time.monotonic() < deadline:
        for reply in grid.pull_messages(list(waiting)):
            node = waiting.pop(reply.metadata.reply_to_message_id, None)
            if node is not None:
                replies[node] = reply
        live = set(grid.get_node_ids())
        waiting = {i: n for i, n in waiting.items() if n in live}
        if waiting:
            time.sleep(POLL)
    return replies


def flower_round(run: FlowerRun, r: int) -> dict[str, Any]:
    """Round ``r``: sample, train on the nodes, aggregate, evaluate, record, checkpoint."""
    start = time.perf_counter()
    rng_before = rng_states(run.rng, run.rng_fail)
    chosen = sample_clients(len(run.sites), run.cfg.fed.sample_fraction, run.rng)
    log.info("round %d of %d: training on %s", r, run.cfg.fed.rounds,
             ", ".join(run.sites[i].name for i in chosen))  # fmt: skip
    out = _train_securely(run, r, chosen) if run.settings.secagg else train_on_nodes(run, r, chosen)
    if len(out.uplinks) < run.cfg.fed.min_clients:
        _checkpoint(run, r - 1, rng_before)
        raise TooFewClientsError.of(
            r, len(out.uplinks), len(out.trainees), run.cfg.fed.min_clients, run.run_dir
        )
    names = [out.trainees[k].name for k in sorted(out.uplinks)]
    weights = _weights(run, names)
    agg = run.algorithm.aggregate(run.global_state, out.results(weights))
    info = dict(agg.info)
    if isinstance(out, SecureOutcome):
        info.update(out.info)
    if run.settings.dp_clipping_norm:
        info.update(_add_noise(run, r, agg.state, len(out.uplinks)))
    if run.settings.dp_noise_multiplier:
        info.update(privacy_info(r, run.settings.dp_noise_multiplier, run.settings.dp_delta))
    bad = non_finite(agg.state) + non_finite(run.algorithm.state_dict())
    if bad:
        raise NonFiniteModelError(
            f"round {r}: the aggregated global adapter holds NaN/inf values ({', '.join(bad[:3])}"
            f"); the last good global adapter (round {r - 1}) is in {run.run_dir / 'checkpoint'}"
        )
    row = evaluate_global(run, r, agg.state)
    run.result.global_state = agg.state
    add_local_means(row, out.local)
    run.result.rows.append(row)
    run.metrics.write(
        RoundRecord(
            round=r, clients=[run.sites[i].name for i in chosen], succeeded=len(out.uplinks),
            weights=weights, bytes_down=out.bytes_down, bytes_up=out.bytes_up,
            seconds=round(time.perf_counter() - start, 3), global_loss=row["global_loss"],
            extra=json_safe(info),
        )
    )  # fmt: skip
    _record_info(run, r, info)
    _checkpoint(run, r)
    seconds = time.perf_counter() - start
    log.info("%s", round_line(r, run.cfg.fed.rounds, len(out.uplinks), len(out.trainees),
                              row["global_loss"], row["global_ppl"], seconds))  # fmt: skip
    return row


def _record_info(run: FlowerRun, r: int, info: dict[str, Any]) -> None:
    """``flower.json`` after round ``r``: epsilon so far, the SecAgg+ parameters used."""
    keys = [k for k in info if k.startswith(("dp_", "secagg"))]
    if keys:
        run.info["round"] = {"round": r, **{k: info[k] for k in keys}}
        _write_info(run.run_dir, run.info)


def _plan(run: FlowerRun, r: int, chosen: list[int]) -> tuple[list[Trainee], list, list[dict]]:
    """The round's trainees, their downlinks and the settings each node gets."""
    trainees = run.algorithm.trainees(chosen, run.sites)
    fails = [run.rng_fail.random() < run.cfg.fed.client_failure_rate for _ in trainees]
    downs = [run.algorithm.downlink(t.index, run.global_state) for t in trainees]
    confs = []
    for k, t in enumerate(trainees):
        conf = {CONFIG_KEY: run.config_yaml, "round": r, "index": t.index, "steps": t.steps,
                "fail": fails[k], "position": k}  # fmt: skip
        if run.settings.dp_clipping_norm:
            conf["clipping_norm"] = run.settings.dp_clipping_norm
        confs.append(conf)
    return trainees, downs, confs


def _train_securely(run: FlowerRun, r: int, chosen: list[int]) -> SecureOutcome:
    """The round's local trainings under SecAgg+ (:func:`cllora.flower.secagg.secure_train`)."""
    trainees, downs, confs = _plan(run, r, chosen)
    weights = _weights(run, [t.name for t in trainees])
    out = secure_train(run, r, trainees, downs, confs, weights)
    if out.halted:
        raise TooFewClientsError(
            f"round {r}: SecAgg+ stopped before unmasking the sum: fewer nodes than its "
            f"reconstruction threshold ({out.info.get('secagg_reconstruction_threshold')}) "
            f"answered every stage; the global adapter of round {r - 1} is in "
            f"{run.run_dir / 'checkpoint'}"
        )
    return out


def train_on_nodes(run: FlowerRun, r: int, chosen: list[int]) -> RoundOutcome:
    """The round's local trainings, one ``train`` Message per trainee; records written in
    trainee order, as ``cllora run`` writes them."""
    trainees, downs, confs = _plan(run, r, chosen)
    kind = f"{MessageType.TRAIN}.{DP_ACTION}" if run.settings.dp_clipping_norm else None
    msgs = {}
    for t, down, conf in zip(trainees, downs, confs, strict=True):
        node = run.sites[t.index].node_id
        msgs[node] = Message(downlink_content(down, conf), dst_node_id=node,
                             message_type=kind or MessageType.TRAIN, group_id=str(r))  # fmt: skip
    replies = _send(run, msgs)
    live = set(run.grid.get_node_ids())
    uplinks, local = {}, []
    for k, t in enumerate(trainees):
        node = run.sites[t.index].node_id
        up, records = _reply(replies.get(node), r, t, run, node in live)
        for rec in records:
            run.metrics.write(rec)
            if isinstance(rec, LocalEval):
                local.append(rec)
        if up is not None:
            uplinks[k] = up
    return RoundOutcome(trainees, uplinks, sum(d.nbytes() for d in downs), local)


def _reply(
    reply: Message | None, r: int, t: Trainee, run: FlowerRun, connected: bool
) -> tuple[Any, list]:
    """A trainee's uplink (None: failed) and records from its node's reply."""
    if reply is None and not connected:
        why = "its SuperNode is not connected (it left the federation or never joined)"
    elif reply is None:
        why = f"no reply from its SuperNode within {run.settings.round_timeout:.0f} s"
    elif reply.has_error():
        why = _node_error(run.sites[t.index].node_id, reply)[1]
        why = f"its SuperNode replied with an error: {why}"
    else:
        up, records, _ = read_uplink(reply.content)
        return up, records
    log.warning("round %d: client %s failed: %s", r, t.name, why)
    return None, [ClientFailed(round=r, client=t.name, error=why)]


def _weights(run: FlowerRun, names: list[str]) -> list[float]:
    weighting = run.cfg.fed.weighting
    key = weighting if weighting != "uniform" else "samples"
    stats = {s.name: s.stats for s in run.sites}
    return client_weights([stats[n].get(key, 1.0) for n in names], weighting)


def _add_noise(run: FlowerRun, r: int, state: dict[str, torch.Tensor], n: int) -> dict:
    """Gaussian noise on the aggregate (Flower's central DP, client-side fixed clipping);
    seeded by the run's seed and the round, so a resumed run adds the same noise."""
    s = run.settings
    std = compute_stdv(s.dp_noise_multiplier, s.dp_clipping_norm, n)
    np.random.seed((run.cfg.seed * 1_000_003 + r) % 2**32)
    keys = sorted(state)
    arrays = [state[k].detach().cpu().numpy().copy() for k in keys]
    add_gaussian_noise_inplace(arrays, std)
    for k, a in zip(keys, arrays, strict=True):
        state[k] = torch.from_numpy(a).to(state[k].device, state[k].dtype)
    return {"dp_clipping_norm": s.dp_clipping_norm, "dp_noise_multiplier": s.dp_noise_multiplier,
            "dp_noise_std": std}  # fmt: skip


def evaluate_global(run: FlowerRun, r: int, state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Every node evaluates ``state`` on its test set; the records (each client's, then the
    combined ``__global__``) are written; the round's summary row."""
    msgs = {s.node_id: Message(state_content(state, {CONFIG_KEY: run.config_yaml, "round": r}),
                               dst_node_id=s.node_id, message_type=MessageType.EVALUATE,
                               group_id=str(r)) for s in run.sites}  # fmt: skip
    replies = _send(run, msgs)
    got: dict[str, GlobalEval] = {}
    for s in run.sites:
        reply = replies.get(s.node_id)
        if reply is None or reply.has_error():
            why = _node_error(s.node_id, reply)[1] if reply is not None else "no reply"
            log.warning("round %d: no evaluation from client %s's SuperNode: %s", r, s.name, why)
            continue
        rec = json.loads(str(config_of(reply.content)["record"]))
        if "nonfinite" in rec:
            raise NonFiniteModelError(f"{s.name}: {rec['nonfinite']}")
        got[s.name] = record_from_dict(rec)
    if not got:
        raise TooFewClientsError(f"round {r}: no SuperNode evaluated the global model")
    whole = combine_evals(list(got.values()), r)
    for rec in [*got.values(), whole]:
        run.metrics.write(rec)
    row: dict[str, Any] = {"round": r, "global_loss": whole.loss, "global_ppl": whole.ppl}
    row.update({f"loss[{s.name}]": got[s.name].loss if s.name in got else math.nan
                for s in run.sites})  # fmt: skip
    row.update(local_own=math.nan, local_global=math.nan)
    return row


def combine_evals(records: list[GlobalEval], r: int) -> GlobalEval:
    """The ``__global__`` record of the union of the clients' test sets, from theirs."""
    loss_sums = [x for rec in records for x in rec.loss_sums]
    tokens = sum(rec.tokens for rec in records)
    loss = sum(loss_sums) / tokens if tokens else math.nan
    buckets: dict[str, dict[str, float]] = {}
    for rec in records:
        for label, b in rec.buckets.items():
            acc = buckets.setdefault(label, {"loss": 0.0, "tokens": 0})
            acc["loss"] += b["loss"] * b["tokens"]
            acc["tokens"] += b["tokens"]
    for b in buckets.values():
        b["loss"] /= b["tokens"]
    ppl = math.exp(min(loss, 50.0)) if tokens else math.nan
    return GlobalEval(round=r, client=GLOBAL, loss=loss, ppl=ppl, tokens=tokens,
                      buckets=buckets, loss_sums=loss_sums)  # fmt: skip


def _checkpoint(run: FlowerRun, r: int, rng: list | None = None) -> None:
    extra = {"rng": rng or rng_states(run.rng, run.rng_fail), "config": config_to_dict(run.cfg),
             "metrics_records": run.metrics.records,
             "flower": {"sites": [s.name for s in run.sites],
                        "privacy": _privacy(run.settings)}}  # fmt: skip
    save_checkpoint(run.run_dir / "checkpoint", r, run.global_state, run.algorithm.state_dict(),
                    run.result.rows, extra=extra)  # fmt: skip


def _privacy(settings: FlowerSettings) -> dict[str, Any]:
    """The settings a resumed run must keep (the DP accounting and SecAgg+ go on as begun)."""
    return {k: v for k, v in asdict(settings).items() if k.startswith(("dp_", "secagg"))}


def _finish(run: FlowerRun) -> None:
    run.algorithm.export(run.model, run.global_state, run.run_dir / "adapter")
    write_summary(run.run_dir / "summary.csv", run.result.rows)
    write_sample_losses(read_metrics(run.run_dir / "metrics.jsonl"), run.run_dir / SAMPLE_LOSSES)
