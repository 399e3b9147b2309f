"""``frozen_a`` (FFA-LoRA, Sun et al., 2024): A stays the shared random init, only B is trained
and averaged, ``B = sum_k w_k (s_k / s) B_k`` — exact, since every client shares A.

Usage: ``cllora run fed.strategy=frozen_a``. Needs one rank for every client.
"""

from __future__ import annotations

from cllora.config import Config, ConfigError
from cllora.fed.algorithms.base import Algorithm, Downlink, LocalRule


class FrozenA(Algorithm):
    name = "frozen_a"

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        if len(set(cfg.lora.client_ranks)) > 1:
            raise ConfigError(
                "fed.strategy=frozen_a needs one rank for every client: A is shared and frozen, "
                f"but lora.client_ranks={cfg.lora.client_ranks}"
            )

    def local_rule(self, index: int, down: Downlink) -> LocalRule:
        return LocalRule(freeze_a=True)
