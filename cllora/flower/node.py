"""One SuperNode's side of a run: its client's data, the model, and the three message handlers.

Usage::

    from cllora.flower.node import node_for
    node = node_for(cfg_yaml, {"data-path": "/data/hospital-a.jsonl", "name": "hospital-a"})
    node.query()                          # name, sizes, quality score, clients.csv row, test ids
    node.train(down, {"round": 1, "index": 0, "steps": 8, "fail": False, "position": 0})
    node.evaluate(global_state, 1)        # the global model's global_eval record on its test set

**Where the client's data comes from** (the node's ``node_config``):

- ``data-path`` (deployment): the node's own file or directory, read with the run's data
  settings and split into this one client's train and test sets (``partition.method=iid``,
  one client; its name ``name``, default the file's stem). Nothing of it leaves the node except
  what the handlers return: adapters, sizes, losses, sample ids (``file:line``) and lengths.
- ``partition-id`` (Flower's simulation engine sets it): the run's partition built as
  ``cllora run`` builds it, and its client number ``partition-id``; local models are then also
  evaluated on every client's test set, exactly as ``cllora run`` does.

A process loads the model and the data once (:func:`node_for` keeps them per config and
node), and trains with the same :func:`cllora.fed.rounds.train_trainee` as ``cllora run``.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from cllora.config import Config, ConfigError, config_from_dict
from cllora.data.partition import Client, bucket_index, sample_length
from cllora.data.pipeline import ClientData
from cllora.data.readers import DataError
from cllora.fed.algorithms import make_algorithm
from cllora.fed.algorithms.base import Algorithm, Downlink, Trainee
from cllora.fed.evaluation import Evaluator
from cllora.fed.guards import NonFiniteModelError
from cllora.fed.prepare import client_stats, json_safe, prepare_run
from cllora.fed.rounds import TraineeOutcome, train_trainee
from cllora.fed.timing import PhaseTimer
from cllora.flower.kept import KeptStore
from cllora.model.load import ModelNotFoundError
from cllora.report.metrics import MetricsLog
from cllora.report.records import GLOBAL, GlobalEval, Kind, Record, TestSamples

log = logging.getLogger("cllora")

#: errors whose message is one line for the user (cause, file:line, fix): a node replies them
#: as such (:func:`cllora.flower.messages.error_reply`), without a traceback
USER_ERRORS = (ConfigError, DataError, ModelNotFoundError, FileNotFoundError)


class RecordSink(MetricsLog):
    """A metrics log that keeps its records in memory (for the node to send back)."""

    def __init__(self) -> None:
        super().__init__(None)
        self.records: list[Record] = []

    def write(self, record: Record | None = None, **fields: Any) -> None:
        if record is not None:
            self.records.append(record)

    def take(self) -> list[Record]:
        out, self.records = self.records, []
        return out


class _LocalEvaluator:
    """The evaluator of local models, addressed by the run's client index (the node's own
    client is at ``position`` in it)."""

    def __init__(self, evaluator: Evaluator, position: int) -> None:
        self.inner, self.position = evaluator, position

    def local(self, model: Any, client_idx: int, round_idx: int) -> list:
        return self.inner.local(model, self.position, round_idx)


@dataclass
class Node:
    """One client's process: what :func:`cllora.fed.rounds.train_trainee` reads, and more."""

    cfg: Config
    model: Any
    tokenizer: Any
    client: Client
    edges: list[int]
    own: Evaluator  # the node's own test set: the global model's evaluation
    evaluator: _LocalEvaluator  # local models
    algorithm: Algorithm
    partition: int  # the client's number in a simulation, -1 in a deployment
    sink: RecordSink
    data_stats: dict[str, Any] = field(default_factory=dict)  # what the data pipeline counted
    timer: PhaseTimer = field(default_factory=PhaseTimer)

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    def query(self) -> dict[str, Any]:
        """The client's name, sizes and quality score, its ``clients.csv`` row and the ids of
        its test samples (for the server's ``clients.csv``, weights and ``test_samples``)."""
        data = ClientData([self.client], self.edges)
        with tempfile.TemporaryDirectory() as tmp:
            stats = client_stats(self.model, self.tokenizer, data, self.cfg, self.sink, Path(tmp))
        rows = [r.extra for r in self.sink.take() if getattr(r, "of", None) == Kind.CLIENT_STATS]
        self.own.write_test_samples()
        (test,) = [r for r in self.sink.take() if isinstance(r, TestSamples)]
        measure = self.cfg.partition.length_measure
        counts = [0] * (len(self.edges) + 1)  # training samples per length bucket (tv_len)
        for sample in self.client.train:
            counts[bucket_index(sample_length(sample, measure), self.edges)] += 1
        return {
            "name": self.client.name,
            "partition": self.partition,
            "stats": stats[self.client.name],
            "row": rows[0],
            "test_set": test.sets[self.client.name],
            "length_counts": counts,
            "data_stats": json_safe(self.data_stats),
        }

    def train(
        self, down: Downlink, conf: dict[str, Any], store: KeptStore | None = None
    ) -> TraineeOutcome:
        """One local training from ``down`` (settings ``conf`` from the server); with a
        ``store`` (the node's state), from what the client kept after round
        ``conf["kept_round"]``, and what it keeps now saved there."""
        r, index = int(conf["round"]), int(conf["index"])
        self.algorithm.state.pop("clients", None)  # only what the store holds for this round
        if store is not None:
            kept = store.load(int(conf.get("kept_round", 0)), self.client.name,
                              self.cfg.fed.strategy)  # fmt: skip
            if kept:
                self.algorithm.keep(index, kept)
        trainee = Trainee(index, self.client.name, int(conf["steps"]))
        out = train_trainee(self, r, trainee, self.client.train, down, bool(conf.get("fail")))
        if store is not None and out.uplink is not None and out.uplink.kept:
            store.save(r, out.uplink.kept)
        self.sink.take()
        return out

    def evaluate(self, state: dict[str, torch.Tensor], r: int) -> dict[str, Any]:
        """The global model's ``global_eval`` fields on this client's test set (or, for a
        non-finite loss, ``{"nonfinite": reason}``)."""
        self.algorithm.apply_global(self.model, state)
        try:
            self.own.global_round(self.model, r)
        except NonFiniteModelError as err:
            self.sink.take()
            return {"nonfinite": str(err)}
        mine = [x for x in self.sink.take() if isinstance(x, GlobalEval) and x.client != GLOBAL]
        return mine[0].as_dict()


_BASES: dict[str, tuple[Any, Any, ClientData, str | None]] = {}  # model, tokenizer, data, name
_NODES: dict[str, Node] = {}


def node_for(config_yaml: str, node_config: dict[str, Any]) -> Node:
    """The process's node for this config and node: the model and the data are built once per
    process and config (a simulation's virtual nodes in one process share them, as the clients
    of ``cllora run`` share one model)."""
    cfg = config_from_dict(yaml.safe_load(config_yaml))
    mine, name = node_config_of(cfg, node_config)
    base_key = _digest(config_yaml, str(node_config.get("data-path", "")), str(name))
    if base_key not in _BASES:
        _BASES.clear()  # one run at a time per process: free the previous model
        _NODES.clear()
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        _BASES[base_key] = (*prepare_run(mine), name)
    key = _digest(base_key, str(node_config.get("partition-id", -1)))
    if key not in _NODES:
        _NODES[key] = _build(cfg, node_config, *_BASES[base_key])
    return _NODES[key]


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def node_name(node_config: dict[str, Any], node_id: int) -> str:
    """The node as the user knows it, before its data loads: its client's name in a deployment,
    its partition in a simulation, else Flower's node id."""
    if "data-path" in node_config:
        return str(node_config.get("name") or Path(str(node_config["data-path"])).stem)
    if "partition-id" in node_config:
        return f"partition-id {node_config['partition-id']}"
    return f"node id {node_id}"


def node_config_of(cfg: Config, node_config: dict[str, Any]) -> tuple[Config, str | None]:
    """The config this node builds its data with, and its client's name (None: the
    partition's own names)."""
    if "data-path" in node_config:
        path = Path(str(node_config["data-path"]))
        if not path.exists():
            raise ConfigError(
                f"data-path {path} not found on this SuperNode: restart it with --node-config "
                f"\"data-path='/path/to/its/data' name='{node_config.get('name') or path.stem}'\""
            )
        mine = copy.deepcopy(cfg)
        mine.data.path = str(path)
        mine.partition.method, mine.partition.num_clients = "iid", 1
        mine.fed.min_clients = 1
        return mine, str(node_config.get("name") or path.stem)
    if "partition-id" in node_config:
        return cfg, None
    raise ConfigError(
        "this SuperNode has no data: start it with --node-config \"data-path='/path/to/data' "
        "name='site-a'\""
    )


def _build(
    cfg: Config, node_config: dict[str, Any], model: Any, tokenizer: Any, data: ClientData,
    name: str | None,
) -> Node:  # fmt: skip
    sink = RecordSink()
    pad = tokenizer.pad_token_id
    if name is not None:  # deployment: the node's one client
        client, position, partition = data.clients[0], 0, -1
        client.name = name
        local = Evaluator([client], data.edges, pad, cfg, sink)
    else:  # simulation: client partition-id of the run's partition
        partition = int(node_config["partition-id"])
        if not 0 <= partition < len(data.clients):
            raise ConfigError(
                f"partition-id {partition} is out of range: the run has {len(data.clients)} "
                "clients (start as many virtual SuperNodes as clients)"
            )
        client, position = data.clients[partition], partition
        local = Evaluator(data.clients, data.edges, pad, cfg, sink, None, data.global_test)
    own = Evaluator([client], data.edges, pad, cfg, sink)
    log.info("node: client %s, %d train / %d test samples", client.name, len(client.train),
             len(client.test))  # fmt: skip
    return Node(
        cfg=cfg, model=model, tokenizer=tokenizer, client=client, edges=list(data.edges),
        own=own, evaluator=_LocalEvaluator(local, position), algorithm=make_algorithm(cfg),
        partition=partition, sink=sink, data_stats=dict(data.stats),
    )  # fmt: skip
