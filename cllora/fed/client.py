"""Local training of one client: start from the global adapter, run K AdamW steps, return.

Usage::

    from cllora.fed.client import client_update
    update = client_update(model, global_state, client.train, cfg.train, pad_id, seed=123)
    update.state        # the client's adapter after training (detached copy)
    update.losses       # train loss of every local step

``client_update`` is a function of (global adapter, client data, settings, seed) only: the shared
base model is a workspace whose LoRA tensors it overwrites. A fresh AdamW is made per call (the
optimizer state does not travel, as in FedAvg). A non-finite loss stops the client with
:class:`NonFiniteLossError`, and a non-finite adapter after the last step (the loss before each
step cannot see the last one) with :class:`cllora.fed.guards.NonFiniteError`, so the server can
reject that update and go on.

Options: ``rules`` change local training the way an algorithm needs (:mod:`cllora.fed.local_rule`:
FedProx's proximal term, FFA-LoRA's frozen A, SCAFFOLD's step correction; none is plain AdamW on
A and B); ``steps`` overrides ``cfg.local_steps``; ``fail_after=k`` makes the client crash after
k local steps with :class:`SimulatedClientFailure` (the server's simulated client failures). The
state passed in may have another rank than the model's LoRA modules: they are resized to it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from cllora.config import TrainConfig
from cllora.data.formatting import Sample
from cllora.fed.guards import check_finite
from cllora.fed.local_rule import LocalRule
from cllora.model.batching import batch_stream, collate
from cllora.model.lora import lora_modules, lora_state_dict, set_lora_state
from cllora.model.loss import batch_loss_sum
from cllora.model.packing import collate_packed


class NonFiniteLossError(FloatingPointError):
    """A local step produced a NaN or infinite loss; the client's update must be rejected."""


class SimulatedClientFailure(RuntimeError):
    """A client crash injected by ``fed.client_failure_rate`` (robustness experiments, tests)."""


@dataclass
class ClientUpdate:
    state: dict[str, torch.Tensor]
    losses: list[float] = field(default_factory=list)
    samples: int = 0  # training samples the client holds (the FedAvg weight)
    tokens_seen: int = 0  # tokens in the batches it trained on
    seconds: float = 0.0


def _step_loss(
    model: PreTrainedModel, samples: Sequence[Sample], cfg: TrainConfig, pad_id: int
) -> tuple[torch.Tensor, int, int]:
    """(summed loss, target count, real tokens) of one step's samples: one packed row when
    ``cfg.packing`` (no padding), else a right-padded batch."""
    if cfg.packing:
        b = collate_packed(samples)
        loss_sum, n = batch_loss_sum(model, b, cfg.loss, cfg.loss_chunk)
        return loss_sum, n, int(b["input_ids"].numel())
    b = collate(samples, pad_id)
    loss_sum, n = batch_loss_sum(model, b, cfg.loss, cfg.loss_chunk)
    return loss_sum, n, int(b["attention_mask"].sum())


def client_update(
    model: PreTrainedModel,
    global_state: dict[str, torch.Tensor],
    train: Sequence[Sample],
    cfg: TrainConfig,
    pad_id: int,
    seed: int,
    *,
    rules: Sequence[LocalRule] = (),
    steps: int | None = None,
    fail_after: int | None = None,
    desc: str | None = None,
    progress: bool = False,
) -> ClientUpdate:
    """Train the LoRA adapter from ``global_state`` on ``train`` for ``steps`` steps (default
    ``cfg.local_steps``); options in the module doc."""
    start = time.perf_counter()
    set_lora_state(model, global_state, resize=True)
    torch.manual_seed(seed)  # dropout
    stream = batch_stream(train, cfg.batch_size, torch.Generator().manual_seed(seed))
    names, params = _trained(model, rules)
    for rule in rules:
        rule.start(names, params)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    model.train()
    update = ClientUpdate(state={}, samples=len(train))
    n_steps = cfg.local_steps if steps is None else steps
    bar = tqdm(range(n_steps), desc=desc, leave=False, disable=not progress)
    for step in bar:
        if fail_after is not None and step >= fail_after:
            model.eval()
            raise SimulatedClientFailure(f"simulated crash after {step} local steps")
        loss_sum, n, tokens = _step_loss(model, next(stream), cfg, pad_id)
        loss = loss_sum / max(n, 1)
        if not torch.isfinite(loss):
            model.eval()
            raise NonFiniteLossError(f"loss is {float(loss)} at local step {step}")
        objective = loss
        for rule in rules:
            term = rule.penalty(params)
            if term is not None:
                objective = objective + term
        opt.zero_grad(set_to_none=True)
        objective.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        for rule in rules:
            rule.after_step(cfg.lr)
        update.losses.append(float(loss.detach()))
        update.tokens_seen += tokens
        bar.set_postfix(loss=f"{update.losses[-1]:.3f}")
    model.eval()
    update.state = lora_state_dict(model)
    check_finite(update.state, "the client's updated adapter")  # e.g. an overflowing step
    update.seconds = time.perf_counter() - start
    return update


def _trained(
    model: PreTrainedModel, rules: Sequence[LocalRule]
) -> tuple[list[str], list[torch.Tensor]]:
    """Names and tensors of the LoRA factors every rule lets train (module order, A then B);
    the others have ``requires_grad`` off."""
    names, params = [], []
    for name, m in lora_modules(model).items():
        for part in ("lora_A", "lora_B"):
            p, full = getattr(m, part), f"{name}.{part}"
            trains = all(rule.trains(full) for rule in rules)
            p.requires_grad_(trains)
            if trains:
                names.append(full)
                params.append(p)
    if not params:
        raise ValueError("the local rules leave nothing to train")
    return names, params
