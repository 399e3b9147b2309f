"""The chunked linear cross-entropy equals plain cross-entropy: values and both gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cllora.model.chunked_loss import chunked_lm_loss_sum


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
def test_matches_cross_entropy(n, h, v, chunk, dtype, atol, rtol):
    g = torch.Generator().manual_seed(n)
    hidden = torch.randn(n, h, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) / h**0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g)
    targets[::5] = -100
    ref = F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")
    got = chunked_lm_loss_sum(hidden, weight, targets, chunk=chunk)
    torch.testing.assert_close(got, ref, atol=atol, rtol=rtol)
    upstream = torch.rand((), generator=g) + 0.5  # a non-unit incoming gradient
    gh_ref, gw_ref = torch.autograd.grad(ref * upstream, (hidden, weight))
    gh, gw = torch.autograd.grad(got * upstream, (hidden, weight))
    torch.testing.assert_close(gh, gh_ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(gw, gw_ref, atol=atol, rtol=rtol)


def test_frozen_weight_gets_no_gradient_and_bad_shapes_are_refused():
    hidden = torch.randn(9, 8, requires_grad=True)
    weight = torch.randn(30, 8)
    targets = torch.randint(0, 30, (9,))
    chunked_lm_loss_sum(hidden, weight, targets, chunk=4).backward()
    assert hidden.grad is not None and weight.grad is None
    with pytest.raises(ValueError, match="expected hidden"):
        chunked_lm_loss_sum(hidden[None], weight, targets)
