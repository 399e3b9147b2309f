"""Split samples into federated clients, each with its own train and test set.

Usage::

    from cllora.data.partition import bucket_edges, bucket_labels, make_clients, sample_length
    edges = bucket_edges([s.num_tokens for s in samples], cfg.partition.length_buckets)
    clients = make_clients(samples, cfg.partition, seed=0, edges=edges)
    for c in clients:
        print(c.name, len(c.train), len(c.test))
    # partition.length_measure=sentences: buckets of the responses' sentence counts
    counts = [sample_length(s, "sentences") for s in samples]   # meta["sentences"]
    edges = bucket_edges(counts, cfg.partition.length_buckets, "sentences")
    bucket_labels(edges, "sentences")     # ["<3sent", "3-5sent", ">=6sent"]
    sorted(labels, key=bucket_sort_key)   # buckets by value: "<128" first, ">=512" last

Methods (``partition.method``):

- ``field``: one client per distinct value of ``partition.field`` in the records (natural data
  owners, e.g. MedQuAD's ``source``); ``partition.num_clients`` is not used. Clients are sorted
  by name.
- ``iid``: samples shuffled (seeded) and dealt round-robin to ``partition.num_clients`` clients.
- ``dirichlet``: ``num_clients`` clients with heterogeneous length and/or quantity:

  * **length** (``alpha_len``): samples fall into length buckets (:func:`bucket_edges`) of
    their measure (``partition.length_measure``, :func:`sample_length`): their tokens, or the
    sentences of their response. Client k's bucket mix is drawn as
    ``pi_k ~ Dir(alpha_len * B * p)`` where ``p`` is the global bucket mix and ``B`` the number
    of buckets, so the mean mix is the global one; a small alpha gives clients that see mostly
    one length range, a large alpha near-IID clients. Without ``alpha_len`` every client's mix
    is ``p``.
  * **quantity** (``alpha_qty``): client shares ``q ~ Dir(alpha_qty * 1)``; client k holds
    ``2 + floor(q_k * (N - 2K))`` samples (remainders to the largest fractions), so every client
    has at least one train and one test sample. Without ``alpha_qty`` shares are equal.
  * both together combine (each client its own size and length mix). Samples are dealt one at a
    time, clients interleaved in a seeded order, each draw taking a bucket from the client's mix
    renormalised over the buckets that still have samples; every sample is dealt.

Each client's samples are then split (seeded) into test (``test_fraction``, at least one) and
train, and capped by ``max_train_per_client`` / ``max_test_per_client``. A client left with no
train or no test sample is an error naming the client, never a silently empty client; so is an
explicit length bucket that holds no sample. :func:`apply_window` applies a context window
(truncate or drop) and counts what it did.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from cllora.config import PartitionConfig
from cllora.data.formatting import IGNORE_INDEX, Sample
from cllora.data.readers import DataError


@dataclass
class Client:
    """A data owner: its name, its private train and test samples, and what was done to them."""

    name: str
    train: list[Sample] = field(default_factory=list)
    test: list[Sample] = field(default_factory=list)
    window: int = 0  # context window of its training samples (tokens)
    truncated: int = 0  # training samples cut to the window
    dropped: int = 0  # training samples dropped as longer than the window
    corruption_rate: float = 0.0  # the rate asked for
    corrupted: dict[str, int] = field(default_factory=dict)  # operator -> samples
    discarded: int = 0  # corrupted training samples dropped (quality.drop)
    tv_asked: float | None = None  # length skew asked for (pool mode; None: nothing asked)

    @property
    def train_tokens(self) -> int:
        return sum(s.num_tokens for s in self.train)


# ---------------------------------------------------------------- length buckets


MEASURES = ("tokens", "sentences")  # partition.length_measure
_UNITS = {"tokens": "", "sentences": "sent"}  # suffix of the bucket labels


def bucket_edges(
    lengths: Sequence[int], edges: Sequence[int] = (), measure: str = "tokens"
) -> list[int]:
    """Bucket edges: ``edges`` when given (every bucket must hold a sample), else the quartiles.

    Edges ``[e1, e2, ...]`` make buckets ``[0, e1) [e1, e2) ... [e_last, inf)``; ``lengths``
    and the edges are in the unit of ``measure`` (tokens or sentences).
    """
    if not lengths:
        raise DataError("no samples to bucket by length")
    if edges:
        counts = np.bincount(
            np.searchsorted(edges, lengths, side="right"), minlength=len(edges) + 1
        )
        empty = [bucket_label(i, edges, measure) for i, n in enumerate(counts) if n == 0]
        if empty:
            raise DataError(
                f"partition.length_buckets={list(edges)}: bucket(s) {', '.join(empty)} hold no "
                f"sample (lengths range {min(lengths)}..{max(lengths)} {measure}); choose edges "
                "inside that range"
            )
        return list(edges)
    quartiles = np.quantile(np.asarray(lengths), [0.25, 0.5, 0.75])
    return sorted({int(q) + 1 for q in quartiles if min(lengths) < int(q) + 1 <= max(lengths)})


def sample_length(sample: Sample, measure: str = "tokens") -> int:
    """A sample's measure for bucketing, taken before corruption and windows: its token length
    (``meta["length"]``, else its tokens), or the sentences of its response
    (``meta["sentences"]``, stored by :func:`~cllora.data.formatting.build_samples`; see
    :mod:`cllora.data.sentences`)."""
    if measure == "tokens":
        return int(sample.meta.get("length", sample.num_tokens))
    if measure != "sentences":
        raise DataError(f"unknown length measure {measure!r}; allowed: {', '.join(MEASURES)}")
    if "sentences" not in sample.meta:
        raise DataError(
            f"{sample.meta.get('where', '<sample>')}: no sentence count (meta['sentences']); "
            "samples made by build_samples have one"
        )
    return int(sample.meta["sentences"])


def bucket_index(length: int, edges: Sequence[int]) -> int:
    """Index of the bucket ``length`` falls in."""
    return int(np.searchsorted(edges, length, side="right"))


def bucket_label(i: int, edges: Sequence[int], measure: str = "tokens") -> str:
    """Readable bucket name: tokens ``<128``, ``128-255``, ``>=512``; sentences ``<3sent``,
    ``3-5sent``, ``>=6sent``; ``all`` without edges."""
    if not edges:
        return "all"
    unit = _UNITS[measure]
    if i == 0:
        return f"<{edges[0]}{unit}"
    if i == len(edges):
        return f">={edges[-1]}{unit}"
    return f"{edges[i - 1]}-{edges[i] - 1}{unit}"


def bucket_labels(edges: Sequence[int], measure: str = "tokens") -> list[str]:
    return [bucket_label(i, edges, measure) for i in range(len(edges) + 1)]


def bucket_sort_key(label: str) -> tuple[int, float]:
    """Where a bucket label (:func:`bucket_label`) sits among its buckets, by value: ``all``
    first, then ``<x`` (the lowest), then ``a-b`` by its lower edge ``a``, ``>=x`` last; other
    text after them. ``sorted(labels, key=bucket_sort_key)`` orders legends, columns and bars."""
    text = label.strip().removesuffix(_UNITS["sentences"])
    for prefix, rank in ((">=", 3), ("<", 1)):
        if text.startswith(prefix) and text[len(prefix) :].isdigit():
            return rank, float(text[len(prefix) :])
    low, dash, _ = text.partition("-")
    if dash and low.isdigit():
        return 2, float(low)
    return (0, 0.0) if text == "all" else (4, 0.0)


# ---------------------------------------------------------------- partitioners


def group_by_field(samples: Sequence[Sample], key: str) -> dict[str, list[Sample]]:
    """Samples grouped by ``meta[key]`` (sorted by value); a sample without it is an error."""
    groups: dict[str, list[Sample]] = {}
    for s in samples:
        if key not in s.meta:
            where = s.meta.get("where", "?")
            fields = ", ".join(sorted(k for k in s.meta if k != "where")) or "none"
            raise DataError(
                f"{where}: partition.field={key!r} is missing from the record "
                f"(its fields: {fields}); choose another field or partition.method=iid"
            )
        groups.setdefault(str(s.meta[key]), []).append(s)
    return dict(sorted(groups.items()))


def client_names(num_clients: int) -> list[str]:
    """The names of ``num_clients`` clients: ``client-00``, ``client-01``, ... (zero-padded)."""
    width = max(2, len(str(num_clients - 1)))
    return [f"client-{i:0{width}d}" for i in range(num_clients)]


def deal_iid(
    samples: Sequence[Sample], num_clients: int, rng: random.Random
) -> dict[str, list[Sample]]:
    """Shuffle and deal round-robin to ``num_clients`` clients named client-00, client-01, ..."""
    if len(samples) < num_clients:
        raise DataError(
            f"{len(samples)} samples cannot fill partition.num_clients={num_clients} clients"
        )
    order = list(range(len(samples)))
    rng.shuffle(order)
    groups: dict[str, list[Sample]] = {name: [] for name in client_names(num_clients)}
    names = list(groups)
    for j, i in enumerate(order):
        groups[names[j % num_clients]].append(samples[i])
    return groups


def _dirichlet(rng: np.random.Generator, concentration: np.ndarray) -> np.ndarray:
    """One Dirichlet draw; a degenerate draw (tiny alphas underflow to 0) becomes one-hot."""
    p = rng.dirichlet(concentration)
    if not np.all(np.isfinite(p)) or p.sum() <= 0:
        p = np.zeros_like(concentration)
        p[rng.choice(len(concentration), p=concentration / concentration.sum())] = 1.0
    return p


def client_sizes(n: int, k: int, alpha_qty: float | None, rng: np.random.Generator) -> list[int]:
    """Samples per client: equal, or ``2 + floor(q_k (n - 2k))`` with ``q ~ Dir(alpha_qty)``."""
    if n < 2 * k:
        raise DataError(
            f"{n} samples cannot give each of partition.num_clients={k} clients the 2 samples "
            "it needs (one to train, one to test); use fewer clients or more data"
        )
    if alpha_qty is None:
        return [n // k + (i < n % k) for i in range(k)]
    q = _dirichlet(rng, np.full(k, alpha_qty))
    extra = q * (n - 2 * k)
    sizes = np.floor(extra).astype(int)
    for i in np.argsort(-(extra - sizes))[: n - 2 * k - int(sizes.sum())]:
        sizes[i] += 1
    return [int(2 + s) for s in sizes]


def deal_dirichlet(
    samples: Sequence[Sample],
    cfg: PartitionConfig,
    edges: Sequence[int],
    seed: int,
    mixes_out: list[np.ndarray] | None = None,
) -> dict[str, list[Sample]]:
    """Length- and/or quantity-skewed clients (see the module docstring); ``mixes_out``, when
    given, receives the bucket mix drawn for each client (what was asked, before dealing)."""
    rng = np.random.default_rng(seed)
    k = cfg.num_clients
    buckets = [bucket_index(sample_length(s, cfg.length_measure), edges) for s in samples]
    n_buckets = len(edges) + 1
    pools: list[list[int]] = [[] for _ in range(n_buckets)]
    for i in rng.permutation(len(samples)):
        pools[buckets[i]].append(int(i))
    prior = np.array([len(p) for p in pools], dtype=float) / len(samples)
    sizes = client_sizes(len(samples), k, cfg.alpha_qty, rng)
    if cfg.alpha_len is None:
        mixes = [prior.copy() for _ in range(k)]
    else:
        conc = np.maximum(cfg.alpha_len * n_buckets * prior, 1e-12)
        mixes = [_dirichlet(rng, conc) for _ in range(k)]
    if mixes_out is not None:
        mixes_out.extend(mixes)
    remaining = list(sizes)
    groups: list[list[Sample]] = [[] for _ in range(k)]
    order = [int(c) for c in rng.permutation(k)]
    while any(remaining):
        for c in order:
            if not remaining[c]:
                continue
            available = np.array([len(p) > 0 for p in pools], dtype=float)
            weights = mixes[c] * available
            weights = weights if weights.sum() > 0 else available
            b = int(rng.choice(n_buckets, p=weights / weights.sum()))
            groups[c].append(samples[pools[b].pop()])
            remaining[c] -= 1
    return dict(zip(client_names(k), groups, strict=True))


# ---------------------------------------------------------------- splits and windows


def split_client(
    name: str, samples: list[Sample], cfg: PartitionConfig, rng: random.Random
) -> Client:
    """Seeded train/test split of one client's samples, with the configured caps."""
    if len(samples) < 2:
        raise DataError(
            f"client {name!r} has {len(samples)} sample(s); it needs at least 2 "
            "(one to train, one to test)"
        )
    order = list(range(len(samples)))
    rng.shuffle(order)
    n_test = min(len(samples) - 1, max(1, math.floor(len(samples) * cfg.test_fraction)))
    test = [samples[i] for i in order[:n_test]]
    train = [samples[i] for i in order[n_test:]]
    if cfg.max_test_per_client:
        test = test[: cfg.max_test_per_client]
    if cfg.max_train_per_client:
        train = train[: cfg.max_train_per_client]
    return Client(name=name, train=train, test=test)


def make_clients(
    samples: Sequence[Sample], cfg: PartitionConfig, seed: int, edges: Sequence[int] = ()
) -> list[Client]:
    """Partition samples into clients as ``cfg`` says (deterministic for a given seed)."""
    rng = random.Random(seed)
    if cfg.method == "field":
        groups = group_by_field(samples, cfg.field)
    elif cfg.method == "iid":
        groups = deal_iid(samples, cfg.num_clients, rng)
    else:
        groups = deal_dirichlet(samples, cfg, edges, seed)
    return [split_client(name, group, cfg, rng) for name, group in groups.items()]


def apply_window(
    samples: Sequence[Sample], max_length: int, overlong: str
) -> tuple[list[Sample], int, int]:
    """Samples cut to ``max_length`` tokens (``overlong="truncate"``) or dropped when longer
    (``"drop"``; ``"error"`` raises). A sample left without a target token is dropped.

    Returns the kept samples, the number truncated and the number dropped.
    """
    kept, truncated, dropped = [], 0, 0
    for s in samples:
        if s.num_tokens <= max_length:
            kept.append(s)
            continue
        if overlong == "error":
            raise DataError(
                f"{s.meta.get('where', '?')}: {s.num_tokens} tokens, longer than the context "
                f"window of {max_length} (data.overlong=error; use truncate or drop)"
            )
        labels = s.labels[:max_length]
        if overlong == "drop" or all(t == IGNORE_INDEX for t in labels):
            dropped += 1
            continue
        kept.append(Sample(s.input_ids[:max_length], labels, s.meta, truncated=True))
        truncated += 1
    return kept, truncated, dropped
