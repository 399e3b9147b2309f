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

Options: ``prox_mu`` adds FedProx's proximal term ``mu/2 * ||theta - theta_global||^2`` over the
adapter (mu = 0 is plain FedAvg training); ``freeze_a`` trains only B (FFA-LoRA, for the
``frozen_a`` strategy) and ``freeze_b`` only A; ``step_correction`` moves each adapter tensor by
``-lr * correction`` after every optimizer step (SCAFFOLD's ``c - c_i`` with an AdamW inner
optimizer: added to the gradient instead, AdamW's per-element normalisation would blow the
correction up to the size of a whole step; keys as in the state dict); ``steps`` overrides
``cfg.local_steps``; ``fail_after=k`` makes the client crash after k local steps with
:class:`SimulatedClientFailure` (the server's simulated client failures). The state passed in may
have another rank than the model's LoRA modules: they are resized to it.
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
    prox_mu: float = 0.0,
    freeze_a: bool = False,
    freeze_b: bool = False,
    step_correction: dict[str, torch.Tensor] | None = None,
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
    params, names = [], []
    for name, m in lora_modules(model).items():
        m.lora_A.requires_grad_(not freeze_a)
        m.lora_B.requires_grad_(not freeze_b)
        for part, frozen in (("lora_A", freeze_a), ("lora_B", freeze_b)):
            if not frozen:
                params.append(getattr(m, part))
                names.append(f"{name}.{part}")
    if not params:
        raise ValueError("freeze_a and freeze_b together leave nothing to train")
    corrections = _corrections(step_correction, names, params)
    anchors = [p.detach().clone() for p in params] if prox_mu > 0 else []
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
        if anchors:
            prox = sum(((p - a) ** 2).sum() for p, a in zip(params, anchors, strict=True))
            objective = loss + 0.5 * prox_mu * prox
        opt.zero_grad(set_to_none=True)
        objective.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        with torch.no_grad():
            for p, c in corrections:  # outside AdamW's normalisation: it keeps its scale
                p.add_(c, alpha=-cfg.lr)
        update.losses.append(float(loss.detach()))
        update.tokens_seen += tokens
        bar.set_postfix(loss=f"{update.losses[-1]:.3f}")
    model.eval()
    update.state = lora_state_dict(model)
    check_finite(update.state, "the client's updated adapter")  # e.g. an overflowing step
    update.seconds = time.perf_counter() - start
    return update


def _corrections(
    correction: dict[str, torch.Tensor] | None, names: list[str], params: list[torch.Tensor]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(parameter, tensor added to its gradient)`` pairs for the trained parameters."""
    if not correction:
        return []
    missing = [n for n in names if n not in correction]
    if missing:
        raise ValueError(f"step_correction lacks {missing[:3]}")
    return [(p, correction[n].to(p.device, p.dtype)) for n, p in zip(names, params, strict=True)]
