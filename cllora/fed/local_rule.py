"""How a client's local training differs from plain AdamW on A and B: rules an algorithm returns.

Usage::

    from cllora.fed.client import client_update
    from cllora.fed.algorithms.fedprox import ProximalTerm
    rules = algorithm.local_rules(i, down)     # e.g. [ProximalTerm(0.01)]
    client_update(model, down.adapter, train, cfg.train, pad_id, seed=1, rules=rules)

A rule is a :class:`LocalRule` with four hooks, each a no-op here, that
:func:`cllora.fed.client.client_update` calls in this order:

- :meth:`LocalRule.trains` — whether an adapter tensor (``"<module>.lora_A"`` /
  ``"<module>.lora_B"``) is trained; a tensor any rule declines stays frozen;
- :meth:`LocalRule.start` — once, with the names and tensors that train, before the first
  step (a rule keeps what it needs: the starting values, the matching corrections);
- :meth:`LocalRule.penalty` — a term added to each step's loss (``objective = loss + term``,
  rule by rule), or None;
- :meth:`LocalRule.after_step` — after each optimizer step, with the learning rate.

Concrete rules live next to the algorithm that uses them: ``ProximalTerm`` in
:mod:`cllora.fed.algorithms.fedprox`, ``FreezeA`` in :mod:`cllora.fed.algorithms.frozen_a`,
``StepCorrection`` in :mod:`cllora.fed.algorithms.scaffold`. A rule object is made per client
and round by ``Algorithm.local_rules``; it may keep state between :meth:`LocalRule.start` and
the last step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class LocalRule:
    """A change to local training; every hook defaults to "no change"."""

    def trains(self, name: str) -> bool:
        """Whether the adapter tensor ``name`` (``<module>.lora_A`` / ``.lora_B``) trains."""
        return True

    def start(self, names: Sequence[str], params: Sequence[torch.Tensor]) -> None:
        """Called once before the first step with the trained tensors and their names."""

    def penalty(self, params: Sequence[torch.Tensor]) -> torch.Tensor | None:
        """A term added to the step's loss (None: nothing), from the trained tensors."""
        return None

    def after_step(self, lr: float) -> None:
        """Called after every optimizer step (``lr``: the local learning rate)."""
