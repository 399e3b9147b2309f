"""Helpers of the kernel tests: random inputs and a comparison that rejects NaN."""

from __future__ import annotations

import os

import torch


def randn(gen: torch.Generator, *shape: int, scale: float = 1.0, grad: bool = False,
          dtype: torch.dtype = torch.float32, device: str = "cpu") -> torch.Tensor:  # fmt: skip
    t = (torch.randn(shape, generator=gen) * scale).to(device=device, dtype=dtype)
    return t.requires_grad_(grad)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float,
                 what: str = "") -> float:  # fmt: skip
    """``torch.testing.assert_close`` (NaN never equal) that returns the max abs error.

    With ``CLLORA_KERNEL_ERRORS=FILE`` each comparison appends "test<TAB>what<TAB>max abs error"
    to FILE: the table of max errors per kernel and shape quoted in kernels/README.md."""
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    assert not torch.isnan(actual).any(), f"{what}: NaN (unwritten element?)"
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol, msg=what)
    err = (actual.detach().float() - expected.detach().float()).abs()
    worst = float(err.max()) if actual.numel() else 0.0
    if os.environ.get("CLLORA_KERNEL_ERRORS"):
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
        with open(os.environ["CLLORA_KERNEL_ERRORS"], "a") as f:
            f.write(f"{test}\t{what}\t{worst:.3g}\n")
    return worst
