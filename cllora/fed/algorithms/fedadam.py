"""``fedadam`` (Reddi et al., 2021): ``m = b1 m + (1-b1) d``, ``v = b2 v + (1-b2) d^2``,
``x += eta m / (sqrt(v) + tau)``.

Usage: ``cllora run fed.strategy=fedadam fed.server_lr=0.01`` (also ``fed.beta1``, ``fed.beta2``,
``fed.tau``).
The server state (step, moments) is checkpointed; see :mod:`cllora.fed.algorithms._fedopt`.
"""

from __future__ import annotations

import torch

from cllora.fed.algorithms._fedopt import AdaptiveFedOpt


class FedAdam(AdaptiveFedOpt):
    name = "fedadam"

    def second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        return self.beta2 * v + (1 - self.beta2) * d2
