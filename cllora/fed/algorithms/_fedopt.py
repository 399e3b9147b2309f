"""The FedOpt family (Reddi et al., 2021): a server optimizer on the averaged update.

Not an algorithm file itself: ``fedavgm``, ``fedadam``, ``fedyogi`` and ``fedadagrad`` each
subclass :class:`FedOpt`. The pseudo-gradient ``d = fedavg(clients) - global`` drives one step
of the server optimizer (rules in :func:`cllora.fed.strategy.server_step`); its moments are
``self.state["server"]`` (checkpointed). ``fed.server_lr`` empty takes the class's default.
"""

from __future__ import annotations

from cllora.fed.algorithms.base import Algorithm


class FedOpt(Algorithm):
    default_server_lr = 1e-2
