"""Common random numbers for studies: one training pool per seed, only its allocation varies.

Usage::

    from cllora.data.pool import allocate, draw_pool, fitting
    fits, excluded = fitting(samples, window=512)       # no sample is ever truncated
    rest, held = hold_out_global_test(fits, 0.05, seed=0, cap=64)   # cllora.data.pipeline
    pool = draw_pool(rest, size=96, seed=0)             # the same 96 samples for every arm
    edges = bucket_edges([s.num_tokens for s in pool])  # the pool's quartiles, equally filled
    alloc = allocate(pool, cfg.partition, seed=0, edges=edges)
    alloc.groups["client-00"], alloc.asked              # samples; the bucket mix asked per client

With ``partition.pool`` > 0 the data pipeline (:func:`cllora.data.pipeline.build_clients`) works
this way, so that two runs of one seed differ **only** in which client holds which pool sample
(the partition settings) or in what is done to it (quality), never in which samples are trained:

- samples longer than ``data.max_length`` are left out before anything is drawn (counted in the
  stats as ``excluded_overlong``), so the length axis is whole, not cut by a window;
- the held-out set is drawn first (seed only), then the pool, ``partition.pool`` samples drawn
  with the seed only from the rest;
- length buckets are the pool's (``partition.length_buckets``, default its quartiles);
- every pool sample is dealt to exactly one client; a client's samples are kept in the order of
  their ids, so its batch order follows from the seed and its samples alone;
- clients have no own test sets: every model is scored on the held-out set, and what a client's
  "own" data is comes from its training mix (``clients.csv``: ``hist``).

Allocations (``partition.method``), each drawn with ``(seed, partition.draw)``:

- ``iid``: stratified: each length bucket shuffled and dealt round-robin, so every client holds
  the pool's mix (up to one sample per bucket) and sizes differ by at most one;
- ``dirichlet``: client mixes ``Dir(alpha_len * B * p)`` over the buckets and/or sizes
  ``Dir(alpha_qty)``, dealt as :func:`cllora.data.partition.deal_dirichlet` does;
- ``pathological``: client k holds bucket ``k % B`` and nothing else (clients sharing a bucket
  split it evenly); the strongest length skew there is;
- ``field``: the natural owners: the values of ``partition.field`` (MedQuAD: its sources) grouped
  into ``num_clients`` clients, largest value first to the client with the fewest samples.

What is asked is recorded next to what is delivered: :attr:`Allocation.asked` holds the bucket
mix each client was meant to have (None for ``field``: nothing is asked), and
:func:`skew_report` compares the two as total-variation distances from the pool's mix. A
Dirichlet dealer that hands out every sample cannot always deliver its mixes (a client's
preferred bucket runs out), so the realized skew is what the analysis must read.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cllora.config import PartitionConfig
from cllora.data.formatting import Sample
from cllora.data.partition import (
    bucket_index,
    client_names,
    deal_dirichlet,
    group_by_field,
    sample_length,
)
from cllora.data.readers import DataError

log = logging.getLogger("cllora")
SKEW_TOLERANCE = 0.1  # |delivered - asked| total variation above which a run warns


@dataclass
class Allocation:
    """Which client holds which pool sample, and the bucket mix each client was asked to have."""

    groups: dict[str, list[Sample]]
    asked: dict[str, np.ndarray] | None  # None: the allocation asks for no mix (field)


def fitting(samples: Sequence[Sample], window: int) -> tuple[list[Sample], int]:
    """The samples whose true length fits ``window`` tokens, and how many did not."""
    kept = [s for s in samples if s.true_length <= window]
    return kept, len(samples) - len(kept)


def draw_pool(samples: Sequence[Sample], size: int, seed: int) -> list[Sample]:
    """``size`` samples drawn with ``seed`` alone (in input order): the seed's training pool."""
    if size > len(samples):
        raise DataError(
            f"partition.pool={size} is larger than the {len(samples)} samples that fit the "
            "window and are not held out; lower partition.pool, raise data.max_length or "
            "data.max_records"
        )
    picked = set(random.Random(f"pool-{seed}").sample(range(len(samples)), size))
    return [s for i, s in enumerate(samples) if i in picked]


def _allocation_seed(seed: int, draw: int) -> int:
    return (seed * 1_000_003 + draw * 7_919 + 17) % (2**32)


def _mix(buckets: Sequence[int], n_buckets: int) -> np.ndarray:
    counts = np.bincount(np.asarray(buckets, dtype=int), minlength=n_buckets).astype(float)
    return counts / max(1.0, counts.sum())


def _by_bucket(
    pool: Sequence[Sample], cfg: PartitionConfig, edges: Sequence[int]
) -> dict[int, list[Sample]]:
    """The pool's samples per length bucket, every bucket present, in bucket order."""
    out: dict[int, list[Sample]] = {b: [] for b in range(len(edges) + 1)}
    for s in pool:
        out[bucket_index(sample_length(s, cfg.length_measure), edges)].append(s)
    return out


def _pathological(
    pool: Sequence[Sample], cfg: PartitionConfig, edges: Sequence[int], rng: random.Random
) -> tuple[dict[str, list[Sample]], dict[str, np.ndarray]]:
    n_buckets = len(edges) + 1
    names = client_names(cfg.num_clients)
    holders: dict[int, list[str]] = {}
    for k, name in enumerate(names):
        holders.setdefault(k % n_buckets, []).append(name)
    if len(holders) < n_buckets:
        raise DataError(
            f"partition.method=pathological with {cfg.num_clients} clients leaves length "
            f"bucket(s) {sorted(set(range(n_buckets)) - set(holders))} to nobody; use at least "
            f"{n_buckets} clients (one per bucket) or fewer partition.length_buckets"
        )
    groups: dict[str, list[Sample]] = {name: [] for name in names}
    for b, samples in _by_bucket(pool, cfg, edges).items():
        order = list(samples)
        rng.shuffle(order)
        for j, s in enumerate(order):
            groups[holders[b][j % len(holders[b])]].append(s)
    asked = {name: np.eye(n_buckets)[k % n_buckets] for k, name in enumerate(names)}
    return groups, asked


def _stratified(
    pool: Sequence[Sample], cfg: PartitionConfig, edges: Sequence[int], rng: random.Random
) -> dict[str, list[Sample]]:
    """IID with the pool's bucket mix in every client: each bucket shuffled and dealt on
    round-robin, continuing where the last bucket stopped (sizes differ by at most one)."""
    names = client_names(cfg.num_clients)
    groups: dict[str, list[Sample]] = {name: [] for name in names}
    j = rng.randrange(len(names))
    for samples in _by_bucket(pool, cfg, edges).values():  # an empty bucket draws nothing
        order = list(samples)
        rng.shuffle(order)
        for s in order:
            groups[names[j % len(names)]].append(s)
            j += 1
    return groups


def _natural(pool: Sequence[Sample], cfg: PartitionConfig) -> dict[str, list[Sample]]:
    by_value = group_by_field(pool, cfg.field)
    if len(by_value) < cfg.num_clients:
        raise DataError(
            f"partition.field={cfg.field!r} has {len(by_value)} value(s) in the pool, fewer than "
            f"partition.num_clients={cfg.num_clients}; lower num_clients"
        )
    names = client_names(cfg.num_clients)
    groups: dict[str, list[Sample]] = {name: [] for name in names}
    for _, samples in sorted(by_value.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        smallest = min(names, key=lambda n: (len(groups[n]), n))
        groups[smallest].extend(samples)
    return groups


def allocate(
    pool: Sequence[Sample], cfg: PartitionConfig, seed: int, edges: Sequence[int]
) -> Allocation:
    """Deal every pool sample to one client as ``cfg.method`` says (see the module docstring)."""
    if len(pool) < 2 * cfg.num_clients and cfg.method != "field":
        raise DataError(
            f"partition.pool={len(pool)} cannot give partition.num_clients={cfg.num_clients} "
            "clients 2 samples each; raise partition.pool"
        )
    n_buckets = len(edges) + 1
    p = _mix([bucket_index(sample_length(s, cfg.length_measure), edges) for s in pool], n_buckets)
    aseed = _allocation_seed(seed, cfg.draw)
    asked: dict[str, np.ndarray] | None
    if cfg.method == "iid":
        groups = _stratified(pool, cfg, edges, random.Random(aseed))
        asked = {name: p for name in groups}
    elif cfg.method == "dirichlet":
        mixes: list[np.ndarray] = []
        groups = deal_dirichlet(pool, cfg, edges, aseed, mixes_out=mixes)
        asked = dict(zip(groups, mixes, strict=True))
    elif cfg.method == "pathological":
        groups, asked = _pathological(pool, cfg, edges, random.Random(aseed))
    else:
        groups, asked = _natural(pool, cfg), None
    for name, samples in groups.items():
        if not samples:
            raise DataError(f"client {name!r} holds no pool sample; raise partition.pool")
        samples.sort(key=lambda s: str(s.meta.get("where", "")))
    return Allocation(groups, asked)


def total_variation(a: np.ndarray, b: np.ndarray) -> float:
    return float(0.5 * np.abs(np.asarray(a) - np.asarray(b)).sum())


def skew_report(
    alloc: Allocation, pool: Sequence[Sample], edges: Sequence[int], measure: str = "tokens"
) -> dict[str, dict[str, float]]:
    """Per client: ``asked`` (TV of the mix it was asked to hold from the pool's mix; NaN when
    nothing was asked) and ``delivered`` (TV of the mix it holds); warns once per client whose
    delivered skew is more than :data:`SKEW_TOLERANCE` from the asked one."""
    n_buckets = len(edges) + 1

    def mix(samples: Sequence[Sample]) -> np.ndarray:
        return _mix([bucket_index(sample_length(s, measure), edges) for s in samples], n_buckets)

    p = mix(pool)
    out: dict[str, dict[str, float]] = {}
    for name, samples in alloc.groups.items():
        asked = total_variation(alloc.asked[name], p) if alloc.asked else float("nan")
        delivered = total_variation(mix(samples), p)
        out[name] = {"asked": asked, "delivered": delivered}
        if alloc.asked and abs(delivered - asked) > SKEW_TOLERANCE:
            log.warning(
                "%s: length skew asked %.2f, delivered %.2f (total variation from the pool's "
                "mix): dealing every sample could not give it the mix it was drawn (its buckets "
                "ran out); the analysis reads the delivered skew (clients.csv tv_len)",
                name, asked, delivered,
            )  # fmt: skip
    return out
