"""Split samples into federated clients, each with its own train and test set.

Usage::

    from cllora.data.partition import make_clients
    clients = make_clients(samples, cfg.partition, seed=0)
    for c in clients:
        print(c.name, len(c.train), len(c.test))

Methods (``partition.method``):

- ``field``: one client per distinct value of ``partition.field`` in the records (natural data
  owners, e.g. MedQuAD's ``source``); ``partition.num_clients`` is not used. Clients are sorted
  by name.
- ``iid``: samples shuffled (seeded) and dealt round-robin to ``partition.num_clients`` clients.

Each client's samples are then split (seeded) into test (``test_fraction``, at least one) and
train, and capped by ``max_train_per_client`` / ``max_test_per_client``. A client left with no
train or no test sample is an error naming the client, never a silently empty client. The
heterogeneity partitioners (Dirichlet over length and quantity) are the measurement issue's.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from cllora.config import PartitionConfig
from cllora.data.formatting import Sample
from cllora.data.readers import DataError


@dataclass
class Client:
    """A data owner: its name and its private train and test samples."""

    name: str
    train: list[Sample] = field(default_factory=list)
    test: list[Sample] = field(default_factory=list)

    @property
    def train_tokens(self) -> int:
        return sum(s.num_tokens for s in self.train)


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
    width = max(2, len(str(num_clients - 1)))
    groups: dict[str, list[Sample]] = {f"client-{i:0{width}d}": [] for i in range(num_clients)}
    names = list(groups)
    for j, i in enumerate(order):
        groups[names[j % num_clients]].append(samples[i])
    return groups


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


def make_clients(samples: Sequence[Sample], cfg: PartitionConfig, seed: int) -> list[Client]:
    """Partition samples into clients as ``cfg`` says (deterministic for a given seed)."""
    rng = random.Random(seed)
    if cfg.method == "field":
        groups = group_by_field(samples, cfg.field)
    else:
        groups = deal_iid(samples, cfg.num_clients, rng)
    return [split_client(name, group, cfg, rng) for name, group in groups.items()]
