"""From records to ready clients: tokenize, measure, partition, corrupt, window.

Usage::

    from cllora.data.pipeline import build_clients
    data = build_clients(cfg, tokenizer)          # reads cfg.data.path
    data.clients, data.edges, data.stats          # clients, length-bucket edges, counts
    data.stats["length_measure"]                  # the unit of the edges: tokens or sentences
    data.global_test                              # held-out global test set ([] = the union)
    data.stats["malformed_skipped"], data.stats["malformed_examples"]   # data.on_malformed=skip

Order (every step seeded by ``cfg.seed``): records are read and tokenized once at full length
(samples are kept up to :data:`MEASURE_LENGTH` tokens, or one more than the largest window; the
true length of a longer record is kept too) so that partitioning sees the true lengths; malformed
records stop the load or, with ``data.on_malformed=skip``, are skipped and counted in the stats
(``malformed_skipped``, the first reasons in ``malformed_examples``) with one warning; the length
buckets are fixed (:func:`cllora.data.partition.bucket_edges`), of ``partition.length_measure``:
the token lengths, or the sentences of the responses counted when the records were formatted
(``meta["sentences"]``; both measures stay the original sample's through corruption and
windows); with
``partition.global_test_fraction`` > 0 the global test set is drawn from all samples (seeded by
``cfg.seed`` alone: the same samples whatever the partition, quality and window settings) and
left out of the partition; samples are partitioned and split into
train/test per client; each client's training samples are corrupted at its rate
(:mod:`cllora.data.quality`; test sets stay clean); then each client's context window is applied
to its training samples (``data.client_max_length[i % len]``, else ``data.max_length``) and the
common window ``data.max_length`` to every test set (the global one too), with the
``data.overlong`` policy (with ``data.overlong=error`` a record longer than its window stops the
run, naming its place and its true length, before any corruption). What the windows truncated or
dropped is counted per client (``truncated``, ``dropped``) and summed in the stats
(``train_truncated``, ``train_dropped``; ``measure_truncated`` counts the samples cut at the
measuring cap, before any window). A client left without a training or test sample is an error
before any training starts; one with a single test sample gets a warning (its own test loss is
one sample's).

With ``partition.pool`` > 0 (a study's common random numbers, :mod:`cllora.data.pool`) the order
after measuring is instead: leave out what does not fit ``data.max_length``, hold out the test
set, draw the seed's training pool, cut the buckets from the pool, allocate it, corrupt; no
window cuts anything and clients have no own test sets.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass, field
from typing import Any

from cllora.config import Config
from cllora.data.formatting import Sample, build_samples, overlong_message
from cllora.data.partition import Client, apply_window, bucket_edges, make_clients, sample_length
from cllora.data.pool import allocate, draw_pool, fitting, skew_report
from cllora.data.quality import BOILERPLATE, CorruptionContext, client_rates, corrupt
from cllora.data.readers import DataError, Malformed, load_records
from cllora.text import counts_line, fields_line

log = logging.getLogger("cllora")
MEASURE_LENGTH = 16384  # tokens kept when measuring lengths (longer samples are cut here)
FEW_TEST = 2  # a client's own test set smaller than this gets a warning (one sample's loss)


@dataclass
class ClientData:
    clients: list[Client]
    edges: list[int]
    stats: dict[str, Any] = field(default_factory=dict)
    # held out before partitioning (partition.global_test_fraction > 0); empty: the global test
    # set is the union of the clients' test sets
    global_test: list[Sample] = field(default_factory=list)


def hold_out_global_test(
    samples: list[Sample], fraction: float, seed: int, cap: int = 0
) -> tuple[list[Sample], list[Sample]]:
    """(rest, held-out): ``fraction`` of ``samples`` (at least one; none for 0; at most ``cap``
    when > 0) drawn at random with ``seed`` only, both lists in the input order. The draw depends
    on nothing but the samples and the seed, so runs that differ in partition, quality or
    windows share it (and a smaller cap keeps a prefix of the same draw)."""
    if fraction <= 0:
        return samples, []
    n = max(1, math.floor(len(samples) * fraction))
    if n >= len(samples):
        raise DataError(
            f"partition.global_test_fraction={fraction} holds out all {len(samples)} samples; "
            "lower it or add data"
        )
    order = random.Random(f"global-test-{seed}").sample(range(len(samples)), n)
    picked = set(order[:cap] if cap else order)
    rest = [s for i, s in enumerate(samples) if i not in picked]
    return rest, [s for i, s in enumerate(samples) if i in picked]


def client_window(cfg: Config, client_idx: int) -> int:
    """Context window (tokens) of client ``client_idx``'s training samples."""
    windows = cfg.data.client_max_length
    return windows[client_idx % len(windows)] if windows else cfg.data.max_length


def measure_length(cfg: Config) -> int:
    """Tokens kept per sample when measuring: :data:`MEASURE_LENGTH`, or one more than the
    largest window, so that a record longer than its window is always seen as longer."""
    return max(MEASURE_LENGTH, 1 + max([cfg.data.max_length, *cfg.data.client_max_length]))


def run_records(cfg: Config, malformed: Malformed) -> list[dict]:
    """The records a run reads: ``data.path`` read (skips counted in ``malformed``, which the
    caller reports), then ``data.max_records`` of them drawn with the seed."""
    records = load_records(cfg.data.path, cfg.data.format, malformed=malformed)
    if cfg.data.max_records and len(records) > cfg.data.max_records:
        records = random.Random(cfg.seed).sample(records, cfg.data.max_records)
    return records


def load_samples(cfg: Config, tokenizer: Any) -> tuple[list[Sample], dict[str, Any]]:
    """Records read, subsampled (``data.max_records``) and tokenized at full length.

    The stats are :func:`~cllora.data.formatting.build_samples`'s, with ``malformed_skipped``
    counting every record skipped as malformed (by the reader, before ``data.max_records``
    subsamples, and by the formatting) and ``malformed_examples`` the first reasons
    (``"file:line: reason"``); one warning reports them.
    """
    malformed = Malformed(cfg.data.on_malformed)
    try:
        records = run_records(cfg, malformed)
        samples, stats = build_samples(
            records,
            tokenizer,
            shape=cfg.data.shape,
            fields=cfg.data.fields or None,
            max_length=measure_length(cfg),
            overlong="truncate",
            response_only=cfg.data.response_only,
            progress=cfg.progress,
            malformed=malformed,
        )
    finally:
        malformed.report()
    return samples, {**stats, **malformed.stats()}


def count_clients(cfg: Config) -> int:
    """The clients :func:`build_clients` makes, counted without tokenizing (what a Flower
    simulation needs before it starts one virtual node per client): ``partition.num_clients``,
    or under ``partition.method=field`` (not in pool mode) the distinct values of the field in
    the records as the run reads them (``data.max_records`` included). A value whose every record
    is later skipped as malformed is still counted."""
    part = cfg.partition
    if part.method != "field" or part.pool:
        return part.num_clients
    records = run_records(cfg, Malformed("skip"))
    return len({str(r[part.field]) for r in records if part.field in r})


def check_model_window(cfg: Config, max_positions: int | None) -> None:
    """Every window (``data.max_length``, ``data.client_max_length``) fits the model's
    ``max_position_embeddings`` (None: the model states no limit)."""
    if not max_positions:
        return
    windows = {"data.max_length": cfg.data.max_length}
    windows.update(
        {f"data.client_max_length[{i}]": w for i, w in enumerate(cfg.data.client_max_length)}
    )
    for knob, window in windows.items():
        if window > max_positions:
            raise DataError(
                f"{knob}={window} is longer than the model allows (max_position_embeddings="
                f"{max_positions}); set {knob} to at most {max_positions}"
            )


def _window_knob(cfg: Config, client_idx: int) -> str:
    windows = cfg.data.client_max_length
    return f"data.client_max_length[{client_idx % len(windows)}]" if windows else "data.max_length"


def _check_overlong(cfg: Config, clients: list[Client], held: list[Sample]) -> None:
    """With ``data.overlong=error``: the first sample longer than its window stops the run,
    with the record's true length (not the measuring cap) and where it is."""
    if cfg.data.overlong != "error":
        return
    limit = cfg.data.max_length
    groups = [(c.train, client_window(cfg, i), _window_knob(cfg, i)) for i, c in enumerate(clients)]
    groups += [(c.test, limit, "data.max_length") for c in clients]
    groups.append((held, limit, "data.max_length"))
    for samples, window, knob in groups:
        for s in samples:
            if s.true_length > window:
                where = s.meta.get("where", "<record>")
                raise DataError(overlong_message(where, s.true_length, window, knob))


def _corrupt_clients(cfg: Config, clients: list[Client], ctx: CorruptionContext) -> None:
    rates = client_rates(cfg.quality, len(clients), cfg.seed)
    for i, (c, rate) in enumerate(zip(clients, rates, strict=True)):
        c.corruption_rate = rate
        if rate > 0:
            if len(c.train) < 2 and "swap" in cfg.quality.operators:
                raise DataError(f"client {c.name!r}: swap needs at least 2 training samples")
            c.train, c.corrupted = corrupt(c.train, rate, cfg.quality, ctx, cfg.seed * 7 + i)
            if cfg.quality.drop:
                clean = [s for s in c.train if "corruption" not in s.meta]
                if not clean:
                    raise DataError(
                        f"client {c.name!r}: quality.drop leaves no training sample (rate "
                        f"{rate}); lower its quality.rates entry below 1"
                    )
                c.discarded = len(c.train) - len(clean)
                c.train = clean


def _warn_few_test(clients: list[Client]) -> None:
    """One warning per client whose own test set has fewer than :data:`FEW_TEST` samples: its
    own test loss (global and local models) is then one sample's."""
    for c in clients:
        if len(c.test) < FEW_TEST:
            log.warning(
                "client %s has %d test sample(s): its own test loss is one sample's, not an "
                "estimate (raise partition.test_fraction or partition.max_test_per_client)",
                c.name, len(c.test),
            )  # fmt: skip


def _window_clients(cfg: Config, clients: list[Client]) -> dict[str, int]:
    """Each client's windows applied; the counts: training samples cut / dropped at their
    client's window (``train_truncated`` / ``train_dropped``: the clients' ``truncated`` /
    ``dropped`` summed) and test samples cut / dropped at ``data.max_length``."""
    counts = {"train_truncated": 0, "train_dropped": 0, "test_truncated": 0, "test_dropped": 0}
    for i, c in enumerate(clients):
        c.window = client_window(cfg, i)
        c.train, c.truncated, c.dropped = apply_window(c.train, c.window, cfg.data.overlong)
        c.test, t_cut, t_drop = apply_window(c.test, cfg.data.max_length, cfg.data.overlong)
        counts["train_truncated"] += c.truncated
        counts["train_dropped"] += c.dropped
        counts["test_truncated"] += t_cut
        counts["test_dropped"] += t_drop
        for part, kept, lost in (("training", c.train, c.dropped), ("test", c.test, t_drop)):
            if not kept:
                window = c.window if part == "training" else cfg.data.max_length
                raise DataError(
                    f"client {c.name!r} has no {part} sample left after its context window of "
                    f"{window} tokens: {lost} dropped (data.overlong={cfg.data.overlong}; a "
                    "truncated sample is dropped when no response token is left inside the "
                    "window); raise the window"
                )
    return counts


def _measures(samples: list[Sample], measure: str) -> list[int]:
    """What the length buckets are cut from: the kept token counts, or the sentences of the
    responses (``meta["sentences"]``, counted when the sample was built)."""
    if measure == "tokens":
        return [s.num_tokens for s in samples]
    return [sample_length(s, measure) for s in samples]


def _pool_clients(cfg: Config, tokenizer: Any, samples: list[Sample], stats: dict) -> ClientData:
    """Pool mode (``partition.pool`` > 0, :mod:`cllora.data.pool`): the held-out set and the
    seed's training pool, both of samples that fit ``data.max_length``, then the allocation."""
    part = cfg.partition
    fits, excluded = fitting(samples, cfg.data.max_length)
    rest, held = hold_out_global_test(fits, part.global_test_fraction, cfg.seed,
                                      part.max_global_test)  # fmt: skip
    pool = draw_pool(rest, part.pool, cfg.seed)
    edges = bucket_edges(_measures(pool, part.length_measure), part.length_buckets,
                         part.length_measure)  # fmt: skip
    alloc = allocate(pool, part, cfg.seed, edges)
    skew = skew_report(alloc, pool, edges, part.length_measure)
    clients = [Client(name=n, train=list(g), window=cfg.data.max_length)
               for n, g in alloc.groups.items()]  # fmt: skip
    for c in clients:  # NaN: the allocation asked no mix (field)
        asked = skew[c.name]["asked"]
        c.tv_asked = None if math.isnan(asked) else asked
    boiler = tokenizer.encode(BOILERPLATE, add_special_tokens=False)
    _corrupt_clients(cfg, clients, CorruptionContext.from_samples(pool, boiler))
    stats.update(excluded_overlong=excluded, pool=len(pool), global_test=len(held),
                 length_buckets=edges, length_measure=part.length_measure,
                 allocation=part.method, draw=part.draw)  # fmt: skip
    log.info("data %s: %s", cfg.data.path, fields_line(stats))
    for c in clients:
        dropped = f", {c.discarded} dropped" if c.discarded else ""
        log.info("client %s: %d train (length skew asked %.2f, delivered %.2f), corrupted %s%s",
                 c.name, len(c.train), skew[c.name]["asked"], skew[c.name]["delivered"],
                 counts_line(c.corrupted), dropped)  # fmt: skip
    return ClientData(clients, edges, stats, held)


def build_clients(cfg: Config, tokenizer: Any) -> ClientData:
    """The clients of a run, measured, partitioned, corrupted and windowed (see module doc)."""
    samples, stats = load_samples(cfg, tokenizer)
    # the loader's "truncated": samples cut at the measuring cap, not at any window
    stats["measure_truncated"] = stats.pop("truncated")
    for s in samples:
        s.meta["length"] = s.true_length  # the measured length, kept through corruption/windows
    part = cfg.partition
    if part.pool:
        return _pool_clients(cfg, tokenizer, samples, stats)
    measures = _measures(samples, part.length_measure)
    edges = bucket_edges(measures, part.length_buckets, part.length_measure)
    pool, held = hold_out_global_test(
        samples, part.global_test_fraction, cfg.seed, part.max_global_test
    )
    clients = make_clients(pool, cfg.partition, cfg.seed, edges)
    _check_overlong(cfg, clients, held)
    boiler = tokenizer.encode(BOILERPLATE, add_special_tokens=False)
    # noise tokens come from the training pool's vocabulary: nothing of the held-out set
    _corrupt_clients(cfg, clients, CorruptionContext.from_samples(pool, boiler))
    stats.update(_window_clients(cfg, clients))
    _warn_few_test(clients)
    if held:
        held, cut, dropped = apply_window(held, cfg.data.max_length, cfg.data.overlong)
        if not held:
            raise DataError(
                f"the held-out global test set has no sample left after the window of "
                f"{cfg.data.max_length} tokens ({dropped} dropped, data.overlong="
                f"{cfg.data.overlong}); raise data.max_length"
            )
        stats.update(global_test=len(held), global_test_truncated=cut, global_test_dropped=dropped)
    stats["length_buckets"] = edges
    stats["length_measure"] = part.length_measure
    log.info("data %s: %s", cfg.data.path, fields_line(stats))
    for c in clients:
        log.info(
            "client %s: %d train (%d truncated, %d dropped at %d tokens), %d test; corrupted %s",
            c.name, len(c.train), c.truncated, c.dropped, c.window, len(c.test),
            counts_line(c.corrupted),
        )  # fmt: skip
    return ClientData(clients, edges, stats, held)
