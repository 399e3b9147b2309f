"""The federated server loop (in-process): sample clients, train locally, aggregate, evaluate.

Usage::

    from cllora.config import load_config
    from cllora.fed.server import run_experiment

    result = run_experiment(load_config("examples/demo.yaml"))
    print(result.table)          # the printed results table
    result.run_dir               # config.yaml, metrics.jsonl, summary.csv, adapter/, run.log

One base model is loaded per process and never aggregated: only LoRA adapter state dicts move
between the clients and the server (their bytes are counted every round). Each round: the server
samples ``ceil(sample_fraction * N)`` clients (seeded), each trains from the global adapter with
:func:`cllora.fed.client.client_update`, the updates are aggregated by the strategy, and the
global model is evaluated on every client's test set and on the global test set (``__global__``:
their union, or the held-out set of ``partition.global_test_fraction``).
Strategies (``fed.strategy``) are the pure functions of :mod:`cllora.fed.strategy`; the server
keeps the server optimizer's state between rounds and passes each client's LoRA scaling so that
heterogeneous ranks (``lora.client_ranks``) aggregate correctly. A client whose local training
raises (a NaN/inf loss, a simulated crash, any exception) is left out of that round and logged
(``client_failed``); when fewer than ``fed.min_clients`` clients succeed, the run stops with
:class:`TooFewClientsError`, keeping the checkpoint of the last complete round (written after
every round into ``checkpoint/``).
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from cllora.config import Config, ConfigError, save_config
from cllora.data.partition import Client, sample_length
from cllora.data.pipeline import ClientData, build_clients
from cllora.data.quality import quality_score
from cllora.fed.checkpoint import Checkpoint, save_checkpoint
from cllora.fed.client import ClientUpdate, client_update
from cllora.fed.distributed import DistContext
from cllora.fed.evaluation import GLOBAL, Evaluator
from cllora.fed.resume import open_resume
from cllora.fed.strategy import StrategyOptions, aggregate, client_weights, to_client_rank
from cllora.model.adapter import save_adapter
from cllora.model.attention import use_backend
from cllora.model.lora import lora_state_dict, set_lora_state, state_nbytes
from cllora.model.setup import build_model, check_engine
from cllora.report.metrics import MetricsLog, format_table, write_summary
from cllora.report.tables import client_table, heterogeneity_summary, write_csv

log = logging.getLogger("cllora")
__all__ = ["GLOBAL", "RunResult", "TooFewClientsError", "prepare", "run_experiment"]


@dataclass
class RunResult:
    run_dir: Path
    rows: list[dict[str, Any]] = field(default_factory=list)
    config: Config | None = None
    global_state: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def table(self) -> str:
        return format_table(self.rows)

    @property
    def final_global_loss(self) -> float:
        return self.rows[-1]["global_loss"]


def make_run_dir(cfg: Config) -> Path:
    """``out_dir/run_name`` (refused if it already holds a run) or ``out_dir/<timestamp>``."""
    root = Path(cfg.out_dir)
    name = cfg.run_name or time.strftime("%Y%m%d-%H%M%S")
    run_dir = root / name
    if run_dir.exists() and any(run_dir.iterdir()):
        if cfg.run_name:
            raise FileExistsError(
                f"run directory {run_dir} already holds a run; choose another run_name or remove it"
            )
        suffix = 1
        while (root / f"{name}-{suffix}").exists():
            suffix += 1
        run_dir = root / f"{name}-{suffix}"
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _attach_log_file(run_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(run_dir / "run.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("cllora").addHandler(handler)
    logging.getLogger("cllora").setLevel(logging.INFO)
    return handler


def client_seed(seed: int, round_idx: int, client_idx: int) -> int:
    """Seed of one client's local training in one round (independent of which others ran)."""
    return (seed * 1_000_003 + round_idx * 10_007 + client_idx * 101) % (2**31)


def sample_clients(n: int, fraction: float, rng: random.Random) -> list[int]:
    """Indices of the clients that train this round (sorted; at least one)."""
    k = max(1, math.ceil(fraction * n))
    return sorted(rng.sample(range(n), k)) if k < n else list(range(n))


def global_rank(cfg: Config) -> int:
    """Rank of the global adapter: lora.r, or the largest client rank if that is larger."""
    return max([cfg.lora.r, *cfg.lora.client_ranks])


def client_rank(cfg: Config, client_idx: int) -> int:
    """Rank client ``client_idx`` trains (``lora.client_ranks`` cycled; else the global rank)."""
    ranks = cfg.lora.client_ranks
    return ranks[client_idx % len(ranks)] if ranks else global_rank(cfg)


def strategy_options(cfg: Config) -> StrategyOptions:
    """Server-optimizer settings from the config (default server lr per strategy)."""
    f = cfg.fed
    lr = f.server_lr if f.server_lr is not None else (1.0 if f.strategy == "fedavgm" else 0.01)
    return StrategyOptions(
        server_lr=lr, momentum=f.server_momentum, beta1=f.beta1, beta2=f.beta2, tau=f.tau
    )


def check_combination(cfg: Config) -> None:
    """Settings that are valid alone but not together: a clear error before anything loads."""
    check_engine(cfg)
    if cfg.fed.strategy == "frozen_a" and len(set(cfg.lora.client_ranks)) > 1:
        raise ConfigError(
            "fed.strategy=frozen_a needs one rank for every client: A is shared and frozen, "
            f"but lora.client_ranks={cfg.lora.client_ranks}"
        )
    if cfg.fed.weighting == "quality" and cfg.quality.score_samples == 0:
        raise ConfigError(
            "fed.weighting=quality needs the quality score: set quality.score_samples >= 1"
        )
    if cfg.fed.min_clients > cfg.partition.num_clients and cfg.partition.method != "field":
        raise ConfigError(
            f"fed.min_clients={cfg.fed.min_clients} exceeds partition.num_clients="
            f"{cfg.partition.num_clients}"
        )


def prepare_run(cfg: Config) -> tuple[Any, Any, ClientData]:
    """Load the base model with LoRA injected (at the global rank), and the clients' data."""
    check_combination(cfg)
    model, tokenizer, engine = build_model(cfg, global_rank(cfg))
    log.info(
        "model %s: LoRA r=%d on %d modules", cfg.model.name, global_rank(cfg),
        engine["lora_modules"],
    )  # fmt: skip
    data = build_clients(cfg, tokenizer)
    if cfg.fed.min_clients > len(data.clients):
        raise ConfigError(
            f"fed.min_clients={cfg.fed.min_clients} exceeds the {len(data.clients)} clients of "
            "the partition"
        )
    return model, tokenizer, data


def prepare(cfg: Config) -> tuple[Any, Any, list[Client]]:
    """The base model with LoRA, its tokenizer and the clients (see :func:`prepare_run`)."""
    model, tokenizer, data = prepare_run(cfg)
    return model, tokenizer, data.clients


def client_stats(
    model: Any,
    tokenizer: Any,
    data: ClientData,
    cfg: Config,
    metrics: MetricsLog,
    run_dir: Path,
    write: bool = True,
) -> dict[str, dict[str, float]]:
    """Measure every client, write ``clients.csv`` / ``samples.csv`` and ``client_stats`` records.

    The quality score (:func:`cllora.data.quality.quality_score`: 1 / perplexity of the initial
    global model, i.e. the base model since LoRA starts at zero, on the client's first
    ``quality.score_samples`` training responses) needs no labels; it also weights clients under
    ``fed.weighting=quality``. Returns per client: samples, tokens and (when scored) quality.
    ``write=False`` (a resumed run, whose files and records exist) only returns them.
    """
    pad_id, n = tokenizer.pad_token_id, cfg.quality.score_samples
    quality, scored = {}, []
    for c in data.clients if n else []:
        losses, quality[c.name] = quality_score(
            model, c.train[:n], pad_id, cfg.train.eval_batch_size
        )
        for s, loss in zip(c.train[:n], losses, strict=True):
            scored.append(
                {"client": c.name, "where": s.meta.get("where", ""), "length": sample_length(s),
                 "corruption": s.meta.get("corruption", ""), "loss": loss}
            )  # fmt: skip
    rows = client_table(data.clients, data.edges, tokenizer, quality)
    if write:
        write_csv(run_dir / "clients.csv", rows)
        if scored:
            write_csv(run_dir / "samples.csv", scored)
        summary = heterogeneity_summary(rows)
        metrics.write(kind="partition", **summary, **_json_safe(data.stats))
    stats = {}
    for c, row in zip(data.clients, rows, strict=True):
        if write:
            metrics.write(kind="client_stats", **row, samples=len(c.train), tokens=c.train_tokens)
        stats[c.name] = {"samples": float(len(c.train)), "tokens": float(c.train_tokens)}
        if c.name in quality:
            stats[c.name]["quality"] = quality[c.name]
    return stats


class TooFewClientsError(RuntimeError):
    """Fewer clients than fed.min_clients finished a round; the last checkpoint is kept."""


def run_experiment(cfg: Config | None, resume: Path | None = None) -> RunResult:
    """Run a whole federated experiment as ``cfg`` says; write and return its results.

    ``resume``: a run directory killed or stopped earlier; the run goes on from its newest
    intact checkpoint (global adapter, server-optimizer state, client-sampling and failure RNG
    states, rows so far) and ends as the uninterrupted run would have. ``cfg`` may then be None
    (the run's saved config); a config that differs from the saved one is refused, naming the
    differing keys (:func:`cllora.fed.resume.open_resume`).
    """
    ctx = DistContext.from_env()  # started by torchrun with WORLD_SIZE > 1
    main = ctx is None or ctx.is_main
    try:
        ckpt = None
        if resume is not None:
            if ctx is not None:
                ctx.barrier()  # rank 0 cuts metrics.jsonl back; the others only read
            cfg, ckpt = open_resume(Path(resume), cfg, truncate=main)
            run_dir = Path(resume)
        elif cfg is None:
            raise ValueError("run_experiment needs a config or a run directory to resume")
        check_combination(cfg)  # before the run directory exists: a bad config leaves nothing
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        if ckpt is None:
            run_dir = make_run_dir(cfg) if main else Path()
            if ctx is not None:  # every rank uses rank 0's directory (its timestamp)
                run_dir = Path(ctx.all_gather_json(str(run_dir))[0])
        handler = _attach_log_file(run_dir) if main else logging.NullHandler()
        if ckpt is None and main:
            save_config(cfg, run_dir / "config.yaml")
        metrics = MetricsLog(run_dir / "metrics.jsonl") if main else MetricsLog(None)
        backend = None if cfg.model.attn_backend == "auto" else cfg.model.attn_backend
        try:
            with use_backend(backend):
                return _run(cfg, run_dir, metrics, ckpt, ctx)
        finally:
            metrics.close()
            logging.getLogger("cllora").removeHandler(handler)
            handler.close()
    finally:
        if ctx is not None:
            ctx.close()


def _send_state(cfg: Config, global_state: dict, rank: int) -> dict:
    """The global adapter as client of ``rank`` receives it (SVD-truncated when lower)."""
    big = global_rank(cfg)
    if rank == big:
        return global_state
    alpha = cfg.lora.alpha
    return to_client_rank(
        global_state, rank, global_scaling=alpha / big, client_scaling=alpha / rank
    )


def _train_round(
    cfg: Config,
    model: Any,
    clients: list[Client],
    pad_id: int,
    r: int,
    global_state: dict,
    metrics: MetricsLog,
    rng_fail: random.Random,
    chosen: list[int],
    evaluator: Evaluator,
    ctx: DistContext | None = None,
) -> tuple[list[tuple[int, ClientUpdate]], int]:
    """Local training of the chosen clients; failures are logged and left out.

    Returns the successful ``(client index, update)`` pairs and the bytes sent down to clients.
    With ``ctx`` (torchrun), each rank trains the chosen clients it owns, then every rank
    receives every update (:meth:`DistContext.share_states`) and rank 0 writes every client's
    records in client order, so the metrics read as the in-process run's.
    """
    fails = {i: rng_fail.random() < cfg.fed.client_failure_rate for i in chosen}  # all ranks
    sent = {i: _send_state(cfg, global_state, client_rank(cfg, i)) for i in chosen}
    bytes_down = sum(state_nbytes(st) for st in sent.values())
    if ctx is None:
        return _train_clients(cfg, model, clients, pad_id, r, sent, fails, chosen, evaluator,
                              metrics), bytes_down  # fmt: skip
    records = MetricsLog(None, keep=True)
    mine = _train_clients(cfg, model, clients, pad_id, r, sent, fails, ctx.owned(chosen),
                          evaluator, records)  # fmt: skip
    gathered = ctx.all_gather_json({"records": records.kept, "local": evaluator.local_losses})
    for rec in sorted((x for g in gathered for x in g["records"]),
                      key=lambda x: chosen.index(x["_client_idx"])):  # fmt: skip
        rec.pop("_client_idx")
        metrics.write(**rec)
    merged = {name: tuple(losses) for g in gathered for name, losses in g["local"].items()}
    # every rank's local-model losses, in client order, on every rank
    evaluator.local_losses = {
        clients[i].name: merged[clients[i].name] for i in chosen if clients[i].name in merged
    }
    states = ctx.share_states({i: u.state for i, u in mine}, sent)
    return [(i, ClientUpdate(state=states[i])) for i in chosen if i in states], bytes_down


def _train_clients(
    cfg: Config,
    model: Any,
    clients: list[Client],
    pad_id: int,
    r: int,
    sent: dict[int, dict],
    fails: dict[int, bool],
    which: list[int],
    evaluator: Evaluator,
    metrics: MetricsLog,
) -> list[tuple[int, ClientUpdate]]:
    """Train the clients ``which`` (in order) from their ``sent`` adapters; log each one."""
    updates = []
    for i in which:
        c = clients[i]
        metrics.client_idx = i
        try:
            u = client_update(
                model,
                sent[i],
                c.train,
                cfg.train,
                pad_id,
                seed=client_seed(cfg.seed, r, i),
                prox_mu=cfg.fed.prox_mu if cfg.fed.strategy == "fedprox" else 0.0,
                freeze_a=cfg.fed.strategy == "frozen_a",
                fail_after=cfg.train.local_steps // 2 if fails[i] else None,
                desc=f"round {r} {c.name}",
                progress=cfg.progress,
            )
        except Exception as err:  # one client's failure must not stop the round
            log.warning("round %d: client %s failed: %s: %s", r, c.name, type(err).__name__, err)
            log.debug("traceback", exc_info=True)
            metrics.write(
                kind="client_failed", round=r, client=c.name, error=f"{type(err).__name__}: {err}"
            )
            continue
        updates.append((i, u))
        metrics.write(
            kind="client_train",
            round=r,
            client=c.name,
            rank=client_rank(cfg, i),
            losses=u.losses,
            samples=u.samples,
            tokens_seen=u.tokens_seen,
            seconds=round(u.seconds, 3),
        )
        if cfg.eval.local:  # the model still holds this client's local adapter
            evaluator.local(model, i, r, metrics)
    return updates


def _json_safe(info: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in info.items() if isinstance(v, int | float | str | bool | list)}


def _rng_states(*rngs: random.Random) -> list[dict[str, Any]]:
    """JSON-able states of Python RNGs (client sampling, simulated failures)."""
    out = []
    for rng in rngs:
        version, internal, gauss = rng.getstate()
        out.append({"version": version, "state": list(internal), "gauss": gauss})
    return out


def _set_rng_states(states: list[dict[str, Any]], *rngs: random.Random) -> None:
    for rng, s in zip(rngs, states, strict=True):
        rng.setstate((s["version"], tuple(s["state"]), s["gauss"]))


def _to_device(tree: Any, device: torch.device) -> Any:
    if isinstance(tree, torch.Tensor):
        return tree.to(device)
    if isinstance(tree, dict):
        return {k: _to_device(v, device) for k, v in tree.items()}
    return tree


def _run(
    cfg: Config,
    run_dir: Path,
    metrics: MetricsLog,
    ckpt: Checkpoint | None,
    ctx: DistContext | None = None,
) -> RunResult:
    model, tokenizer, data = prepare_run(cfg)
    clients, pad_id = data.clients, tokenizer.pad_token_id
    result = RunResult(run_dir=run_dir, global_state=lora_state_dict(model), config=cfg)
    # before a resumed adapter is loaded: the quality score is the base model's
    stats = client_stats(model, tokenizer, data, cfg, metrics, run_dir, write=ckpt is None)
    evaluator = Evaluator(clients, data.edges, pad_id, cfg, metrics, ctx, data.global_test)
    main = ctx is None or ctx.is_main
    strategy = "fedavg" if cfg.fed.strategy == "fedprox" else cfg.fed.strategy
    opts, server_state = strategy_options(cfg), {}
    alpha, big = cfg.lora.alpha, global_rank(cfg)
    rng, rng_fail = random.Random(cfg.seed), random.Random(cfg.seed + 7919)
    first = 1
    if ckpt is None:
        if cfg.fed.eval_initial:
            result.rows.append(evaluator.global_round(model, 0))
        if main:
            save_checkpoint(run_dir / "checkpoint", 0, result.global_state, server_state,
                            result.rows, extra={"rng": _rng_states(rng, rng_fail)})  # fmt: skip
    else:
        device = next(iter(result.global_state.values())).device
        result.global_state = _to_device(ckpt.global_state, device)
        server_state = _to_device(ckpt.server_state, device)
        result.rows = list(ckpt.rows)
        _set_rng_states(ckpt.extra["rng"], rng, rng_fail)
        set_lora_state(model, result.global_state, resize=True)
        first = ckpt.round + 1
        log.info("resuming %s after round %d of %d", run_dir, ckpt.round, cfg.fed.rounds)
    for r in tqdm(range(first, cfg.fed.rounds + 1), desc="rounds", disable=not cfg.progress):
        start = time.perf_counter()
        rng_before = _rng_states(rng, rng_fail)  # the state a checkpoint of round r-1 holds
        chosen = sample_clients(len(clients), cfg.fed.sample_fraction, rng)
        updates, bytes_down = _train_round(
            cfg,
            model,
            clients,
            pad_id,
            r,
            result.global_state,
            metrics,
            rng_fail,
            chosen,
            evaluator,
            ctx,
        )
        if len(updates) < cfg.fed.min_clients:
            if main:
                save_checkpoint(run_dir / "checkpoint", r - 1, result.global_state, server_state,
                                result.rows, extra={"rng": rng_before})  # fmt: skip
            raise TooFewClientsError(
                f"round {r}: only {len(updates)} of {len(chosen)} clients finished local "
                f"training, fewer than fed.min_clients={cfg.fed.min_clients}; the global "
                f"adapter of round {r - 1} is in {run_dir / 'checkpoint'}"
            )
        key = cfg.fed.weighting if cfg.fed.weighting != "uniform" else "samples"
        weights = client_weights(
            [stats[clients[i].name][key] for i, _ in updates], cfg.fed.weighting
        )
        agg = aggregate(
            strategy,
            result.global_state,
            [u.state for _, u in updates],
            weights,
            server_state,
            opts,
            client_scalings=[alpha / client_rank(cfg, i) for i, _ in updates],
            global_scaling=alpha / big,
        )
        result.global_state, server_state = agg.state, agg.server_state
        set_lora_state(model, result.global_state, resize=True)
        row = evaluator.global_round(model, r)
        evaluator.finish_round(row)
        result.rows.append(row)
        metrics.write(
            kind="round",
            round=r,
            clients=[clients[i].name for i in chosen],
            succeeded=len(updates),
            weights=weights,
            bytes_down=bytes_down,
            bytes_up=sum(state_nbytes(u.state) for _, u in updates),
            seconds=round(time.perf_counter() - start, 3),
            global_loss=row["global_loss"],
            **_json_safe(agg.info),
        )
        if main:
            save_checkpoint(run_dir / "checkpoint", r, result.global_state, server_state,
                            result.rows, extra={"rng": _rng_states(rng, rng_fail)})  # fmt: skip
        log.info("round %d: global loss %.4f (ppl %.2f)", r, row["global_loss"], row["global_ppl"])
    if main:
        save_adapter(model, run_dir / "adapter", base_model=cfg.model.name,
                     state=result.global_state)  # fmt: skip
        write_summary(run_dir / "summary.csv", result.rows)
    return result
