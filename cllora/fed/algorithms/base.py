"""The interface every federated algorithm implements, and the FedAvg behaviour it defaults to.

Usage::

    from cllora.fed.algorithms import make_algorithm
    algo = make_algorithm(cfg)                 # the class fed.strategy names, checked against cfg
    down = algo.downlink(i, global_state)      # what client i receives (bytes counted)
    rules = algo.local_rules(i, down)          # how it trains differently (prox, frozen A, ...)
    up = algo.uplink(i, down, trained_state)   # what it sends back (bytes counted)
    agg = algo.aggregate(global_state, [ClientResult(i, up, weight), ...])
    algo.state_dict() / algo.load_state_dict(d)   # server (and simulated client) state: checkpoints

An algorithm is one subclass of :class:`Algorithm` in one file of ``cllora/fed/algorithms/``
whose module name is its ``fed.strategy`` value; the registry finds it by file name. A subclass
overrides only what differs from FedAvg:

- :meth:`Algorithm.check_config` — settings it refuses (a :class:`~cllora.config.ConfigError`);
- :meth:`Algorithm.trainees` — who trains this round and for how many steps (``centralized``
  pools every client's data into one trainer);
- :meth:`Algorithm.downlink` / :meth:`Algorithm.local_rules` / :meth:`Algorithm.uplink` — what
  travels down, what the client does differently (a list of
  :class:`~cllora.fed.local_rule.LocalRule` objects: a proximal term, frozen factors, a step
  correction), what travels up (only what is in a :class:`Downlink` / :class:`Uplink` is counted
  in ``bytes_down`` / ``bytes_up``);
- :meth:`Algorithm.aggregate` — the new global adapter from the uplinks; the default is FedAvg of
  the factors (:meth:`Algorithm.average_factors`). The algorithm owns its maths: it calls the pure
  functions of :mod:`cllora.fed.strategy` and :mod:`cllora.fed.lora_algebra` it needs, and a
  server optimizer implements its own rule (:mod:`cllora.fed.algorithms._fedopt`);
- :meth:`Algorithm.apply_global` / :meth:`Algorithm.export` — how the global model is put into
  the shared model, and saved (algorithms that fold updates into the base override both);
- :meth:`Algorithm.keep` — where what a client keeps is stored (``self.state["clients"]``);
- the capabilities (``keeps_client_state``, ``server_reads_kept``, ``changes_base``,
  ``pools_client_data``, ``mean_of_uplinks``, ``reads_each_uplink``, ``uplink_extra``) — class
  attributes that say what the Flower apps, secure aggregation and central DP may do with it; a
  new algorithm declares them, and nothing outside the algorithm lists algorithm names;
- ``self.state`` — everything it keeps between rounds, saved in every checkpoint and restored
  on ``--resume`` (tensors, numbers, strings, lists, nested dicts); state kept in typed
  attributes instead (the server optimizers' step and moments) overrides
  :meth:`Algorithm.state_dict` / :meth:`Algorithm.load_state_dict`. State a real client would
  keep on its own machine (its own B, its control variate) lives under ``self.state["clients"]``
  in the in-process pool (:meth:`Algorithm.keep`), and on the client's SuperNode under Flower;
  it never counts as traffic.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from cllora.config import Config, ConfigError
from cllora.fed.local_rule import LocalRule
from cllora.fed.lora_algebra import A_SUFFIX, B_SUFFIX
from cllora.fed.strategy import AggregateResult, fedavg_factors, to_client_rank
from cllora.model.lora import set_lora_state, state_nbytes

State = dict[str, torch.Tensor]


def a_part(state: State) -> State:
    """The A tensors (``*.lora_A``) of an adapter."""
    return {k: t for k, t in state.items() if k.endswith(A_SUFFIX)}


def b_part(state: State) -> State:
    """The B tensors (``*.lora_B``) of an adapter."""
    return {k: t for k, t in state.items() if k.endswith(B_SUFFIX)}


@dataclass
class Trainee:
    """One local training of a round: client ``index`` (its seed, rank and local evaluation; -1
    for a trainer that is no client, as ``centralized``'s pool) for ``steps`` steps on the
    training data of the clients ``sources`` (None: its own). The data itself stays where the
    clients are (the pool finds it): an algorithm only says whose it is."""

    index: int
    name: str
    steps: int
    sources: tuple[int, ...] | None = None


@dataclass
class Downlink:
    """What the server sends one client: the adapter it starts from (at its rank) and any
    algorithm state that travels with it (e.g. SCAFFOLD's server control variate)."""

    adapter: State
    extra: dict[str, State] = field(default_factory=dict)
    counted: bool = True  # False: nothing travels (the client starts from what it kept)

    def nbytes(self) -> int:
        if not self.counted:
            return 0
        return state_nbytes(self.adapter) + sum(state_nbytes(s) for s in self.extra.values())


@dataclass
class Uplink:
    """What a client sends back: its adapter (or the part that travels) and extra state.

    ``kept``: what the client keeps for itself (its own B, its control variate). It never
    travels and is not counted; the in-process simulation hands it to :meth:`Algorithm.aggregate`
    to store under ``state["clients"]``, so every process holds the same algorithm state.
    :meth:`Algorithm.uplink` must be pure (no change to ``self.state``)."""

    adapter: State
    extra: dict[str, State] = field(default_factory=dict)
    kept: dict[str, State] = field(default_factory=dict)

    def nbytes(self) -> int:
        return state_nbytes(self.adapter) + sum(state_nbytes(s) for s in self.extra.values())


@dataclass
class ClientResult:
    """One client's uplink with its aggregation weight (weights of a round sum to 1)."""

    index: int
    uplink: Uplink
    weight: float


class Algorithm:
    """FedAvg over LoRA factors; subclasses override what differs (see the module doc)."""

    name: ClassVar[str] = ""  # the fed.strategy value: the file's module name
    #: the server learning rate when ``fed.server_lr`` is empty (None: the algorithm has none)
    default_server_lr: ClassVar[float | None] = None
    #: its own settings: the ``fed.*`` keys it reads (validated by the config's ranges and its
    #: :meth:`check_config`); a run that sets one that the chosen algorithm does not read is
    #: told it is ignored (:func:`cllora.fed.algorithms.ignored_settings`)
    settings: ClassVar[tuple[str, ...]] = ()

    # -- what it can do (read by the Flower apps, SecAgg+ and central DP; no name lists) --
    #: it keeps state per client between rounds (``Uplink.kept``: SCAFFOLD's control variates,
    #: FedSA's B, a local model), stored by :meth:`keep` where the client lives (on Flower:
    #: its SuperNode, for the run's lifetime, so such a run cannot be resumed there)
    keeps_client_state: ClassVar[bool] = False
    #: why its server reads what the clients keep ("": it never does, so that state can stay
    #: on each client's node, as a real deployment keeps it)
    server_reads_kept: ClassVar[str] = ""
    #: the names of the extra state its uplinks carry besides the adapter (SCAFFOLD's
    #: ``delta_c``), which cllora's secure aggregation does not sum
    uplink_extra: ClassVar[tuple[str, ...]] = ()
    #: it folds updates into the base weights, which every node would have to follow
    changes_base: ClassVar[bool] = False
    #: it trains on every client's data in one place (a reference point, no federation)
    pools_client_data: ClassVar[bool] = False
    #: its new global adapter is the weighted mean of the uplinks, so central DP's noise on the
    #: mean of clipped updates matches the sensitivity
    mean_of_uplinks: ClassVar[bool] = False
    #: why its server needs each uplink rather than their weighted sum ("": the sum suffices,
    #: so secure aggregation, which shows the server only the sum, can run it)
    reads_each_uplink: ClassVar[str] = ""

    @classmethod
    def flower_refusal(cls) -> str:
        """Why the Flower apps cannot run it ("": they can: its messages are exactly its
        :class:`Downlink` / :class:`Uplink` tensors, what its clients keep stays on their
        nodes, and every node keeps the same base weights)."""
        if cls.pools_client_data:
            return "it trains on every client's data in one place"
        if cls.changes_base:
            return "it folds updates into the base weights, which every node would have to follow"
        return cls.server_reads_kept

    @classmethod
    def runs_on_flower(cls) -> bool:
        return not cls.flower_refusal()

    @classmethod
    def sums_securely(cls) -> bool:
        """Secure aggregation (the server sees the weighted sum of the uplinks' adapters) can
        run it."""
        return cls.runs_on_flower() and not (cls.reads_each_uplink or cls.uplink_extra)

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.state: dict[str, Any] = {}

    # -- configuration -------------------------------------------------------------------

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """Raise :class:`~cllora.config.ConfigError` for settings this algorithm cannot run."""

    @property
    def server_lr(self) -> float:
        f = self.cfg.fed
        return f.server_lr if f.server_lr is not None else (self.default_server_lr or 1.0)

    # -- ranks ---------------------------------------------------------------------------

    def global_rank(self) -> int:
        """Rank of the global adapter: lora.r, or the largest client rank if larger."""
        return max([self.cfg.lora.r, *self.cfg.lora.client_ranks])

    def client_rank(self, index: int) -> int:
        """Rank client ``index`` trains (``lora.client_ranks`` cycled; else the global rank)."""
        ranks = self.cfg.lora.client_ranks
        return ranks[index % len(ranks)] if ranks and index >= 0 else self.global_rank()

    def scaling(self, rank: int) -> float:
        return self.cfg.lora.alpha / rank

    def scalings(self, results: list[ClientResult]) -> tuple[list[float], float]:
        """``(each uplink's scaling at its client's rank, the global adapter's scaling)``: the
        ``client_scalings, global_scaling`` arguments of :mod:`cllora.fed.strategy`."""
        clients = [self.scaling(self.client_rank(r.index)) for r in results]
        return clients, self.scaling(self.global_rank())

    # -- one round -----------------------------------------------------------------------

    def trainees(self, chosen: list[int], names: list[str]) -> list[Trainee]:
        """The local trainings of a round (``names``: every client's, in the run's order): each
        chosen client on its own data, local_steps steps."""
        steps = self.cfg.train.local_steps
        return [Trainee(i, names[i], steps) for i in chosen]

    def downlink(self, index: int, global_state: State) -> Downlink:
        """The global adapter at the client's rank (SVD-truncated when lower)."""
        rank, big = self.client_rank(index), self.global_rank()
        if rank == big:
            return Downlink(global_state)
        adapter = to_client_rank(
            global_state, rank, global_scaling=self.scaling(big), client_scaling=self.scaling(rank)
        )
        return Downlink(adapter)

    def local_rules(self, index: int, down: Downlink) -> list[LocalRule]:
        """How client ``index`` trains differently from plain AdamW (none: it does not)."""
        return []

    def uplink(self, index: int, down: Downlink, trained: State) -> Uplink:
        return Uplink(trained)

    def keep(self, index: int, kept: dict[str, State]) -> None:
        """Store what client ``index`` keeps after a successful training (:attr:`Uplink.kept`),
        under ``state["clients"][str(index)]``; called where the client lives: by the
        in-process pool for every client, by a Flower node for its own."""
        if kept:
            self.state.setdefault("clients", {})[str(index)] = dict(kept)

    def aggregate(self, global_state: State, results: list[ClientResult]) -> AggregateResult:
        """FedAvg of the factors (:meth:`average_factors`)."""
        return self.average_factors(global_state, results)

    def average_factors(self, global_state: State, results: list[ClientResult]) -> AggregateResult:
        """:func:`cllora.fed.strategy.fedavg_factors` over the uplinks, at their ranks' scalings
        (the info's ``strategy`` is ``fedavg``)."""
        return fedavg_factors(
            global_state,
            [r.uplink.adapter for r in results],
            [r.weight for r in results],
            *self.scalings(results),
        )

    # -- the global model ------------------------------------------------------------------

    def apply_global(self, model: torch.nn.Module, global_state: State) -> None:
        """Put the global model into the shared model (evaluation, next round's start)."""
        set_lora_state(model, global_state, resize=True)

    def export(self, model: torch.nn.Module, global_state: State, directory: Path) -> Path:
        """Save the global model as a PEFT adapter that reproduces it."""
        from cllora.model.adapter import save_adapter

        return save_adapter(model, directory, base_model=self.cfg.model.name, state=global_state)

    # -- state -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return self.state

    def load_state_dict(self, state: dict[str, Any], model: torch.nn.Module | None = None) -> None:
        """Restore :meth:`state_dict` (on ``--resume``; ``model``: the shared model, for
        algorithms whose state lives in it too)."""
        self.state = dict(state)


def require_one_rank(cfg: Config, name: str, why: str) -> None:
    """ConfigError unless every client trains the global rank (for algorithms whose tensors
    must have one shape on every client; ``why`` says which)."""
    big = max([cfg.lora.r, *cfg.lora.client_ranks])
    if any(r != big for r in cfg.lora.client_ranks):
        raise ConfigError(
            f"fed.strategy={name} needs one rank for every client: {why}, but "
            f"lora.client_ranks={cfg.lora.client_ranks} (global rank {big})"
        )
