"""The records of ``metrics.jsonl``, defined once: their kinds, fields and schema version.

Usage::

    from cllora.report.records import GLOBAL, Kind, RoundRecord, of_kind
    log.write(RoundRecord(round=1, clients=["a"], succeeded=1, ...))   # MetricsLog
    evals = of_kind(read_metrics(path), Kind.GLOBAL_EVAL)              # dicts of one kind
    [r for r in evals if r["client"] == GLOBAL]                         # the global test set

Every writer builds one of the dataclasses below and every reader (sweep, report, plots, HTML,
CLI) selects records by :class:`Kind` and reads the fields named here. The first record of a
``metrics.jsonl`` is ``{"kind": "schema", "version": SCHEMA_VERSION}``; a reader that meets a
newer version refuses it (:func:`check_schema`). A file without that record predates it
(version 0: the same kinds and fields). ``GLOBAL`` is the name of the global test set (and of
the global model's evaluation on it) wherever a client name can stand.

Kinds: ``schema``; ``partition`` (one: the partition's heterogeneity summary and data counts);
``client_stats`` (one per client: samples, tokens, quality, length mix); ``client_train`` (per
client per round it trained: every local step's loss); ``client_failed`` (a client left out of a
round, with the error); ``global_eval`` (per round, one per client test set plus ``GLOBAL``);
``local_eval`` (per round per trained client: ``test="own"`` and ``test=GLOBAL``); ``round``
(per round: clients, weights, bytes up and down, seconds, the algorithm's info);
``test_samples`` (one, before round 0: every test set's sample ids, lengths and target counts);
``generation`` (with ``eval.generate_samples`` = N > 0, at round 0 and at the last round: the
global model's greedy answers to the first N samples of the ``GLOBAL`` set, their ids, per-sample
``rouge_l`` and ``f1`` in [0, 1], higher = better, and their means; the answers and references
as text, for inspection; :mod:`cllora.generation`). Readers that predate a kind ignore it.

Per-sample losses (version 2): every ``global_eval`` / ``local_eval`` record carries
``loss_sums``, the summed loss of each sample of its test set in the order the ``test_samples``
record lists them, so effects can be computed on identical samples
(:mod:`cllora.report.sample_losses` turns them into ``sample_losses.csv``). Version 1 files have
neither; readers treat missing ``loss_sums`` as "not recorded".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

SCHEMA_VERSION = 2
GLOBAL = "__global__"
OWN = "own"


class Kind(StrEnum):
    SCHEMA = "schema"
    PARTITION = "partition"
    CLIENT_STATS = "client_stats"
    CLIENT_TRAIN = "client_train"
    CLIENT_FAILED = "client_failed"
    GLOBAL_EVAL = "global_eval"
    LOCAL_EVAL = "local_eval"
    ROUND = "round"
    TEST_SAMPLES = "test_samples"
    GENERATION = "generation"


@dataclass
class Record:
    """Base of every record: ``as_dict()`` is the JSON object written (``kind`` first)."""

    kind: Kind = field(init=False)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": str(self.kind)}
        for f in dataclasses.fields(self):
            if f.name != "kind":
                value = getattr(self, f.name)
                if f.name == "extra":
                    out.update(value)
                else:
                    out[f.name] = value
        return out


@dataclass
class SchemaRecord(Record):
    version: int = SCHEMA_VERSION
    kind: Kind = field(init=False, default=Kind.SCHEMA)


@dataclass
class ClientTrain(Record):
    round: int
    client: str
    rank: int
    losses: list[float]
    samples: int
    tokens_seen: int
    seconds: float
    kind: Kind = field(init=False, default=Kind.CLIENT_TRAIN)


@dataclass
class ClientFailed(Record):
    round: int
    client: str
    error: str
    kind: Kind = field(init=False, default=Kind.CLIENT_FAILED)


@dataclass
class GlobalEval(Record):
    """The global model on one test set (``client``: its owner, or ``GLOBAL``)."""

    round: int
    client: str
    loss: float
    ppl: float
    tokens: int
    buckets: dict[str, dict[str, float]]
    loss_sums: list[float] = field(default_factory=list)  # per sample of the set (test_samples)
    kind: Kind = field(init=False, default=Kind.GLOBAL_EVAL)


@dataclass
class LocalEval(Record):
    """Client ``client``'s local model on its own test set (``test=OWN``) or on ``GLOBAL``."""

    round: int
    client: str
    test: str
    loss: float
    ppl: float
    tokens: int
    buckets: dict[str, dict[str, float]]
    loss_sums: list[float] = field(default_factory=list)  # per sample of the set (test_samples)
    kind: Kind = field(init=False, default=Kind.LOCAL_EVAL)


@dataclass
class RoundRecord(Record):
    round: int
    clients: list[str]
    succeeded: int
    weights: list[float]
    bytes_down: int
    bytes_up: int
    seconds: float
    global_loss: float
    extra: dict[str, Any] = field(default_factory=dict)  # the algorithm's info, flattened in
    kind: Kind = field(init=False, default=Kind.ROUND)


@dataclass
class TestSet:
    """One test set's samples: stable ids (``file:line``), lengths (the bucketing measure) and
    target-token counts, in evaluation order."""

    samples: list[str]
    lengths: list[int]
    tokens: list[int]


@dataclass
class TestSamples(Record):
    """The samples of every test set (a client's name, or ``GLOBAL``) -> :class:`TestSet`."""

    sets: dict[str, dict[str, list]]
    kind: Kind = field(init=False, default=Kind.TEST_SAMPLES)


@dataclass
class Generation(Record):
    """Greedy answers of ``model`` (``"global"``) to the first samples of test set ``test``
    (``GLOBAL``), in its ``test_samples`` order, scored against their references."""

    round: int
    model: str
    test: str
    samples: list[str]  # the sample ids, a prefix of the set's ids in ``test_samples``
    rouge_l: list[float]  # ROUGE-L F-measure per sample
    f1: list[float]  # SQuAD token F1 per sample
    rouge_l_mean: float
    f1_mean: float
    max_new_tokens: int
    new_tokens: list[int]  # tokens generated per sample (end-of-sequence left out)
    answers: list[str]
    references: list[str]
    seconds: float
    kind: Kind = field(init=False, default=Kind.GENERATION)


@dataclass
class FreeRecord(Record):
    """A record whose fields are open (``partition``, ``client_stats``: measured tables)."""

    of: Kind
    extra: dict[str, Any] = field(default_factory=dict)
    kind: Kind = field(init=False, default=Kind.PARTITION)

    def as_dict(self) -> dict[str, Any]:
        return {"kind": str(self.of), **self.extra}


def of_kind(records: Iterable[dict[str, Any]], kind: Kind) -> list[dict[str, Any]]:
    """The records of one kind, in file order."""
    return [r for r in records if r.get("kind") == kind]


def check_schema(records: list[dict[str, Any]], where: str) -> int:
    """The schema version of a file's records (0: no schema record); a newer one than this
    cllora reads is a ValueError naming ``where``."""
    schema = of_kind(records[:1], Kind.SCHEMA)
    version = int(schema[0]["version"]) if schema else 0
    if version > SCHEMA_VERSION:
        raise ValueError(
            f"{where}: metrics schema version {version} is newer than this cllora reads "
            f"({SCHEMA_VERSION}); upgrade cllora"
        )
    return version


_CLASSES: dict[str, type[Record]] = {
    Kind.SCHEMA: SchemaRecord,
    Kind.CLIENT_TRAIN: ClientTrain,
    Kind.CLIENT_FAILED: ClientFailed,
    Kind.GLOBAL_EVAL: GlobalEval,
    Kind.LOCAL_EVAL: LocalEval,
    Kind.ROUND: RoundRecord,
    Kind.TEST_SAMPLES: TestSamples,
    Kind.GENERATION: Generation,
}


def record_from_dict(d: dict[str, Any]) -> Record:
    """The record a dict of :meth:`Record.as_dict` came from (e.g. sent between processes)."""
    kind = d["kind"]
    cls = _CLASSES.get(kind)
    if cls is None:
        return FreeRecord(of=Kind(kind), extra={k: v for k, v in d.items() if k != "kind"})
    names = {f.name for f in dataclasses.fields(cls) if f.init and f.name != "extra"}
    fields_ = {k: v for k, v in d.items() if k in names}
    if "extra" in {f.name for f in dataclasses.fields(cls)}:
        fields_["extra"] = {k: v for k, v in d.items() if k not in names and k != "kind"}
    return cls(**fields_)
