"""``fedadagrad`` (Reddi et al., 2021): as fedadam with ``v = v + d^2``.

Usage: ``cllora run fed.strategy=fedadagrad fed.server_lr=0.01`` (also ``fed.beta1``, ``fed.tau``;
``fed.beta2`` is not read: v is a sum).
The server state (step, moments) is checkpointed; see :mod:`cllora.fed.algorithms._fedopt`.
With bias correction only m is corrected: v is a sum, not an average.
"""

from __future__ import annotations

import torch

from cllora.fed.algorithms._fedopt import AdaptiveFedOpt


class FedAdagrad(AdaptiveFedOpt):
    name = "fedadagrad"
    settings = ("server_lr", "beta1", "tau")  # v is a sum: no beta2
    corrects_v = False

    def second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        return v + d2
