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
global model is evaluated on every client's test set and on their union (``__global__``).
A client whose loss goes NaN/inf is rejected for that round and logged; a round with no
successful client stops the run with an error.
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

from cllora.config import Config, save_config
from cllora.data.formatting import build_samples
from cllora.data.partition import Client, make_clients
from cllora.data.readers import load_records
from cllora.eval import EvalResult, evaluate
from cllora.fed.client import ClientUpdate, NonFiniteLossError, client_update
from cllora.fed.strategy import client_weights, fedavg
from cllora.model.adapter import save_adapter
from cllora.model.load import load_model
from cllora.model.lora import inject_lora, lora_state_dict, set_lora_state, state_nbytes
from cllora.report.metrics import MetricsLog, format_table, write_summary

log = logging.getLogger("cllora")
GLOBAL = "__global__"


@dataclass
class RunResult:
    run_dir: Path
    rows: list[dict[str, Any]] = field(default_factory=list)
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


def prepare(cfg: Config) -> tuple[Any, Any, list[Client]]:
    """Load the base model with LoRA injected, and the clients' data."""
    model, tokenizer = load_model(cfg.model, seed=cfg.seed)
    torch.manual_seed(cfg.seed)  # LoRA A's initialisation
    targets = inject_lora(
        model, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules
    )
    log.info(
        "model %s (%s): LoRA r=%d on %d modules",
        cfg.model.name,
        cfg.model.dtype,
        cfg.lora.r,
        len(targets),
    )
    records = load_records(cfg.data.path, cfg.data.format, cfg.data.on_malformed)
    if cfg.data.max_records and len(records) > cfg.data.max_records:
        records = random.Random(cfg.seed).sample(records, cfg.data.max_records)
    samples, stats = build_samples(
        records,
        tokenizer,
        shape=cfg.data.shape,
        fields=cfg.data.fields or None,
        max_length=cfg.data.max_length,
        overlong=cfg.data.overlong,
        response_only=cfg.data.response_only,
        progress=cfg.progress,
    )
    log.info("data %s: %s", cfg.data.path, stats)
    clients = make_clients(samples, cfg.partition, cfg.seed)
    for c in clients:
        log.info("client %s: %d train, %d test samples", c.name, len(c.train), len(c.test))
    return model, tokenizer, clients


def evaluate_global(
    model: Any, clients: list[Client], pad_id: int, cfg: Config, round_idx: int, metrics: MetricsLog
) -> dict[str, Any]:
    """Evaluate the current model on each client's test set and their union; one summary row."""
    results = {}
    for c in tqdm(clients, desc=f"eval round {round_idx}", leave=False, disable=not cfg.progress):
        results[c.name] = evaluate(model, c.test, pad_id, cfg.train.eval_batch_size)
    results[GLOBAL] = EvalResult.combine(list(results.values()))
    for name, r in results.items():
        metrics.write(
            kind="global_eval",
            round=round_idx,
            client=name,
            loss=r.loss,
            ppl=r.ppl,
            tokens=r.tokens,
        )
    row: dict[str, Any] = {
        "round": round_idx,
        "global_loss": results[GLOBAL].loss,
        "global_ppl": results[GLOBAL].ppl,
    }
    row.update({f"loss[{c.name}]": results[c.name].loss for c in clients})
    return row


def run_experiment(cfg: Config) -> RunResult:
    """Run a whole federated experiment as ``cfg`` says; write and return its results."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    run_dir = make_run_dir(cfg)
    handler = _attach_log_file(run_dir)
    save_config(cfg, run_dir / "config.yaml")
    metrics = MetricsLog(run_dir / "metrics.jsonl")
    try:
        return _run(cfg, run_dir, metrics)
    finally:
        metrics.close()
        logging.getLogger("cllora").removeHandler(handler)
        handler.close()


def _run(cfg: Config, run_dir: Path, metrics: MetricsLog) -> RunResult:
    model, tokenizer, clients = prepare(cfg)
    pad_id = tokenizer.pad_token_id
    result = RunResult(run_dir=run_dir, global_state=lora_state_dict(model))
    if cfg.fed.eval_initial:
        result.rows.append(evaluate_global(model, clients, pad_id, cfg, 0, metrics))
    rng = random.Random(cfg.seed)
    for r in tqdm(range(1, cfg.fed.rounds + 1), desc="rounds", disable=not cfg.progress):
        start = time.perf_counter()
        chosen = sample_clients(len(clients), cfg.fed.sample_fraction, rng)
        updates: list[ClientUpdate] = []
        for i in chosen:
            c = clients[i]
            try:
                u = client_update(
                    model,
                    result.global_state,
                    c.train,
                    cfg.train,
                    pad_id,
                    seed=client_seed(cfg.seed, r, i),
                    desc=f"round {r} {c.name}",
                    progress=cfg.progress,
                )
            except NonFiniteLossError as err:
                log.warning("round %d: client %s rejected: %s", r, c.name, err)
                metrics.write(kind="client_failed", round=r, client=c.name, error=str(err))
                continue
            updates.append(u)
            metrics.write(
                kind="client_train",
                round=r,
                client=c.name,
                losses=u.losses,
                samples=u.samples,
                tokens_seen=u.tokens_seen,
                seconds=round(u.seconds, 3),
            )
        if not updates:
            raise RuntimeError(f"round {r}: no client finished its local training; stopping")
        weights = client_weights([u.samples for u in updates], cfg.fed.weighting)
        result.global_state = fedavg([u.state for u in updates], weights)
        set_lora_state(model, result.global_state)
        row = evaluate_global(model, clients, pad_id, cfg, r, metrics)
        result.rows.append(row)
        per_client = state_nbytes(result.global_state)
        metrics.write(
            kind="round",
            round=r,
            clients=[clients[i].name for i in chosen],
            succeeded=len(updates),
            bytes_down=per_client * len(chosen),
            bytes_up=sum(state_nbytes(u.state) for u in updates),
            seconds=round(time.perf_counter() - start, 3),
            global_loss=row["global_loss"],
        )
        log.info("round %d: global loss %.4f (ppl %.2f)", r, row["global_loss"], row["global_ppl"])
    save_adapter(model, run_dir / "adapter", base_model=cfg.model.name, state=result.global_state)
    write_summary(run_dir / "summary.csv", result.rows)
    return result
