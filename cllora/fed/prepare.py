"""Everything a run loads before its first round: the model with LoRA, the clients, their stats.

Usage::

    from cllora.fed.prepare import check_combination, prepare, prepare_run
    check_combination(cfg)                    # settings valid alone but not together
    model, tokenizer, data = prepare_run(cfg) # data: cllora.data.pipeline.ClientData
    model, tokenizer, clients = prepare(cfg)  # the same, clients only

:func:`client_stats` measures every client (``clients.csv``, ``samples.csv`` and the
``partition`` / ``client_stats`` records); the label-free quality score it computes also weights
clients under ``fed.weighting=quality``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from cllora.config import Config, ConfigError
from cllora.data.partition import Client, sample_length
from cllora.data.pipeline import ClientData, build_clients, check_model_window
from cllora.data.tables import client_table, heterogeneity_summary, write_csv
from cllora.eval import quality_score
from cllora.eval_cache import LossCache
from cllora.fed.algorithms import algorithm_class
from cllora.model.setup import build_model, check_engine
from cllora.report.metrics import MetricsLog
from cllora.report.records import FreeRecord, Kind

log = logging.getLogger("cllora")


def check_combination(cfg: Config) -> None:
    """Settings that are valid alone but not together: a clear error before anything loads."""
    check_engine(cfg)
    algorithm_class(cfg.fed.strategy).check_config(cfg)
    if cfg.fed.weighting == "quality" and cfg.quality.score_samples == 0:
        raise ConfigError(
            "fed.weighting=quality needs the quality score: set quality.score_samples >= 1"
        )
    if cfg.fed.min_clients > cfg.partition.num_clients and cfg.partition.method != "field":
        raise ConfigError(
            f"fed.min_clients={cfg.fed.min_clients} exceeds partition.num_clients="
            f"{cfg.partition.num_clients}"
        )


def global_rank(cfg: Config) -> int:
    """Rank of the global adapter: lora.r, or the largest client rank if that is larger."""
    return max([cfg.lora.r, *cfg.lora.client_ranks])


def prepare_run(cfg: Config) -> tuple[Any, Any, ClientData]:
    """Load the base model with LoRA injected (at the global rank), and the clients' data."""
    check_combination(cfg)
    model, tokenizer, engine = build_model(cfg, global_rank(cfg))
    log.info(
        "model %s: LoRA r=%d on %d modules", cfg.model.name, global_rank(cfg),
        engine["lora_modules"],
    )  # fmt: skip
    check_model_window(cfg, getattr(model.config, "max_position_embeddings", None))
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
    cache: LossCache | None = None,
) -> dict[str, dict[str, float]]:
    """Measure every client, write ``clients.csv`` / ``samples.csv`` and ``client_stats`` records.

    The quality score (:func:`cllora.eval.quality_score`: 1 / perplexity of the initial
    global model, i.e. the base model since LoRA starts at zero, on the client's first
    ``quality.score_samples`` training responses) needs no labels; it also weights clients under
    ``fed.weighting=quality``. Returns per client: samples, tokens and (when scored) quality.
    ``write=False`` (a resumed run, whose records exist) writes no record, and rewrites
    ``clients.csv`` / ``samples.csv`` only where one was deleted (the same numbers, recomputed).
    ``cache``: the quality score's losses through it (the base model's, shared by runs).
    """
    pad_id, n = tokenizer.pad_token_id, cfg.quality.score_samples
    quality, scored = {}, []
    total = sum(len(c.train[:n]) for c in data.clients) if n else 0
    bar = tqdm(total=total, desc="quality score", unit="sample", disable=not cfg.progress)
    for c in data.clients if n else []:
        losses, quality[c.name] = quality_score(
            model, c.train[:n], pad_id, cfg.train.eval_batch_size,
            cache.evaluate_samples if cache is not None else None,
        )  # fmt: skip
        for s, loss in zip(c.train[:n], losses, strict=True):
            scored.append(
                {"client": c.name, "where": s.meta.get("where", ""), "length": sample_length(s),
                 "corruption": s.meta.get("corruption", ""), "loss": loss}
            )  # fmt: skip
        bar.update(len(c.train[:n]))
    bar.close()
    rows = client_table(data.clients, data.edges, tokenizer, quality, cfg.partition.length_measure)
    for name, table in (("clients.csv", rows), ("samples.csv", scored)):
        if table and (write or not (run_dir / name).exists()):
            if not write:
                log.warning("%s was missing from %s: rewritten (recomputed)", name, run_dir)
            write_csv(run_dir / name, table)
    if write:
        summary = heterogeneity_summary(rows)
        metrics.write(FreeRecord(Kind.PARTITION, {**summary, **json_safe(data.stats)}))
    stats = {}
    for c, row in zip(data.clients, rows, strict=True):
        if write:
            fields = {**row, "samples": len(c.train), "tokens": c.train_tokens}
            metrics.write(FreeRecord(Kind.CLIENT_STATS, fields))
        stats[c.name] = {"samples": float(len(c.train)), "tokens": float(c.train_tokens)}
        if c.name in quality:
            stats[c.name]["quality"] = quality[c.name]
    return stats


def json_safe(info: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``info`` a metrics record can hold as they are."""
    return {k: v for k, v in info.items() if isinstance(v, int | float | str | bool | list)}
