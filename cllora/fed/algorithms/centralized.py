"""``centralized``: every client's training data pooled into one trainer, the upper reference a
federation is measured against (the "centralized" baseline of FedLLM-Bench, Ye et al., 2024, and
of OpenFedLLM, Ye et al., 2024).

Usage: ``cllora run fed.strategy=centralized`` (one rank, ``fed.min_clients=1``, no simulated
failures).

Maths: each round, ``x^t = train_pool(x^{t-1}, m * train.local_steps)``: one trainer starts from
the global adapter and takes ``m * local_steps`` AdamW steps of ``train.batch_size`` samples
drawn from the union of every client's training samples, where ``m`` is the number of clients
the federation samples that round; its adapter is the new global adapter (weight 1). The total
steps and the batch size equal the federation's, so the runs differ only in where the data is.

Decisions:

- **The pool** is every client's training data (in client order; the batches are shuffled),
  not only the sampled clients': a central trainer holds all of it. The round still samples
  clients (the same seeded draw as the federation's) only to count the steps.
- **The trainee** is ``index=-1``, named ``__pooled__``: its local-training seed is client 0's
  of the round (``max(index, 0)``), its rank the global rank; it is evaluated only as the
  global model (no ``local_eval`` records; ``local_own`` / ``local_global`` stay NaN).
- **Bytes**: nothing federated travels: ``bytes_down`` and ``bytes_up`` are 0 (the trainer is
  the server; the data it would gather once is not counted). The trained adapter goes in
  :attr:`Uplink.kept`, and the uplink's counted adapter is empty.
- **Refused** (:class:`~cllora.config.ConfigError`): ``lora.client_ranks`` (one trainer has one
  rank), ``fed.min_clients`` > 1 (there is one trainee a round) and
  ``fed.client_failure_rate`` > 0 (a failure of the only trainer would stop the run).
"""

from __future__ import annotations

from cllora.config import Config, ConfigError
from cllora.fed.algorithms.base import Algorithm, ClientResult, Downlink, State, Trainee, Uplink
from cllora.fed.strategy import AggregateResult

POOLED = "__pooled__"
KEPT = "adapter"  # the Uplink.kept entry holding the trained adapter


class Centralized(Algorithm):
    name = "centralized"
    pools_client_data = True

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        refused = []
        if cfg.lora.client_ranks:
            refused.append(f"lora.client_ranks={cfg.lora.client_ranks} (one trainer, one rank)")
        if cfg.fed.min_clients > 1:
            refused.append(f"fed.min_clients={cfg.fed.min_clients} (one trainee a round)")
        if cfg.fed.client_failure_rate > 0:
            refused.append(
                f"fed.client_failure_rate={cfg.fed.client_failure_rate} (the only trainer "
                "failing would stop the run)"
            )
        if refused:
            raise ConfigError(
                "fed.strategy=centralized trains one pooled trainer; it cannot run with "
                + "; ".join(refused)
            )

    def trainees(self, chosen: list[int], names: list[str]) -> list[Trainee]:
        """One trainer on every client's training data, for the sampled clients' total steps."""
        steps = len(chosen) * self.cfg.train.local_steps
        return [Trainee(-1, POOLED, steps, sources=tuple(range(len(names))))]

    def downlink(self, index: int, global_state: State) -> Downlink:
        return Downlink(global_state, counted=False)

    def uplink(self, index: int, down: Downlink, trained: State) -> Uplink:
        return Uplink(adapter={}, kept={KEPT: trained})

    def keep(self, index: int, kept: dict[str, State]) -> None:
        """Nothing is kept per client: the pooled trainer's adapter is the new global one."""

    def aggregate(self, global_state: State, results: list[ClientResult]) -> AggregateResult:
        """The pooled trainer's adapter is the new global adapter."""
        if not results:  # the trainer failed (min_clients stops the run before this)
            return AggregateResult(global_state, {}, {"strategy": self.name})
        if len(results) != 1:
            raise ValueError(f"centralized has one trainee a round, got {len(results)} uplinks")
        return AggregateResult(results[0].uplink.kept[KEPT], {}, {"strategy": self.name})
