"""``fedyogi`` (Reddi et al., 2021): as fedadam with ``v = v - (1-b2) d^2 sign(v - d^2)``.

Usage: ``cllora run fed.strategy=fedyogi fed.server_lr=0.01`` (also ``fed.beta1``, ``fed.beta2``,
``fed.tau``).
The server state (step, moments) is checkpointed; see :mod:`cllora.fed.algorithms._fedopt`.
"""

from __future__ import annotations

from cllora.fed.algorithms._fedopt import FedOpt


class FedYogi(FedOpt):
    name = "fedyogi"
