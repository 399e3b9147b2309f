"""The LM-loss path: the target-only head gives HF's own loss; chunked and fused modes give
plain cross-entropy (values, both gradients); evaluation rows add up to the batch loss."""

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


@pytest.mark.parametrize(
    ("n", "h", "v", "chunk", "dtype", "atol", "rtol"),
    [
        (37, 24, 101, 8, torch.float32, 1e-4, 1e-5),
        (1, 16, 50, 4, torch.float32, 1e-4, 1e-5),
        (300, 64, 1009, 128, torch.float32, 1e-3, 1e-5),
        (65, 32, 257, 1000, torch.float32, 1e-4, 1e-5),  # one chunk
        (50, 32, 300, 7, torch.bfloat16, 2e-1, 2e-2),
    ],
)
@pytest.mark.parametrize("mode", ["chunked", "fused"])
def test_chunked_modes_match_cross_entropy(mode, n, h, v, chunk, dtype, atol, rtol):
    g = torch.Generator().manual_seed(n)
    hidden = torch.randn(n, h, generator=g).to(dtype).requires_grad_()
    head = torch.nn.Linear(h, v, bias=False).to(dtype)
    head.weight.data = (torch.randn(v, h, generator=g) / h**0.5).to(dtype)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[::5] = -100
    ref = torch.nn.functional.cross_entropy(head(hidden).float(), targets, reduction="sum")
    got = loss_mod.head_loss_sum(head, hidden, targets, mode, chunk)
    torch.testing.assert_close(got, ref, atol=atol, rtol=rtol)
    upstream = torch.rand((), generator=g) + 0.5  # a non-unit incoming gradient
    gh_ref, gw_ref = torch.autograd.grad(ref * upstream, (hidden, head.weight))
    gh, gw = torch.autograd.grad(got * upstream, (hidden, head.weight), allow_unused=True)
    gw = torch.zeros_like(gw_ref) if gw is None else gw  # no target: the head is not used
    torch.testing.assert_close(gh, gh_ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(gw, gw_ref, atol=atol, rtol=rtol)


def test_frozen_head_gets_no_gradient_and_unknown_modes_are_refused():
    hidden = torch.randn(9, 8, requires_grad=True)
    head = torch.nn.Linear(8, 30, bias=False).requires_grad_(False)
    targets = torch.randint(0, 30, (9,))
    loss_mod.head_loss_sum(head, hidden, targets, "chunked", 4).backward()
    assert hidden.grad is not None and head.weight.grad is None
    with pytest.raises(ValueError, match="unknown loss mode"):
        loss_mod.head_loss_sum(head, hidden, targets, "magic")


def test_row_loss_sums_split_the_batch_loss_by_row(model):
    ids, mask, labels = _batch()
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    total, n = loss_mod.batch_loss_sum(model, batch)
    sums, counts = loss_mod.row_loss_sums(model, batch)
    assert counts == (labels[:, 1:] != -100).sum(1).tolist() and sum(counts) == n
    assert sum(sums) == pytest.approx(float(total), rel=1e-5)
    one, n0 = loss_mod.batch_loss_sum(model, {k: v[:1] for k, v in batch.items()})
    assert sums[0] == pytest.approx(float(one), rel=1e-5) and counts[0] == n0
