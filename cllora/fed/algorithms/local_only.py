"""``local_only``: no federation; every client trains its own adapter alone, the reference that
tells whether federation helps (the "local training" baseline of FedLLM-Bench, Ye et al., 2024,
and OpenFedLLM, Ye et al., 2024).

Usage: ``cllora run fed.strategy=local_only`` (with ``eval.local=true``, the default: the local
models are what this run measures).

Maths: client k's adapter after round t is ``x_k^t = train_k(x_k^{t'})``, where ``t'`` is the
last round before t in which k was sampled and trained (``x_k^0`` is the initial global adapter,
at k's rank); nothing is averaged, the global adapter stays ``x^t = x^0``. Every client trains
``train.local_steps`` steps in each round it is sampled, so the steps a client takes equal those
it takes under federation (the optimizer restarts every round, as under federation).

Decisions:

- **The global model** is the initial adapter ``x^0``: the ``global_eval`` records and the
  summary's ``global_loss`` of every round are the round-0 reference (the base model with its
  freshly initialised LoRA). The local models are measured by the ``local_eval`` records
  (their own test set and the global test set, each round a client trains) and the summary's
  ``local_own`` / ``local_global``; ``eval.local=false`` is refused, since nothing would
  measure them.
- **Bytes**: nothing travels. The downlink is not counted (``bytes_down`` 0: the client starts
  from what it kept), the uplink's adapter is empty (``bytes_up`` 0): the trained adapter goes
  in :attr:`Uplink.kept`, which :meth:`LocalOnly.aggregate` stores under
  ``state["clients"][str(index)]`` (checkpointed, so ``--resume`` is bit-exact).
- **A failed client** keeps the adapter of the last round it finished.
- **Export**: ``adapter/`` is the initial global adapter (what the global rows evaluate);
  ``adapter/clients/<client name>/`` is each client's own adapter (clients that trained at
  least once), at its own rank. A name that is not a plain file name becomes
  ``client-<index>``.
- Heterogeneous ranks (``lora.client_ranks``) work: a client starts from the initial adapter
  truncated to its rank and keeps its rank throughout.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from cllora.config import Config, ConfigError
from cllora.fed.algorithms.base import (
    Algorithm,
    ClientResult,
    Downlink,
    State,
    Trainee,
    Uplink,
)
from cllora.fed.strategy import AggregateResult
from cllora.model.lora import set_lora_state

KEPT = "adapter"  # the Uplink.kept entry holding the trained adapter


class LocalOnly(Algorithm):
    name = "local_only"
    keeps_client_state = True
    server_reads_kept = "it exports every client's own adapter"

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        if not cfg.eval.local:
            raise ConfigError(
                "fed.strategy=local_only measures the clients' own adapters, which only the "
                "local evaluation reads: set eval.local=true (its global model is the initial "
                "adapter)"
            )

    def kept(self) -> dict[str, State]:
        """Each client's own adapter, by client index (as a string)."""
        return self.state.get("clients", {})

    def trainees(self, chosen: list[int], names: list[str]) -> list[Trainee]:
        """As FedAvg; remembers the client names (data-derived, the same every round and on
        every process) for :meth:`export`."""
        self.state["names"] = {str(i): name for i, name in enumerate(names)}
        return super().trainees(chosen, names)

    def downlink(self, index: int, global_state: State) -> Downlink:
        """The client's own adapter of the last round it trained (the initial adapter at its
        rank before its first); nothing travels."""
        own = self.kept().get(str(index))
        start = own if own is not None else super().downlink(index, global_state).adapter
        return Downlink(start, counted=False)

    def uplink(self, index: int, down: Downlink, trained: State) -> Uplink:
        return Uplink(adapter={}, kept={KEPT: trained})

    def keep(self, index: int, kept: dict[str, State]) -> None:
        """The trained adapter becomes the client's own."""
        self.state["clients"] = {**self.kept(), str(index): kept[KEPT]}

    def aggregate(self, global_state: State, results: list[ClientResult]) -> AggregateResult:
        """The global adapter is unchanged (each trained adapter is kept by :meth:`keep`)."""
        info = {"strategy": self.name, "clients_with_own_adapter": len(self.kept())}
        return AggregateResult(global_state, {}, info)

    def export(self, model: torch.nn.Module, global_state: State, directory: Path) -> Path:
        """The initial global adapter in ``directory``, each client's own adapter in
        ``directory/clients/<name>`` (the model is left holding the global adapter)."""
        from cllora.model.adapter import save_adapter

        base = self.cfg.model.name
        for index, state in sorted(self.kept().items(), key=lambda kv: int(kv[0])):
            set_lora_state(model, state, resize=True)  # the config records the client's rank
            save_adapter(model, directory / "clients" / self._dir_name(index), base, state=state)
        set_lora_state(model, global_state, resize=True)
        return save_adapter(model, directory, base_model=base, state=global_state)

    def _dir_name(self, index: str) -> str:
        name = self.state.get("names", {}).get(index, "")
        plain = re.fullmatch(r"[A-Za-z0-9_.-]+", name) and name not in (".", "..")
        return name if plain else f"client-{index}"
