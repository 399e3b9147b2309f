"""lm_loss_sum: the target-only LM head gives HF's own loss; the chunked path gives the same."""

from __future__ import annotations

import pytest
import torch

import cllora.model.loss as loss_mod
from cllora.config import ModelConfig
from cllora.model.load import load_model
from cllora.model.lora import inject_lora, lora_parameters


@pytest.fixture(scope="module")
def model():
    m, _ = load_model(ModelConfig(name="tiny-qwen2", dtype="fp32"))
    torch.manual_seed(0)
    inject_lora(m, r=4, alpha=8)
    for p in lora_parameters(m):
        p.data.normal_(0, 0.05)
        p.requires_grad_(True)
    return m


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 4000, (3, 29), generator=g)
    labels = ids.clone()
    labels[:, :7] = -100  # prompt
    labels[2, 20:] = -100  # padding of the last row
    mask = torch.ones_like(ids)
    mask[2, 20:] = 0
    return ids, mask, labels


def test_matches_hf_loss(model):
    ids, mask, labels = _batch()
    s, n = loss_mod.lm_loss_sum(model, ids, mask, labels)
    hf = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(s / n, hf, rtol=1e-5, atol=1e-6)
    assert n == int((labels[:, 1:] != -100).sum())


def test_chunked_path_equals_plain(model, monkeypatch):
    ids, mask, labels = _batch()
    s1, n1 = loss_mod.lm_loss_sum(model, ids, mask, labels)
    g1 = torch.autograd.grad(s1, lora_parameters(model))
    monkeypatch.setattr(loss_mod, "CHUNKED_LOGITS", 0)  # force the chunked path at this size
    s2, n2 = loss_mod.lm_loss_sum(model, ids, mask, labels)
    g2 = torch.autograd.grad(s2, lora_parameters(model))
    assert n1 == n2
    torch.testing.assert_close(s2, s1, rtol=1e-5, atol=1e-4)
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_no_targets_gives_zero(model):
    ids, mask, labels = _batch()
    s, n = loss_mod.lm_loss_sum(model, ids, mask, torch.full_like(labels, -100))
    assert n == 0 and float(s) == 0.0


def test_ignore_index_is_one_value():
    """cllora defines it once (data layer); the kernel package, which imports nothing of
    cllora, must hold the same value."""
    from cllora_kernels.reference import IGNORE_INDEX as KERNELS

    from cllora.data.formatting import IGNORE_INDEX

    assert IGNORE_INDEX == KERNELS == -100
