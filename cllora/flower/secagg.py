"""Secure aggregation (SecAgg+) of cllora's uplinks with Flower's own protocol.

Usage (what :mod:`cllora.flower.pool` and :mod:`cllora.flower.client_app` do with the run
config ``secagg = true``)::

    from cllora.flower.secagg import check_secagg, secure_train
    check_secagg(cfg, settings, trainees=4)           # a one-line ConfigError, before anything
    out = secure_train(grid, settings, algorithm, metrics, r, trainees, nodes, downs, confs,
                       weights)                         # the server: one round's training
    out.mean               # the weighted mean of the uplinks; no single uplink reached the server

The server drives Flower's ``SecAggPlusWorkflow`` (setup, share keys, collect masked vectors,
unmask) over the run's ``Grid`` through a one-round legacy ``Strategy`` whose ``configure_fit``
hands each trainee's downlink and settings to the workflow as a ``FitIns``; each node answers
with Flower's ``secaggplus_mod``, around cllora's training, which replies with a ``FitRes``
holding the trainee's update ``uplink - downlink`` (clipped with Flower's
``clip_inputs_inplace`` under DP) and its weight as ``num_examples``. The mod multiplies the
update by the weight, quantizes and masks it; the workflow sums the masked vectors, unmasks the
sum and divides it by the sum of the weights. The server therefore holds only the weighted mean
update of the round's finishers, which it adds to the (shared) downlink and hands to the
algorithm as one uplink of weight 1.

That is cllora's aggregation exactly for the algorithms that declare it
(``Algorithm.sums_securely``: no ``reads_each_uplink``), whose new adapter depends on the uplinks
only through their weighted mean and whose clients all get one downlink (one rank for every
client); the others are refused (:func:`check_secagg`).

**Weights**: the server's (:func:`cllora.fed.strategy.client_weights` over the trainees) as
integers ``round(w * Q)`` (``Q`` the quantization range, also the workflow's ``max_weight``), so
Flower's weight ratio is the weight to ``1 / Q``. A trainee whose training fails replies a zero
update of weight 0 (its records say why): it stays in the protocol, adds nothing, and the sum of
the weights renormalises the mean over the finishers, as ``cllora run`` does.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import (
    Code,
    FitIns,
    FitRes,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.server import SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.supercore.differential_privacy import clip_inputs_inplace

from cllora.config import Config, ConfigError
from cllora.fed.algorithms import algorithm_class, algorithm_names
from cllora.fed.algorithms.base import Algorithm, ClientResult, Downlink, Trainee, Uplink
from cllora.fed.rounds import RoundOutcome, TraineeOutcome, write_outcomes
from cllora.flower.messages import dump_records, load_records, to_arrays
from cllora.report.metrics import MetricsLog
from cllora.report.records import ClientFailed, Record

if TYPE_CHECKING:
    from cllora.flower.pool import FlowerSettings

MODULUS = 2**32  # Flower's default modulus range (the masks' and the sums' integers)
log = logging.getLogger("cllora")


@dataclass
class SecureOutcome(RoundOutcome):
    """A round under SecAgg+: ``uplinks`` marks the finishers (placeholders: their uplinks never
    reached the server), ``mean`` is the weighted mean of their uplinks, ``bytes_up`` the masked
    vectors that travelled, ``info`` the protocol's parameters for the round record."""

    mean: Uplink | None = None
    first: int = 0  # a finisher's client index (every client trains the same rank)
    masked_bytes: int = 0
    halted: bool = False  # the workflow stopped before unmasking (too few nodes stayed)

    @property
    def bytes_up(self) -> int:
        return self.masked_bytes

    def results(self, weights: list[float]) -> list[ClientResult]:
        """One result: the mean (the weights were applied inside the protocol)."""
        assert self.mean is not None
        return [ClientResult(self.first, self.mean, 1.0)]


# -- settings ------------------------------------------------------------------------------


def _count_or_fraction(name: str, value: float) -> int | float:
    """A run-config number as Flower reads it: a fraction when <= 1, else a count."""
    if 0 < value <= 1:
        return float(value)
    if value > 1 and value == int(value):
        return int(value)
    raise ConfigError(f"{name}={value:g}: give a fraction in (0, 1] or a whole number > 1")


def make_workflow(settings: FlowerSettings) -> _Workflow:
    """Flower's SecAgg+ workflow with the run's settings (Flower checks them: a one-line
    ConfigError naming the run-config keys)."""
    shares = _count_or_fraction("secagg-num-shares", settings.secagg_num_shares)
    threshold = _count_or_fraction("secagg-reconstruction-threshold",
                                   settings.secagg_reconstruction_threshold)  # fmt: skip
    if not settings.secagg_clipping_range > 0:
        raise ConfigError(f"secagg-clipping-range must be > 0: {settings.secagg_clipping_range}")
    try:
        return _Workflow(
            shares, threshold, max_weight=float(settings.secagg_quantization_range),
            clipping_range=settings.secagg_clipping_range,
            quantization_range=settings.secagg_quantization_range, modulus_range=MODULUS,
            timeout=settings.round_timeout,
        )  # fmt: skip
    except (TypeError, ValueError) as err:
        raise ConfigError(
            f"secagg-num-shares={settings.secagg_num_shares:g}, secagg-reconstruction-threshold"
            f"={settings.secagg_reconstruction_threshold:g}, secagg-quantization-range="
            f"{settings.secagg_quantization_range}: Flower refuses them: {err}"
        ) from None


def check_secagg(cfg: Config, settings: FlowerSettings, trainees: int) -> None:
    """What secure aggregation cannot run (one-line :class:`ConfigError`); ``trainees``: the
    trainees of a round (``fed.sample_fraction`` of the nodes)."""
    strategy, algorithm = cfg.fed.strategy, algorithm_class(cfg.fed.strategy)
    if not algorithm.sums_securely():
        why = algorithm.reads_each_uplink or (
            f"its uplinks also carry {', '.join(algorithm.uplink_extra)}, which secagg does not sum"
            if algorithm.uplink_extra
            else "it needs each client's update"
        )
        sums = [n for n in algorithm_names() if algorithm_class(n).sums_securely()]
        raise ConfigError(
            f"secagg shows the server only the weighted sum of the updates, but fed.strategy="
            f"{strategy} reads each one ({why}): use one of {', '.join(sums)}, or secagg=false"
        )
    if len(set(cfg.lora.client_ranks)) > 1:
        raise ConfigError(
            f"secagg sums one vector per client, of one shape, but lora.client_ranks="
            f"{cfg.lora.client_ranks} gives the clients different ranks: give every client one "
            "rank, or secagg=false"
        )
    if trainees < 2:
        raise ConfigError(
            f"secagg hides each update in the sum of at least 2, but fed.sample_fraction="
            f"{cfg.fed.sample_fraction:g} trains {trainees} client a round: raise it"
        )
    if trainees * settings.secagg_quantization_range >= MODULUS:
        raise ConfigError(
            f"secagg: {trainees} trainees x secagg-quantization-range="
            f"{settings.secagg_quantization_range} overflow the 2^32 modulus of the sums: lower it"
        )
    threshold = settings.secagg_reconstruction_threshold
    if threshold > trainees:
        raise ConfigError(
            f"secagg-reconstruction-threshold={threshold:g} exceeds the {trainees} trainees of a "
            "round: lower it (or give a fraction of the shares, e.g. 0.75)"
        )
    make_workflow(settings)


# -- the node ------------------------------------------------------------------------------


def is_secagg(msg: Message) -> bool:
    """Whether a ``train`` message is one of SecAgg+'s (it holds the protocol's config)."""
    return RECORD_KEY_CONFIGS in msg.content.config_records


def fitins_of(down: Downlink, conf: dict[str, Any]) -> FitIns:
    """A trainee's downlink and settings as the ``FitIns`` the workflow sends in its
    collect-masked-vectors stage (tensors in sorted key order, named in ``conf["keys"]``)."""
    arrays = to_arrays(down.adapter)
    return FitIns(ndarrays_to_parameters(arrays.to_numpy_ndarrays()),
                  {**conf, "keys": json.dumps(list(arrays.keys()))})  # fmt: skip


def read_fitins(fitins: FitIns) -> tuple[Downlink, dict[str, Any]]:
    keys = json.loads(str(fitins.config["keys"]))
    arrays = parameters_to_ndarrays(fitins.parameters)
    adapter = {k: torch.from_numpy(np.array(a)) for k, a in zip(keys, arrays, strict=True)}
    return Downlink(adapter), dict(fitins.config)


def _update(algorithm: Algorithm, index: int, down: Downlink, up: Uplink | None) -> list:
    """``uplink - downlink`` per uplink tensor, sorted by key, float64 (Flower quantizes it);
    zeros of the uplink's shapes when training failed."""
    if up is not None and up.extra:
        raise ValueError(f"secagg sums adapters only; this uplink carries {sorted(up.extra)}")
    template = algorithm.uplink(index, down, down.adapter).adapter
    out = []
    for k in sorted(template):
        if up is None:
            out.append(np.zeros(tuple(template[k].shape), dtype=np.float64))
        else:
            diff = up.adapter[k].detach().double().cpu() - down.adapter[k].double().cpu()
            out.append(diff.numpy())
    return out


def secure_fitres(
    algorithm: Algorithm, down: Downlink, out: TraineeOutcome, conf: dict[str, Any]
) -> FitRes:
    """A node's reply to the collect-masked-vectors stage, before ``secaggplus_mod`` masks it:
    the update (clipped to ``conf["clipping_norm"]`` under DP), its weight (0: failed), the
    records, and how many entries Flower's quantizer will clip (its range over the weight)."""
    update = _update(algorithm, int(conf["index"]), down, out.uplink)
    if "clipping_norm" in conf and out.uplink is not None:
        clip_inputs_inplace(update, float(conf["clipping_norm"]))
    weight = int(conf["weight"]) if out.uplink is not None else 0
    ratio = weight / float(conf["quantization_range"])
    limit = float(conf["clipping_range"])
    clipped = sum(int((np.abs(a) * ratio > limit).sum()) for a in update)
    metrics = {"records": dump_records(out.records), "position": int(conf["position"]),
               "ok": out.uplink is not None, "secagg_clipped": clipped}  # fmt: skip
    return FitRes(Status(Code.OK, ""), ndarrays_to_parameters(update), weight, metrics)


# -- the server ----------------------------------------------------------------------------


class _OneRound(Strategy):
    """The legacy strategy the workflow drives: this round's ``FitIns`` per node in, the
    unmasked weighted mean out (cllora's algorithm aggregates it, not this)."""

    def __init__(self, fitins: dict[int, FitIns], grid: Any) -> None:
        self.fitins, self.grid = fitins, grid
        self.mean: list[np.ndarray] | None = None

    def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> list:
        return [(GridClientProxy(n, self.grid, 0), ins) for n, ins in self.fitins.items()]

    def aggregate_fit(self, server_round: int, results: list, failures: list) -> tuple:
        if results:  # every result holds the same unmasked aggregate
            self.mean = parameters_to_ndarrays(results[0][1].parameters)
        return None, {}

    def initialize_parameters(self, client_manager: Any) -> None:
        return None

    def configure_evaluate(self, server_round: int, parameters: Any, client_manager: Any) -> list:
        return []

    def aggregate_evaluate(self, server_round: int, results: list, failures: list) -> tuple:
        return None, {}

    def evaluate(self, server_round: int, parameters: Any) -> None:
        return None


class _Workflow(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow, keeping what cllora records: the round's share count and
    reconstruction threshold, and the nodes' replies to the masked-vector stage."""

    used: dict[str, int]
    replies: dict[int, FitRes]

    def setup_stage(self, grid: Any, context: LegacyContext, state: Any) -> bool:
        self.used, self.replies = {}, {}
        ok = super().setup_stage(grid, context, state)
        self.used = {"secagg_num_shares": int(state.num_shares),
                     "secagg_reconstruction_threshold": int(state.threshold)}  # fmt: skip
        return ok

    def collect_masked_vectors_stage(self, grid: Any, context: LegacyContext, state: Any) -> bool:
        ok = super().collect_masked_vectors_stage(grid, context, state)
        self.replies = {proxy.node_id: res for proxy, res in state.legacy_results}
        return ok


class _Counted:
    """The run's grid, counting the bytes of the masked vectors that come back."""

    def __init__(self, grid: Any) -> None:
        self.grid, self.masked = grid, 0

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Message]:
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        for m in replies:
            conf = None if m.has_error() else m.content.config_records.get(RECORD_KEY_CONFIGS)
            if conf is not None and Key.MASKED_PARAMETERS in conf:
                self.masked += sum(len(b) for b in conf[Key.MASKED_PARAMETERS])
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)


def _context(strategy: _OneRound, r: int) -> LegacyContext:
    state = RecordDict({MAIN_CONFIGS_RECORD: ConfigRecord({WorkflowKey.CURRENT_ROUND: r}),
                        MAIN_PARAMS_RECORD: ArrayRecord()})  # fmt: skip
    manager = SimpleClientManager()
    for proxy, _ in strategy.configure_fit(r, None, manager):
        manager.register(proxy)
    base = Context(run_id=0, node_id=0, node_config={}, state=state, run_config={})
    return LegacyContext(base, strategy=strategy, client_manager=manager)


def secure_train(
    grid: Any, settings: FlowerSettings, algorithm: Algorithm, metrics: MetricsLog, r: int,
    trainees: list[Trainee], nodes: list[int], downs: list[Downlink],
    confs: list[dict[str, Any]], weights: list[float],
) -> SecureOutcome:  # fmt: skip
    """Round ``r``'s local trainings under SecAgg+ (see the module doc): trainee k on node
    ``nodes[k]`` from ``downs[k]``; the trainees' records are written in trainee order, a node
    that left the protocol gets a ``client_failed``; ``info`` holds the protocol's parameters
    for the round record."""
    s = settings
    extra = {"quantization_range": s.secagg_quantization_range,
             "clipping_range": s.secagg_clipping_range}  # fmt: skip
    live = set(grid.get_node_ids())  # a node not connected would stall every stage
    fitins = {}
    for n, d, c, w in zip(nodes, downs, confs, weights, strict=True):
        if n in live:
            weight = round(w * s.secagg_quantization_range)
            fitins[n] = fitins_of(d, {**c, **extra, "weight": weight})
    strategy, flow, counted = _OneRound(fitins, grid), make_workflow(s), _Counted(grid)
    flow(counted, _context(strategy, r))
    out = SecureOutcome(trainees, {}, sum(d.nbytes() for d in downs), [])
    clipped, records = 0, []
    for k, (t, n) in enumerate(zip(trainees, nodes, strict=True)):
        mine, ok, count = _finisher(flow.replies.get(n), r, t, n in live)
        records.append(mine)
        clipped += count
        if ok:
            out.uplinks[k] = Uplink({})
    out.local = write_outcomes(metrics, records)
    out.masked_bytes, out.first = counted.masked, trainees[min(out.uplinks, default=0)].index
    out.halted = strategy.mean is None
    if out.uplinks and strategy.mean is not None:
        out.mean = _mean_uplink(algorithm, out.first, downs[0], strategy.mean)
    ranks = [algorithm.client_rank(trainees[k].index) for k in sorted(out.uplinks)]
    out.info = {"secagg": True, **flow.used, "secagg_clipping_range": s.secagg_clipping_range,
                "secagg_quantization_range": s.secagg_quantization_range,
                "secagg_clipped": clipped, "client_ranks": ranks}  # fmt: skip
    return out


def _finisher(
    reply: FitRes | None, r: int, t: Trainee, connected: bool
) -> tuple[list[Record], bool, int]:
    """A trainee's records, whether it finished, and its count of clipped entries."""
    if reply is None:
        why = ("its SuperNode left secure aggregation (an error, or no reply within "
               "round-timeout)") if connected else "its SuperNode is not connected"  # fmt: skip
        log.warning("round %d: client %s failed: %s", r, t.name, why)
        return [ClientFailed(round=r, client=t.name, error=why)], False, 0
    m = reply.metrics
    return load_records(str(m["records"])), bool(m["ok"]), int(m.get("secagg_clipped", 0))


def _mean_uplink(algorithm: Algorithm, index: int, down: Downlink, mean: list) -> Uplink:
    """The weighted mean of the uplinks: the (shared) downlink plus the mean update."""
    keys = sorted(algorithm.uplink(index, down, down.adapter).adapter)
    if len(keys) != len(mean) or any(math.prod(down.adapter[k].shape) != np.size(a)
                                     for k, a in zip(keys, mean, strict=True)):  # fmt: skip
        raise RuntimeError("secagg: the unmasked sum does not match the uplink's tensors")
    out = {}
    for k, a in zip(keys, mean, strict=True):
        base = down.adapter[k]
        step = torch.from_numpy(np.asarray(a, dtype=np.float64)).reshape(base.shape)
        out[k] = (base.double() + step.to(base.device)).to(base.dtype)
    return Uplink(out)
