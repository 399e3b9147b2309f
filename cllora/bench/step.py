"""One training step of a provider: the batch it takes and the forward + backward it runs.

Usage::

    from cllora.bench.providers import parse_provider
    from cllora.bench.step import collate_step, training_step

    provider = parse_provider("cllora")
    batch = {k: v.to(device) if hasattr(v, "to") else v
             for k, v in collate_step(provider, samples).items()}
    run = training_step(provider, model, batch)    # a closure: forward, loss, backward
    run(); opt.step(); opt.zero_grad(set_to_none=True)

The benchmark (:mod:`cllora.bench.cells`) times ``run`` on real tensors; the planner
(:mod:`cllora.plan.step`) traces the same ``run`` on fake ones, so what is measured and what
is planned is one step. A ``cllora*`` provider's batch is packed (one row per sequence when
every sequence has the same length, the ``fixed`` workload; every sample in one row
otherwise) and its loss is :func:`cllora.model.loss.batch_loss_sum` over the target positions,
divided by their count; the transformers + PEFT providers get a right-padded batch and
``model(**batch).loss`` (full logits). Collation and the copy to the device stay outside
``run``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cllora.bench.providers import Provider


def collate_step(provider: Provider, samples: list) -> dict:
    """The CPU batch of one step of ``samples`` (:class:`cllora.data.formatting.Sample`), as
    ``provider``'s step takes it."""
    if provider.is_cllora:
        from cllora.model.packing import collate_packed, collate_packed_rows

        same = all(len(s.input_ids) == len(samples[0].input_ids) for s in samples)
        # fixed: one row per sequence; real: the step's samples packed into one row
        return collate_packed_rows([[s] for s in samples], 0) if same else collate_packed(samples)
    from cllora.model.batching import collate

    return collate(samples, pad_id=0)


def training_step(
    provider: Provider, model: Any, batch: dict, loss: str = "auto", chunk: int = 0
) -> Callable[[], None]:
    """A closure running forward, loss and backward of ``batch`` (already where ``model`` is).

    ``loss`` / ``chunk`` are ``train.loss`` / ``train.loss_chunk`` of a ``cllora*`` provider
    (the others compute transformers' own loss)."""
    if provider.is_cllora:
        from cllora.model.loss import batch_loss_sum

        def run() -> None:
            out, n = batch_loss_sum(model, batch, loss=loss, chunk=chunk)
            (out / max(n, 1)).backward()

        return run

    def run_peft() -> None:
        model(**batch).loss.backward()

    return run_peft
