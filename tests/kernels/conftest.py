"""Fixtures for the kernel tests: poisoned allocations, fresh random inputs, a comparison helper.

The root ``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` when there is no CUDA, before any
kernel module is imported, so the Triton kernels run on CPU tensors (fp32 only).
"""

from __future__ import annotations

import importlib.util
import itertools

import pytest
import torch

if importlib.util.find_spec("triton") is None:  # no triton: nothing here can run
    collect_ignore_glob = ["test_*.py"]

_seed = itertools.count(1234)


@pytest.fixture(autouse=True)
def poison_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every ``torch.empty``/``empty_like`` made from Python is filled with NaN (floats), so an
    element a kernel forgets to write shows up as NaN in the comparisons."""
    real_empty, real_like = torch.empty, torch.empty_like

    def poison(t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_like(*a, **k)))


@pytest.fixture
def gen() -> torch.Generator:
    """A generator with a fresh seed for every test (inputs are random, never zeros)."""
    return torch.Generator().manual_seed(next(_seed))
