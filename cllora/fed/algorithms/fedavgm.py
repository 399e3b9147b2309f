"""``fedavgm`` (Hsu et al., 2019): server momentum, ``m = beta m + d``, ``x += eta m``.

Usage: ``cllora run fed.strategy=fedavgm fed.server_lr=1.0 fed.server_momentum=0.9``. With
``d = fedavg(clients) - global``; ``server_lr=1`` and momentum 0 is FedAvg. The momentum is
checkpointed (:mod:`cllora.fed.algorithms._fedopt`).
"""

from __future__ import annotations

import torch

from cllora.fed.algorithms._fedopt import FedOpt, Moments


class FedAvgM(FedOpt):
    name = "fedavgm"
    default_server_lr = 1.0
    settings = ("server_lr", "server_momentum")
    moment_names = ("m",)

    def rule(
        self, x: torch.Tensor, d: torch.Tensor, prev: Moments, t: int
    ) -> tuple[torch.Tensor, Moments]:
        m = self.momentum * prev["m"] + d
        return x + self.lr * m, {"m": m}
