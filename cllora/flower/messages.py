"""What travels in a Flower Message: cllora's downlinks, uplinks and records as Flower records.

Usage::

    from cllora.flower.messages import downlink_content, read_downlink
    content = downlink_content(down, {"round": 1, "index": 0})   # a flwr RecordDict
    down, config = read_downlink(content)                        # back, on the ClientApp

A message holds the adapter as one ``ArrayRecord`` (``"adapter"``), each piece of an algorithm's
extra state as another (``"extra.<name>"``), and its settings as one ``ConfigRecord``
(``"config"``): numbers and strings, with cllora's records as one JSON string (``"records"``).
Only the tensors are what an algorithm sends; ``bytes_down`` / ``bytes_up`` still count them as
:meth:`~cllora.fed.algorithms.base.Downlink.nbytes` does (the config, a few hundred bytes of
settings, is not counted, as in ``cllora run``). Tensors travel as they are, except bf16, which
NumPy cannot hold: it travels as fp32 (exact) and is cast back where it is set into a model.

A node that cannot answer replies with a Flower ``Error`` whose reason names it
(:func:`error_reply`, :func:`read_error`): code :data:`USER_ERROR` for cllora's own one-line
errors (bad data or config on the node: the line says the cause, the file:line and the fix),
Flower's ``CLIENT_APP_RAISED_EXCEPTION`` for anything else (a bug: its traceback follows).
"""

from __future__ import annotations

import json
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, RecordDict
from flwr.common.constant import ErrorCode

from cllora.fed.algorithms.base import Downlink, Uplink
from cllora.report.records import Record, record_from_dict

ADAPTER, CONFIG, EXTRA = "adapter", "config", "extra."
USER_ERROR = 1001  # the Error code of cllora's one-line errors (Flower's own codes are < 100)
_NODE = "SuperNode "  # an error's reason: "SuperNode <name>: <line>[\n<traceback>]"
State = dict[str, torch.Tensor]


def to_arrays(state: State) -> ArrayRecord:
    """An adapter (or any flat state dict of tensors) as a Flower ``ArrayRecord``, its keys
    sorted (one order both ways, as Flower's DP mods compare the reply's keys in order)."""
    out = {}
    for k in sorted(state):
        t = state[k].detach().cpu()
        out[k] = (t.float() if t.dtype == torch.bfloat16 else t).contiguous()
    return ArrayRecord(out)


def from_arrays(record: ArrayRecord) -> State:
    return dict(record.to_torch_state_dict())


def _content(adapter: State, extra: dict[str, State], config: dict[str, Any]) -> RecordDict:
    records: dict[str, Any] = {ADAPTER: to_arrays(adapter)}
    records.update({EXTRA + name: to_arrays(s) for name, s in extra.items()})
    records[CONFIG] = ConfigRecord(config)
    return RecordDict(records)


def _extras(content: RecordDict) -> dict[str, State]:
    return {k[len(EXTRA) :]: from_arrays(v) for k, v in content.array_records.items()
            if k.startswith(EXTRA)}  # fmt: skip


def downlink_content(down: Downlink, config: dict[str, Any]) -> RecordDict:
    """A trainee's downlink and its settings (round, client index, steps, ...)."""
    return _content(down.adapter, down.extra, config)


def read_downlink(content: RecordDict) -> tuple[Downlink, dict[str, Any]]:
    return Downlink(from_arrays(content.array_records[ADAPTER]), _extras(content)), config_of(
        content
    )


def uplink_content(up: Uplink | None, records: list[Record], config: dict[str, Any]) -> RecordDict:
    """A trainee's reply: its uplink (none when it failed) and its records (client_train,
    local_eval or client_failed)."""
    config = {**config, "ok": up is not None, "records": dump_records(records)}
    if up is None:
        return RecordDict({CONFIG: ConfigRecord(config)})
    return _content(up.adapter, up.extra, config)


def read_uplink(content: RecordDict) -> tuple[Uplink | None, list[Record], dict[str, Any]]:
    config = config_of(content)
    records = load_records(str(config.get("records", "[]")))
    if not config.get("ok") or ADAPTER not in content.array_records:
        return None, records, config
    return Uplink(from_arrays(content.array_records[ADAPTER]), _extras(content)), records, config


def state_content(state: State, config: dict[str, Any]) -> RecordDict:
    """A global adapter to evaluate, with its settings."""
    return _content(state, {}, config)


def config_content(config: dict[str, Any]) -> RecordDict:
    return RecordDict({CONFIG: ConfigRecord(config)})


def config_of(content: RecordDict) -> dict[str, Any]:
    record = content.config_records.get(CONFIG)
    return dict(record) if record is not None else {}


def dump_records(records: list[Record]) -> str:
    return json.dumps([r.as_dict() for r in records])


def load_records(text: str) -> list[Record]:
    return [record_from_dict(d) for d in json.loads(text)]


def error_reply(msg: Message, node: str, line: str, trace: str = "") -> Message:
    """The reply of node ``node`` that could not answer ``msg``: ``line`` (one line: cause,
    file:line, fix) and, for an unexpected exception, its ``trace`` (the reply is then a Flower
    ``CLIENT_APP_RAISED_EXCEPTION``)."""
    code = ErrorCode.CLIENT_APP_RAISED_EXCEPTION if trace else USER_ERROR
    reason = f"{_NODE}{node}: {line}" + (f"\n{trace.rstrip()}" if trace else "")
    return Message(Error(code=code, reason=reason), reply_to=msg)


def read_error(error: Error) -> tuple[str | None, str, str]:
    """An error reply's node name (None: not a cllora node's, e.g. the SuperLink's
    ``Node Unavailable``), its line, and the traceback that follows it ("" for cllora's one-line
    errors)."""
    first, _, trace = str(error.reason or f"error code {error.code}").partition("\n")
    if not first.startswith(_NODE) or ": " not in first:
        return None, first, trace
    node, line = first[len(_NODE) :].split(": ", 1)
    return node, line, trace
