"""What a client keeps between rounds, on its own SuperNode (SCAFFOLD's control variate, ...).

Usage (what :mod:`cllora.flower.client_app` does around every training)::

    from cllora.flower.kept import KeptStore
    store = KeptStore(context.state)        # Flower's per-node state, kept for the run
    kept = store.load(3, "site-a", "scaffold")   # what it kept after round 3 (None: round 0)
    store.save(5, uplink.kept)              # after a successful training in round 5

The state lives in the node's ``Context.state`` (a Flower ``RecordDict`` the SuperNode keeps for
the whole run, whichever process handles the message), as one ``ArrayRecord`` per kept part and
round (``cllora.kept.<round>.<part>``) and one ``ConfigRecord`` listing them. It never travels:
the server only tells, in each ``train`` message, the round after which it last aggregated this
client (``kept_round``), and the node trains from what it kept then. The last :data:`KEEP`
rounds are kept, so a round whose training succeeded but which the server never aggregated (the
run stopped) does not hide the one before.

A node that does not hold the state asked for (it restarted during the run) refuses in one line
rather than train from nothing; a new ``flwr run`` has new node state, which is why a run of an
algorithm that keeps client state cannot be resumed on Flower (:mod:`cllora.flower.pool`).
"""

from __future__ import annotations

import json

import torch
from flwr.app import ConfigRecord, RecordDict

from cllora.config import ConfigError
from cllora.flower.messages import from_arrays, to_arrays

KEEP = 3  # rounds of kept state a node holds
INDEX = "cllora.kept"  # the ConfigRecord listing them: {"parts": '{"<round>": [part, ...]}'}

State = dict[str, torch.Tensor]


class KeptStore:
    """A client's kept state, by round, in its node's ``Context.state``."""

    def __init__(self, state: RecordDict) -> None:
        self.state = state

    def _parts(self) -> dict[int, list[str]]:
        record = self.state.config_records.get(INDEX)
        if record is None:
            return {}
        return {int(r): list(p) for r, p in json.loads(str(record["parts"])).items()}

    def load(self, round_idx: int, client: str, strategy: str) -> dict[str, State] | None:
        """What the client kept after round ``round_idx`` (None for 0: it has not trained);
        a one-line ConfigError when this node does not hold it."""
        if round_idx <= 0:
            return None
        parts = self._parts()
        if round_idx not in parts:
            held = ", ".join(map(str, sorted(parts))) or "none"
            raise ConfigError(
                f"client {client}'s SuperNode no longer holds what the client kept after round "
                f"{round_idx} (it holds rounds: {held}; the node restarted during the run?), "
                f"which fed.strategy={strategy} trains from: start the run again"
            )
        records = self.state.array_records
        return {p: from_arrays(records[f"{INDEX}.{round_idx}.{p}"]) for p in parts[round_idx]}

    def save(self, round_idx: int, kept: dict[str, State]) -> None:
        """Keep ``kept`` as round ``round_idx``'s; drop rounds beyond the last :data:`KEEP`."""
        parts = self._parts()
        parts[round_idx] = sorted(kept)
        for p, s in kept.items():
            self.state.array_records[f"{INDEX}.{round_idx}.{p}"] = to_arrays(s)
        for old in sorted(parts)[:-KEEP]:
            for p in parts.pop(old):
                del self.state.array_records[f"{INDEX}.{old}.{p}"]
        self.state.config_records[INDEX] = ConfigRecord(
            {"parts": json.dumps({str(r): p for r, p in parts.items()})}
        )
