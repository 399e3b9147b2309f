"""A Flower ``Grid`` in this process for tests: cllora's real ClientApp answers each message at
once, each virtual node with its own ``Context`` (its state kept between messages, as a
SuperNode keeps it), without Ray or a SuperLink. Each node gets its own copy of a message (a
sender may reuse one content for many messages, which the wire would copy).

Usage::

    grid = InProcessGrid(nodes=3)                   # node ids 1..3, partition-id 0..2
    grid = InProcessGrid(nodes=3, drop_masked={2})  # node 2 drops out of SecAgg+ (stage 2)
    result = run_federation(grid, cfg, FlowerSettings(nodes=3))
    grid.replies                                     # every reply, in order, for inspection

The ClientApp needs a task identity to make Messages: use the ``task_identity`` fixture.
"""

from __future__ import annotations

import copy
import time
import uuid
from collections.abc import Iterable
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.serverapp import Grid

from cllora.flower.client_app import app


class InProcessGrid(Grid):
    """``nodes`` virtual SuperNodes (ids ``1..nodes``) answered by cllora's ClientApp; those in
    ``drop_masked`` reply an error to SecAgg+'s collect-masked-vectors stage (a dropout)."""

    def __init__(self, nodes: int, drop_masked: set[int] | None = None) -> None:
        self.drop_masked = drop_masked or set()
        self.contexts = {
            n: Context(run_id=1, node_id=n, node_config={"partition-id": n - 1},
                       state=RecordDict(), run_config={})
            for n in range(1, nodes + 1)
        }  # fmt: skip
        self.pending: dict[str, Message] = {}
        self.replies: list[Message] = []

    def _answer(self, msg: Message) -> Message:
        msg = copy.deepcopy(msg)  # each node gets its own copy, as if sent over the wire
        conf = msg.content.config_records.get(RECORD_KEY_CONFIGS, {})
        if (msg.metadata.dst_node_id in self.drop_masked
                and conf.get(Key.STAGE) == Stage.COLLECT_MASKED_VECTORS):  # fmt: skip
            return Message(Error(code=0, reason="dropped out"), reply_to=msg)
        try:
            return app(msg, self.contexts[msg.metadata.dst_node_id])
        except Exception as err:  # a ClientApp that raises: Flower replies with an error
            return Message(Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=msg)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            reply = self._answer(msg)
            self.replies.append(reply)
            self.pending[msg.metadata.message_id] = reply
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.pending.pop(i) for i in list(message_ids) if i in self.pending]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return list(self.pull_messages(list(self.push_messages(messages))))

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def get_nodes(self) -> Iterable[Any]:
        return []

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:  # fmt: skip
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    @property
    def run(self) -> Any:
        return type("Run", (), {"run_id": 1, "started": time.time()})()

    def set_run(self, run: Any) -> None:
        pass
