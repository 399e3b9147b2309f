"""The Flower ClientApp: one client of a cllora run, on the SuperNode that holds its data.

Usage (what ``flwr run`` and the simulation load; see :mod:`cllora.flower.server_app`)::

    from cllora.flower.client_app import app        # flwr.clientapp.ClientApp

It answers three message types, each carrying the run's resolved cllora config (YAML) in its
``ConfigRecord`` (the node builds its client from it once, :func:`cllora.flower.node.node_for`):

- ``query``: the client's name, sizes, quality score, ``clients.csv`` row and test sample ids;
- ``train``: the downlink in, local training (and local evaluation), the uplink and the client's
  records out (:mod:`cllora.flower.messages`); what the client keeps between rounds stays in
  the node's ``Context.state`` (:mod:`cllora.flower.kept`);
- ``evaluate``: the global adapter in, its ``global_eval`` record on the client's test set out.

With differential privacy the server sends ``train.dp`` messages, which run Flower's
``fixedclipping_mod`` around the same training: it clips each uplink's update (uplink minus
downlink, L2 over all tensors) to the ``clipping_norm`` the server sends, after cllora's training
and before anything leaves the node.

With secure aggregation (:mod:`cllora.flower.secagg`) the server's SecAgg+ workflow sends plain
``train`` messages holding its protocol's config record: those go through Flower's
``secaggplus_mod``, which answers three of its four stages itself and, in the fourth, runs the
same training (from a legacy ``FitIns``) and masks the update before it leaves the node.

A handler that fails replies an error naming the node (:func:`_named_errors`, around every
handler and mod): cllora's one-line errors (a malformed record at file:line, a missing
``data-path``, a bad setting) as that line, anything else with its traceback, which also goes to
the SuperNode's log. The server treats either as a failed node.
"""

from __future__ import annotations

import json
import logging
import traceback
from typing import Any

from flwr.app import Context, Message
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.compat.common.recorddict_compat import fitres_to_recorddict, recorddict_to_fitins

from cllora.flower.kept import KeptStore
from cllora.flower.messages import (
    config_content,
    config_of,
    error_reply,
    from_arrays,
    read_downlink,
    uplink_content,
)
from cllora.flower.node import USER_ERRORS, Node, node_for, node_name
from cllora.flower.secagg import is_secagg, read_fitins, secure_fitres

CONFIG_KEY = "cllora-config"  # the run's resolved config, as YAML, in every message
log = logging.getLogger("cllora")


def _node(msg: Message, context: Context) -> tuple[Node, dict[str, Any]]:
    conf = config_of(msg.content)
    return node_for(str(conf[CONFIG_KEY]), dict(context.node_config)), conf


def _query(msg: Message, context: Context) -> Message:
    node, _ = _node(msg, context)
    return Message(config_content({"info": json.dumps(node.query())}), reply_to=msg)


def _train(msg: Message, context: Context) -> Message:
    node, _ = _node(msg, context)
    down, conf = read_downlink(msg.content)
    out = node.train(down, conf, KeptStore(context.state))
    reply = {"position": int(conf["position"])}
    return Message(uplink_content(out.uplink, out.records, reply), reply_to=msg)


def _train_secure(msg: Message, context: Context) -> Message:
    """SecAgg+'s collect-masked-vectors stage: train, reply the update and its weight as a
    ``FitRes`` (``secaggplus_mod`` masks it)."""
    down, conf = read_fitins(recorddict_to_fitins(msg.content, keep_input=True))
    node = node_for(str(conf[CONFIG_KEY]), dict(context.node_config))
    out = node.train(down, conf, KeptStore(context.state))
    fitres = secure_fitres(node.algorithm, down, out, conf)
    return Message(fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


def _secagg(msg: Message, context: Context, call_next: Any) -> Message:
    """A mod: SecAgg+'s messages to Flower's ``secaggplus_mod`` (around :func:`_train_secure`),
    the other ``train`` messages on to ``call_next``."""
    if not is_secagg(msg):
        return call_next(msg, context)
    return secaggplus_mod(msg, context, _train_secure)


def _evaluate(msg: Message, context: Context) -> Message:
    node, conf = _node(msg, context)
    state = from_arrays(msg.content.array_records["adapter"])
    record = node.evaluate(state, int(conf["round"]))
    return Message(config_content({"record": json.dumps(record)}), reply_to=msg)


def _named_errors(msg: Message, context: Context, call_next: Any) -> Message:
    """A mod: an exception of the handler (or of the mods inside) becomes an error reply naming
    this node, one line for cllora's own errors, the traceback too for any other."""
    try:
        return call_next(msg, context)
    except USER_ERRORS as err:
        name = node_name(dict(context.node_config), context.node_id)
        log.error("%s: %s", name, err)
        return error_reply(msg, name, str(err))
    except Exception as err:
        name = node_name(dict(context.node_config), context.node_id)
        log.exception("%s: unexpected error", name)
        text = str(err).strip().splitlines()
        line = f"unexpected {type(err).__name__}: {text[0] if text else ''}".rstrip(": ")
        return error_reply(msg, name, line, traceback.format_exc())


DP_ACTION = "dp"  # message type "train.dp": training with Flower's fixed clipping mod


def make_client_app() -> ClientApp:
    """A ClientApp answering cllora's messages (see the module doc)."""
    client = ClientApp(mods=[_named_errors])
    client.query()(_query)
    client.evaluate()(_evaluate)
    client.train(mods=[_secagg])(_train)
    client.train(DP_ACTION, mods=[fixedclipping_mod])(_train)
    return client


app = make_client_app()
