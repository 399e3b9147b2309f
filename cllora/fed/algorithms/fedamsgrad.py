"""``fedamsgrad`` (FedAMSGrad, Tong, Liang and Bi, 2020): AMSGrad (Reddi, Kale and Kumar, 2018)
as the server optimizer, ``m = b1 m + (1-b1) d``, ``v = b2 v + (1-b2) d^2``,
``v_hat = max(v_hat, v)``, ``x += eta m / (sqrt(v_hat) + tau)``.

Usage: ``cllora run fed.strategy=fedamsgrad fed.server_lr=0.01`` (also ``fed.beta1``,
``fed.beta2``, ``fed.tau``). As FedAdam, but the step is normalised by the largest second moment
seen so far, so an element's effective learning rate never grows again after a burst of large
pseudo-gradients. ``v`` and ``v_hat`` start at ``tau^2`` (as the FedOpt family's ``v_0``).
With bias correction (not a config key), ``m`` and ``v_hat`` are divided by ``1 - b1^t`` and
``1 - b2^t`` after the maximum of the uncorrected moments, as PyTorch's ``Adam(amsgrad=True)``.
The server state (step, ``m``, ``v``, ``v_hat``) is checkpointed; see
:mod:`cllora.fed.algorithms._fedopt`.
"""

from __future__ import annotations

import torch

from cllora.fed.algorithms._fedopt import AdaptiveFedOpt, Moments


class FedAMSGrad(AdaptiveFedOpt):
    name = "fedamsgrad"
    moment_names = ("m", "v", "v_hat")

    def second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        return self.beta2 * v + (1 - self.beta2) * d2

    def normaliser(self, new: Moments, prev: Moments) -> torch.Tensor:
        new["v_hat"] = torch.maximum(prev["v_hat"], new["v"])
        return new["v_hat"]
