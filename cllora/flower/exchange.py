"""Messages to the SuperNodes of a run over a Flower ``Grid``, and what they say of their clients.

Usage::

    from cllora.flower.exchange import discover, exchange
    sites, failed = discover(grid, config_yaml, nodes=3, wait=300)   # one Site per client
    replies = exchange(grid, {node_id: message, ...}, timeout=600)    # replies by node id

:func:`discover` waits for the SuperNodes and asks each (a ``query`` Message) for its client:
name, sizes, quality score, ``clients.csv`` row, test sample ids, length counts; the
federation's ``clients.csv`` rows and data counts are made from them (:func:`site_rows`,
:func:`data_stats`). A node that
cannot load its client answers an error, which :func:`node_error` turns into its name and one
line (its traceback logged when it is a bug, not the user's data). :func:`exchange` sends one
message per node and waits for the replies, not for a node that has left.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Message, MessageType
from flwr.serverapp import Grid

from cllora.config import ConfigError
from cllora.flower.client_app import CONFIG_KEY
from cllora.flower.messages import config_content, config_of, read_error

log = logging.getLogger("cllora")

POLL = 0.5  # seconds between two pulls of replies


@dataclass
class Site:
    """One client as the server knows it: its node and what the node told (no data)."""

    name: str
    node_id: int
    partition: int
    stats: dict[str, float]
    row: dict[str, Any]
    test_set: dict[str, list]
    length_counts: list[int]
    data_stats: dict[str, Any]


def discover(
    grid: Grid, config_yaml: str, nodes: int, wait: float
) -> tuple[list[Site], dict[int, tuple[str, str]]]:
    """Wait for ``nodes`` SuperNodes, ask each for its client; the sites in the run's client
    order (the partition's, in a simulation; by name, in a deployment), and the nodes that
    could not load theirs (by node id: its name and the one-line error)."""
    deadline = time.monotonic() + wait
    ids = sorted(grid.get_node_ids())
    while len(ids) < nodes:
        if time.monotonic() > deadline:
            raise ConfigError(
                f"only {len(ids)} of {nodes} SuperNodes connected within {wait:.0f} s: start "
                "the missing ones, or lower the run config's nodes"
            )
        time.sleep(1.0)
        ids = sorted(grid.get_node_ids())
    msgs = {n: Message(config_content({CONFIG_KEY: config_yaml}), dst_node_id=n,
                       message_type=MessageType.QUERY) for n in ids}  # fmt: skip
    sites, failed = [], {}
    replies = exchange(grid, msgs, wait)
    for node in ids:
        if node not in replies:
            failed[node] = (str(node), f"no answer to the query within {wait:.0f} s")
            continue
        reply = replies[node]
        if reply.has_error():
            failed[node] = node_error(node, reply)
            continue
        got = json.loads(str(config_of(reply.content)["info"]))
        sites.append(Site(got["name"], node, got["partition"],
                          got["stats"], got["row"], got["test_set"], got["length_counts"],
                          got["data_stats"]))  # fmt: skip
    sites.sort(key=lambda s: (s.partition, s.name))
    names = [s.name for s in sites]
    if len(set(names)) != len(names):
        raise ConfigError(f"two SuperNodes hold a client of the same name ({names}): rename one")
    log.info("flower: %d SuperNodes: %s", len(sites), ", ".join(names))
    return sites, failed


def node_error(node_id: int, reply: Message) -> tuple[str, str]:
    """The name (as the node gave it, else its node id) and the one-line error of an error
    reply; an unexpected exception's traceback is logged here."""
    name, line, trace = read_error(reply.error)
    if trace:
        log.error("SuperNode %s: %s\n%s", name or node_id, line, trace)
    return name or str(node_id), line


def failure_lines(failed: dict[int, tuple[str, str]]) -> list[str]:
    """One line per distinct error, naming its nodes (a simulation's virtual nodes read the same
    data, so they fail alike)."""
    by_error: dict[str, list[str]] = {}
    for name, line in failed.values():
        by_error.setdefault(line, []).append(name)
    return [f"SuperNode{'s' if len(names) > 1 else ''} {', '.join(names)}: {line}"
            for line, names in by_error.items()]  # fmt: skip


def exchange(grid: Grid, msgs: dict[int, Message], timeout: float) -> dict[int, Message]:
    """Send one message per node; the replies by node, waiting at most ``timeout`` seconds and
    not for a node that leaves the federation meanwhile (an error the SuperLink itself answers,
    e.g. a node gone, counts as that node's reply)."""
    ids = list(grid.push_messages(list(msgs.values())))
    waiting = {i: n for i, n in zip(ids, msgs, strict=True) if i}
    replies: dict[int, Message] = {}
    deadline = time.monotonic() + timeout
    while waiting and time.monotonic() < deadline:
        for reply in grid.pull_messages(list(waiting)):
            node = waiting.pop(reply.metadata.reply_to_message_id, None)
            if node is not None:
                replies[node] = reply
        live = set(grid.get_node_ids())
        waiting = {i: n for i, n in waiting.items() if n in live}
        if waiting:
            time.sleep(POLL)
    return replies


def site_rows(sites: list[Site]) -> list[dict[str, Any]]:
    """The rows of ``clients.csv``, from what the nodes told (``tv_len``: each client's length
    mix against the federation's)."""
    counts = np.array([s.length_counts for s in sites], dtype=float)  # (clients, buckets)
    mix = counts.sum(axis=0) / max(1.0, counts.sum())
    for s, c in zip(sites, counts, strict=True):
        s.row["tv_len"] = float(0.5 * np.abs(c / max(1.0, c.sum()) - mix).sum())
    return [s.row for s in sites]


def data_stats(per_node: list[dict[str, Any]]) -> dict[str, Any]:
    """The data pipeline's counts of the whole federation: a value every node reports alike
    (a simulation's nodes read the same data) as it is, else integers summed."""
    out = {}
    for key in per_node[0]:
        values = [d.get(key) for d in per_node]
        if all(v == values[0] for v in values):
            out[key] = values[0]
        elif all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            out[key] = sum(values)
    return out
