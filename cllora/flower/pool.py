"""The client pool of a cllora run whose clients are SuperNodes, reached over a Flower ``Grid``.

Usage::

    from cllora.flower.pool import FlowerSettings, run_federation
    result = run_federation(grid, cfg, FlowerSettings(nodes=3, round_timeout=600))
    result.run_dir        # config.yaml, metrics.jsonl, summary.csv, clients.csv, adapter/, ...

The rounds are ``cllora run``'s, the same code (:func:`cllora.fed.loop.run_loop`), over
:class:`FlowerPool`: each trainee's downlink goes to the trainee's node as a ``train`` Message
(:mod:`cllora.flower.messages`); the replies' uplinks are aggregated by the algorithm, the new
global adapter goes to every node as an ``evaluate`` Message, and the server writes the same
records, summary row, checkpoint and, at the end, PEFT adapter as ``cllora run``.

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
clipping, Flower's scheme, wrapped around the algorithm's aggregation
(:meth:`FlowerPool.aggregate`): each node clips its update with Flower's ``fixedclipping_mod``,
the server adds Gaussian noise of standard deviation ``noise_multiplier * clipping_norm / n`` to the
mean of the ``n`` clipped updates (Flower's ``compute_stdv`` and ``add_gaussian_noise_inplace``).
The parameters, and epsilon at ``dp_delta`` after every round (:mod:`cllora.flower.privacy`),
are in ``flower.json`` and in every round record.

**Secure aggregation** (``secagg``): the trainings of a round run under Flower's SecAgg+
(:mod:`cllora.flower.secagg`), and the server learns only the weighted mean of the uplinks,
which the algorithm aggregates as one uplink of weight 1; for
the algorithms that declare it possible (``Algorithm.sums_securely``), refused for the others. The
protocol's parameters are in every round record.
"""

from __future__ import annotations

import json
import logging
import math
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
from cllora.fed.algorithms.base import Downlink, Trainee
from cllora.fed.checkpoint import Checkpoint, CheckpointError
from cllora.fed.guards import NonFiniteModelError, RunStopped, TooFewClientsError
from cllora.fed.loop import (
    ClientPool,
    Run,
    RunResult,
    aggregation_weights,
    run_loop,
    trainees_per_round,
)
from cllora.fed.prepare import check_combination, global_rank
from cllora.fed.resume import open_resume
from cllora.fed.rounds import RoundOutcome, write_outcomes
from cllora.fed.rundir import attach_log_file, make_run_dir
from cllora.fed.strategy import AggregateResult
from cllora.flower.client_app import CONFIG_KEY, DP_ACTION
from cllora.flower.exchange import (
    Site,
    data_stats,
    discover,
    exchange,
    failure_lines,
    node_error,
    site_rows,
)
from cllora.flower.messages import (
    config_of,
    downlink_content,
    read_uplink,
    state_content,
)
from cllora.flower.node import USER_ERRORS
from cllora.flower.privacy import privacy_info
from cllora.flower.secagg import check_secagg, secure_train
from cllora.model.lora import lora_state_dict
from cllora.model.setup import build_model
from cllora.report.metrics import MetricsLog
from cllora.report.records import (
    GLOBAL,
    ClientFailed,
    FreeRecord,
    GlobalEval,
    Kind,
    Record,
    TestSamples,
    record_from_dict,
)

log = logging.getLogger("cllora")

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
class FlowerPool(ClientPool):
    """The run's clients on SuperNodes (see the module doc): what the nodes told of them, and
    the ``Grid`` that reaches them. The server holds no client data."""

    cfg: Config
    settings: FlowerSettings
    grid: Grid
    sites: list[Site]
    config_yaml: str  # the run's resolved config, sent in every message
    info: dict[str, Any] = field(default_factory=dict)  # flower.json
    #: per client index: the round after which the server last aggregated it (0: never), whose
    #: kept state (on its node, :mod:`cllora.flower.kept`) it trains from next
    kept_rounds: dict[int, int] = field(default_factory=dict)
    progress = False  # the ServerApp's output is read as a log: one line per round

    @classmethod
    def open(cls, grid: Grid, cfg: Config, settings: FlowerSettings, run_dir: Path) -> FlowerPool:
        """Wait for the SuperNodes, learn their clients (a node that cannot load its client is
        left out, unless too few remain: a one-line ConfigError), write ``flower.json``."""
        config_yaml = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
        nodes = settings.nodes or cfg.partition.num_clients
        sites, failed = discover(grid, config_yaml, nodes, settings.node_wait)
        lines = failure_lines(failed)
        if failed and len(sites) < max(1, cfg.fed.min_clients):
            raise ConfigError(
                f"{' | '.join(lines)} ({len(sites)} of {len(sites) + len(failed)} SuperNodes "
                f"loaded their client, fewer than fed.min_clients={cfg.fed.min_clients})"
            )
        if len(sites) < cfg.fed.min_clients:
            raise ConfigError(
                f"fed.min_clients={cfg.fed.min_clients} exceeds the {len(sites)} nodes"
            )
        for line in lines:
            log.warning("left out of the run: %s", line)
        info = {"settings": asdict(settings), "sites": {s.name: s.node_id for s in sites}}
        if failed:
            info["left_out"] = lines
        _write_info(run_dir, info)
        return cls(cfg, settings, grid, sites, config_yaml, info)

    @property
    def names(self) -> list[str]:  # type: ignore[override]
        return [s.name for s in self.sites]

    @property
    def stats(self) -> dict[str, dict[str, float]]:  # type: ignore[override]
        return {s.name: s.stats for s in self.sites}

    # -- the loop's hooks ------------------------------------------------------------------

    def start(self, run: Run) -> None:
        """``clients.csv``, the ``partition`` / ``client_stats`` / ``test_samples`` records."""
        rows = site_rows(self.sites)
        write_csv(run.run_dir / "clients.csv", rows)
        summary = {**heterogeneity_summary(rows),
                   **data_stats([s.data_stats for s in self.sites])}  # fmt: skip
        run.metrics.write(FreeRecord(Kind.PARTITION, summary))
        for s in self.sites:
            fields = {**s.row, "samples": int(s.stats["samples"]),
                      "tokens": int(s.stats["tokens"])}  # fmt: skip
            run.metrics.write(FreeRecord(Kind.CLIENT_STATS, fields))
        sets = {s.name: s.test_set for s in self.sites}
        sets[GLOBAL] = {k: [v for s in self.sites for v in s.test_set[k]] for k in
                        ("samples", "lengths", "tokens")}  # fmt: skip
        run.metrics.write(TestSamples(sets=sets))

    def resume(self, run: Run, ckpt: Checkpoint) -> None:
        """The same clients and privacy settings as the run began with; no state kept on the
        nodes (a new ``flwr run`` starts with none)."""
        if run.algorithm.keeps_client_state and ckpt.round > 0:
            raise ConfigError(
                f"cannot resume {run.run_dir} on Flower: fed.strategy={run.cfg.fed.strategy} "
                "keeps each client's state on its SuperNode, which a new flwr run does not "
                "have; start the run again (cllora run can resume it in-process)"
            )
        saved = ckpt.extra.get("flower", {})
        if saved.get("sites", self.names) != self.names:
            raise ConfigError(
                f"cannot resume {run.run_dir}: it ran with clients {saved['sites']}, the "
                f"SuperNodes now hold {self.names}; start the same nodes"
            )
        mine = _privacy(self.settings)  # a key an older checkpoint lacks may change
        if any(mine.get(k) != v for k, v in saved.get("privacy", {}).items()):
            raise ConfigError(
                f"cannot resume {run.run_dir} with other privacy settings (it ran with "
                f"{saved['privacy']}); give the same dp-* and secagg* run-config keys"
            )
        if not (run.run_dir / "clients.csv").exists():
            log.warning("clients.csv was missing from %s: rewritten (recomputed)", run.run_dir)
            write_csv(run.run_dir / "clients.csv", site_rows(self.sites))

    def checkpoint_extra(self) -> dict[str, Any]:
        return {"flower": {"sites": self.names, "privacy": _privacy(self.settings)}}

    def train(
        self, run: Run, r: int, trainees: list[Trainee], downs: list[Downlink], fails: list[bool]
    ) -> RoundOutcome:
        """One ``train`` Message per trainee (under SecAgg+, Flower's protocol instead)."""
        confs = [self._train_config(r, k, t, fail)
                 for k, (t, fail) in enumerate(zip(trainees, fails, strict=True))]  # fmt: skip
        if self.settings.secagg:
            return self._train_securely(run, r, trainees, downs, confs)
        kind = f"{MessageType.TRAIN}.{DP_ACTION}" if self.settings.dp_clipping_norm else None
        msgs = {}
        for t, down, conf in zip(trainees, downs, confs, strict=True):
            node = self.sites[t.index].node_id
            msgs[node] = Message(downlink_content(down, conf), dst_node_id=node,
                                 message_type=kind or MessageType.TRAIN,
                                 group_id=str(r))  # fmt: skip
        replies = self._send(msgs)
        live = set(self.grid.get_node_ids())
        outcomes, uplinks = [], {}
        for k, t in enumerate(trainees):
            node = self.sites[t.index].node_id
            up, records = self._reply(replies.get(node), r, t, node in live)
            outcomes.append(records)
            if up is not None:
                uplinks[k] = up
        local = write_outcomes(run.metrics, outcomes)
        return RoundOutcome(trainees, uplinks, sum(d.nbytes() for d in downs), local)

    def aggregate(
        self, run: Run, r: int, out: RoundOutcome, weights: list[float]
    ) -> AggregateResult:
        """The algorithm's aggregation (of SecAgg+'s mean, under secagg), then central DP's
        noise; epsilon so far and SecAgg+'s parameters go to the round record and
        ``flower.json``."""
        agg = super().aggregate(run, r, out, weights)
        if run.algorithm.keeps_client_state:  # they train next from what they kept now
            for k in out.uplinks:
                self.kept_rounds[out.trainees[k].index] = r
        s = self.settings
        if s.dp_clipping_norm:
            agg.info.update(add_noise(s, run.cfg.seed, r, agg.state, len(out.uplinks)))
        if s.dp_noise_multiplier:
            agg.info.update(privacy_info(r, s.dp_noise_multiplier, s.dp_delta))
        keys = [k for k in agg.info if k.startswith(("dp_", "secagg"))]
        if keys:
            self.info["round"] = {"round": r, **{k: agg.info[k] for k in keys}}
            _write_info(run.run_dir, self.info)
        return agg

    def evaluate(self, run: Run, r: int, state: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Every node evaluates ``state`` on its test set; the records (each client's, then the
        combined ``__global__``) are written; the round's summary row."""
        msgs = {s.node_id: Message(state_content(state, {CONFIG_KEY: self.config_yaml,
                                                         "round": r}),
                                   dst_node_id=s.node_id, message_type=MessageType.EVALUATE,
                                   group_id=str(r)) for s in self.sites}  # fmt: skip
        replies = self._send(msgs)
        got: dict[str, GlobalEval] = {}
        for s in self.sites:
            reply = replies.get(s.node_id)
            if reply is None or reply.has_error():
                why = node_error(s.node_id, reply)[1] if reply is not None else "no reply"
                log.warning("round %d: no evaluation from client %s's SuperNode: %s", r,
                            s.name, why)  # fmt: skip
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
                    for s in self.sites})  # fmt: skip
        row.update(local_own=math.nan, local_global=math.nan)
        return row

    def skipped_row(self, r: int) -> dict[str, Any]:
        row: dict[str, Any] = {"round": r, "global_loss": math.nan, "global_ppl": math.nan}
        row.update({f"loss[{s.name}]": math.nan for s in self.sites})
        row.update(local_own=math.nan, local_global=math.nan)
        return row

    # -- messages ----------------------------------------------------------------------------

    def _train_config(self, r: int, k: int, t: Trainee, fail: bool) -> dict[str, Any]:
        """What the trainee's node is told with its downlink."""
        conf = {CONFIG_KEY: self.config_yaml, "round": r, "index": t.index, "steps": t.steps,
                "fail": fail, "position": k,
                "kept_round": self.kept_rounds.get(t.index, 0)}  # fmt: skip
        if self.settings.dp_clipping_norm:
            conf["clipping_norm"] = self.settings.dp_clipping_norm
        return conf

    def _train_securely(
        self, run: Run, r: int, trainees: list[Trainee], downs: list[Downlink],
        confs: list[dict[str, Any]],
    ) -> RoundOutcome:  # fmt: skip
        """The round's trainings under SecAgg+ (:func:`cllora.flower.secagg.secure_train`)."""
        weights = aggregation_weights(self.stats, [t.name for t in trainees],
                                      run.cfg.fed.weighting)  # fmt: skip
        nodes = [self.sites[t.index].node_id for t in trainees]
        out = secure_train(self.grid, self.settings, run.algorithm, run.metrics, r, trainees,
                           nodes, downs, confs, weights)  # fmt: skip
        if out.halted:
            raise TooFewClientsError(
                f"round {r}: SecAgg+ stopped before unmasking the sum: fewer nodes than its "
                f"reconstruction threshold ({out.info.get('secagg_reconstruction_threshold')}) "
                f"answered every stage; the global adapter of round {r - 1} is in "
                f"{run.run_dir / 'checkpoint'}"
            )
        return out

    def _send(self, msgs: dict[int, Message]) -> dict[int, Message]:
        """Send messages (by node id) to the connected nodes; their replies by node id."""
        live = set(self.grid.get_node_ids())
        return exchange(self.grid, {n: m for n, m in msgs.items() if n in live},
                        self.settings.round_timeout)  # fmt: skip

    def _reply(
        self, reply: Message | None, r: int, t: Trainee, connected: bool
    ) -> tuple[Any, list[Record]]:
        """A trainee's uplink (None: failed) and records from its node's reply."""
        if reply is None and not connected:
            why = "its SuperNode is not connected (it left the federation or never joined)"
        elif reply is None:
            why = f"no reply from its SuperNode within {self.settings.round_timeout:.0f} s"
        elif reply.has_error():
            why = node_error(self.sites[t.index].node_id, reply)[1]
            why = f"its SuperNode replied with an error: {why}"
        else:
            up, records, _ = read_uplink(reply.content)
            return up, records
        log.warning("round %d: client %s failed: %s", r, t.name, why)
        return None, [ClientFailed(round=r, client=t.name, error=why)]


def check_flower_config(cfg: Config, settings: FlowerSettings) -> None:
    """What the Flower apps cannot run (one-line :class:`ConfigError`), before anything loads."""
    strategy, algorithm = cfg.fed.strategy, algorithm_class(cfg.fed.strategy)
    if not algorithm.runs_on_flower():
        runs = [n for n in algorithm_names() if algorithm_class(n).runs_on_flower()]
        raise ConfigError(
            f"fed.strategy={strategy} cannot run on Flower: {algorithm.flower_refusal()}; use "
            f"one of {', '.join(runs)}"
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
        check_secagg(cfg, settings, trainees_per_round(nodes, cfg.fed.sample_fraction))
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
        model, _, _ = build_model(cfg, global_rank(cfg))  # the seeded initial adapter, the export
        pool = FlowerPool.open(grid, cfg, settings, run_dir)
        result = RunResult(run_dir, config=cfg, global_state=lora_state_dict(model))
        return run_loop(Run(cfg, run_dir, model, make_algorithm(cfg), pool, metrics, result), ckpt)
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


def _write_info(run_dir: Path, info: dict[str, Any]) -> None:
    (run_dir / "flower.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")


def add_noise(
    s: FlowerSettings, seed: int, r: int, state: dict[str, torch.Tensor], n: int
) -> dict[str, Any]:
    """Gaussian noise on the aggregate (Flower's central DP, client-side fixed clipping);
    seeded by the run's seed and the round, so a resumed run adds the same noise."""
    std = compute_stdv(s.dp_noise_multiplier, s.dp_clipping_norm, n)
    np.random.seed((seed * 1_000_003 + r) % 2**32)
    keys = sorted(state)
    arrays = [state[k].detach().cpu().numpy().copy() for k in keys]
    add_gaussian_noise_inplace(arrays, std)
    for k, a in zip(keys, arrays, strict=True):
        state[k] = torch.from_numpy(a).to(state[k].device, state[k].dtype)
    return {"dp_clipping_norm": s.dp_clipping_norm, "dp_noise_multiplier": s.dp_noise_multiplier,
            "dp_noise_std": std}  # fmt: skip


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


def _privacy(settings: FlowerSettings) -> dict[str, Any]:
    """The settings a resumed run must keep (the DP accounting and SecAgg+ go on as begun)."""
    return {k: v for k, v in asdict(settings).items() if k.startswith(("dp_", "secagg"))}
