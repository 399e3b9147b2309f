"""``frozen_a`` (FFA-LoRA, Sun et al., 2024): A stays the shared random init, only B is trained
and averaged, ``B = sum_k w_k (s_k / s) B_k`` — exact, since every client shares A.

Usage: ``cllora run fed.strategy=frozen_a``. Needs one rank for every client.

Bytes: only B travels, both ways. A is the shared initialisation every client builds from the
run's seed (FFA-LoRA's premise), so the downlink counts B alone and the uplink holds B alone;
the server puts its own (unchanged) A back before aggregating
(:func:`cllora.fed.strategy.frozen_a_aggregate`). The clients train B only (:class:`FreezeA`, a
:class:`~cllora.fed.local_rule.LocalRule`).
"""

from __future__ import annotations

from dataclasses import dataclass

from cllora.config import Config, ConfigError
from cllora.fed.algorithms.base import (
    Algorithm,
    ClientResult,
    Downlink,
    State,
    Uplink,
    a_part,
    b_part,
)
from cllora.fed.local_rule import LocalRule
from cllora.fed.lora_algebra import A_SUFFIX
from cllora.fed.strategy import AggregateResult, frozen_a_aggregate
from cllora.model.lora import state_nbytes


@dataclass
class SharedInitDownlink(Downlink):
    """The global adapter, of which only B is counted: A is the client's own seeded init."""

    def nbytes(self) -> int:
        if not self.counted:
            return 0
        extra = sum(state_nbytes(s) for s in self.extra.values())
        return state_nbytes(b_part(self.adapter)) + extra


class FreezeA(LocalRule):
    """Only the B factors train; every A keeps its starting value."""

    def trains(self, name: str) -> bool:
        return not name.endswith(A_SUFFIX)


class FrozenA(Algorithm):
    name = "frozen_a"

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        if len(set(cfg.lora.client_ranks)) > 1:
            raise ConfigError(
                "fed.strategy=frozen_a needs one rank for every client: A is shared and frozen, "
                f"but lora.client_ranks={cfg.lora.client_ranks}"
            )

    def local_rules(self, index: int, down: Downlink) -> list[LocalRule]:
        return [FreezeA()]

    def downlink(self, index: int, global_state: State) -> Downlink:
        return SharedInitDownlink(global_state)

    def uplink(self, index: int, down: Downlink, trained: State) -> Uplink:
        return Uplink(b_part(trained))

    def aggregate(self, global_state: State, results: list[ClientResult]) -> AggregateResult:
        shared_a = a_part(global_state)
        return frozen_a_aggregate(
            global_state,
            [{**shared_a, **r.uplink.adapter} for r in results],
            [r.weight for r in results],
            *self.scalings(results),
        )
