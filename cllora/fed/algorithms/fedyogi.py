"""``fedyogi`` (Reddi et al., 2021): as fedadam with ``v = v - (1-b2) d^2 sign(v - d^2)``.

Usage: ``cllora run fed.strategy=fedyogi fed.server_lr=0.01`` (also ``fed.beta1``, ``fed.beta2``,
``fed.tau``).
The server state (step, moments) is checkpointed; see :mod:`cllora.fed.algorithms._fedopt`.
"""

from __future__ import annotations

import torch

from cllora.fed.algorithms._fedopt import AdaptiveFedOpt


class FedYogi(AdaptiveFedOpt):
    name = "fedyogi"

    def second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        return v - (1 - self.beta2) * d2 * torch.sign(v - d2)
