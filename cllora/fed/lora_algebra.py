"""Low-rank algebra on LoRA adapter state dicts: key checks, rank padding, SVD re-factoring.

Usage::

    from cllora.fed.lora_algebra import lowrank_svd, modules_of, pad_rank, refactor
    from cllora.fed.lora_algebra import to_client_rank

    mods = modules_of(state)          # ["layers.0.q_proj", ...]; A/B pairs and shapes checked
    A, B = pad_rank(state[m + ".lora_A"], state[m + ".lora_B"], 8)  # zero rows of A, cols of B
    U, S, Vh = lowrank_svd([B1, B2], [A1, A2], [0.5, 0.5])    # SVD of 0.5 B1 A1 + 0.5 B2 A2
    A, B, discarded, total = refactor(U, S, Vh, r=4, scaling=2.0)  # 2.0 * B A = rank-4 truncation
    small = to_client_rank(global_state, 4, global_scaling=2.0, client_scaling=4.0)

An adapter holds ``<module>.lora_A`` (r, in) and ``<module>.lora_B`` (out, r); the module's update
is ``scaling * B @ A`` (``scaling = alpha / r``). :func:`lowrank_svd` never forms the dense
(out, in) sum: it stacks ``P = [sqrt(c_k) B_k]`` (out, R) and ``Q = [sqrt(c_k) A_k]`` (R, in),
``R = sum_k r_k``, so that ``P Q = sum_k c_k B_k A_k``; with reduced QRs ``P = Q_1 R_1`` and
``Q^T = Q_2 R_2`` the sum is ``Q_1 (R_1 R_2^T) Q_2^T`` and only the small (R, R) core is
decomposed. Everything is computed in fp32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

A_SUFFIX = ".lora_A"
B_SUFFIX = ".lora_B"
SPLITS = ("sqrt", "b")


def modules_of(state: dict[str, torch.Tensor]) -> list[str]:
    """Sorted module names of an adapter; raises unless every key is one of a complete A/B pair."""
    mods = set()
    for key in state:
        if key.endswith(A_SUFFIX):
            mods.add(key[: -len(A_SUFFIX)])
        elif key.endswith(B_SUFFIX):
            mods.add(key[: -len(B_SUFFIX)])
        else:
            raise ValueError(f"{key!r} is not a LoRA tensor (keys end in .lora_A or .lora_B)")
    for m in sorted(mods):
        a, b = state.get(m + A_SUFFIX), state.get(m + B_SUFFIX)
        if a is None or b is None:
            part = "lora_A" if a is None else "lora_B"
            raise ValueError(f"module {m!r} has no {part}: adapters hold A/B pairs")
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(
                f"module {m!r}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} are not "
                "(r, in) and (out, r) with the same r"
            )
    return sorted(mods)


def rank_dim(key: str) -> int:
    """The rank dimension of an adapter tensor: rows of A (0), columns of B (1)."""
    return 0 if key.endswith(A_SUFFIX) else 1


def pad_tensor(key: str, t: torch.Tensor, r: int, value: float = 0.0) -> torch.Tensor:
    """``t`` (A or B, by ``key``) padded with ``value`` along its rank dimension up to ``r``."""
    dim = rank_dim(key)
    extra = r - t.shape[dim]
    if extra < 0:
        raise ValueError(f"{key}: cannot pad rank {t.shape[dim]} down to {r}")
    if extra == 0:
        return t
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([t, t.new_full(shape, value)], dim=dim)


def pad_rank(A: torch.Tensor, B: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad ``A`` (r_k, in) to (r, in) and ``B`` (out, r_k) to (out, r); ``B A`` is kept."""
    return pad_tensor(A_SUFFIX, A, r), pad_tensor(B_SUFFIX, B, r)


def lowrank_svd(
    Bs: Sequence[torch.Tensor], As: Sequence[torch.Tensor], coefs: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``U diag(S) Vh`` of ``sum_k coefs[k] * Bs[k] @ As[k]`` without the dense sum.

    ``coefs`` must be >= 0. Returns fp32 ``U`` (out, k), ``S`` (k,) descending, ``Vh`` (k, in),
    ``k = min(out, in, sum_k r_k)``.
    """
    if not Bs or len(Bs) != len(As) or len(As) != len(coefs):
        raise ValueError(
            f"need matching non-empty factor lists, got {len(Bs)}, {len(As)}, {len(coefs)}"
        )
    if any(c < 0 for c in coefs):
        raise ValueError(f"lowrank_svd needs coefficients >= 0, got {list(coefs)}")
    roots = [math.sqrt(c) for c in coefs]
    P = torch.cat([b.float() * s for b, s in zip(Bs, roots, strict=True)], dim=1)  # (out, R)
    Q = torch.cat([a.float() * s for a, s in zip(As, roots, strict=True)], dim=0)  # (R, in)
    Q1, R1 = torch.linalg.qr(P)  # (out, p), (p, R)
    Q2, R2 = torch.linalg.qr(Q.T)  # (in, q), (q, R)
    U, S, Vh = torch.linalg.svd(R1 @ R2.T, full_matrices=False)  # (p, k), (k,), (k, q)
    return Q1 @ U, S, Vh @ Q2.T


def refactor(
    U: torch.Tensor,
    S: torch.Tensor,
    Vh: torch.Tensor,
    r: int,
    scaling: float = 1.0,
    split: str = "sqrt",
    fill_A: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Rank-``r`` factors of ``U diag(S) Vh``: ``scaling * B @ A`` is its best rank-r approximation.

    ``split="sqrt"``: ``B = U sqrt(S / scaling)``, ``A = sqrt(S / scaling) Vh`` (balanced);
    ``split="b"``: ``B = U S / scaling``, ``A = Vh`` (orthonormal rows, as FedSVD).
    Components with a zero singular value (or beyond ``len(S)``) get a zero column in ``B`` and
    row ``j`` of ``fill_A`` (r, in) in ``A`` (zeros without it): their product is zero either
    way, but ``A = B = 0`` would never receive a gradient again. Returns fp32 ``A`` (r, in),
    ``B`` (out, r), and the discarded and total energy ``sum S[r:]^2`` and ``sum S^2``.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed: {SPLITS}")
    if not scaling > 0:
        raise ValueError(f"scaling must be > 0, got {scaling}")
    out, n_in = U.shape[0], Vh.shape[1]
    energy = S.double() ** 2
    total, discarded = float(energy.sum()), float(energy[r:].sum())
    keep = min(r, S.numel())
    tol = float(S.max()) * max(out, n_in) * torch.finfo(torch.float32).eps if S.numel() else 0.0
    s = S[:keep].float()
    live = s > tol
    if fill_A is not None:
        if tuple(fill_A.shape) != (r, n_in):
            raise ValueError(f"fill_A must be ({r}, {n_in}), got {tuple(fill_A.shape)}")
        A = fill_A.float().clone().to(U.device)
    else:
        A = torch.zeros(r, n_in, device=U.device)
    B = torch.zeros(out, r, device=U.device)
    s = torch.where(live, s, torch.zeros_like(s)) / scaling
    if split == "sqrt":
        B[:, :keep] = U[:, :keep] * s.sqrt()
        live_rows = s.sqrt()[:, None] * Vh[:keep]
    else:
        B[:, :keep] = U[:, :keep] * s
        live_rows = Vh[:keep].float()
    A[:keep] = torch.where(live[:, None], live_rows, A[:keep])
    return A, B, discarded, total


def to_client_rank(
    global_state: dict[str, torch.Tensor],
    r: int,
    global_scaling: float = 1.0,
    client_scaling: float | None = None,
    split: str = "sqrt",
) -> dict[str, torch.Tensor]:
    """Re-factor a global adapter down to rank ``r`` for a low-rank client (truncated SVD).

    ``client_scaling * B_c @ A_c`` is the best rank-r approximation of ``global_scaling * B @ A``
    per module (``client_scaling`` defaults to ``global_scaling``). At ``r`` equal to the global
    rank the factors are kept (B rescaled by the scaling ratio); a larger ``r`` is refused
    (zero-pad instead). Zero-singular-value components take the global's A row of the same index.
    """
    client_scaling = global_scaling if client_scaling is None else client_scaling
    if r < 1:
        raise ValueError(f"client rank must be >= 1, got {r}")
    if not (global_scaling > 0 and client_scaling > 0):
        raise ValueError(f"scalings must be > 0, got {global_scaling} and {client_scaling}")
    out = {}
    for m in modules_of(global_state):
        A, B = global_state[m + A_SUFFIX], global_state[m + B_SUFFIX]
        rank = A.shape[0]
        if r > rank:
            raise ValueError(f"{m}: client rank {r} exceeds the global rank {rank}; zero-pad it")
        if r == rank:
            A_c, B_c = A.float().clone(), B.float() * (global_scaling / client_scaling)
        else:
            U, S, Vh = lowrank_svd([B], [A], [global_scaling])
            A_c, B_c, _, _ = refactor(U, S, Vh, r, client_scaling, split, fill_A=A[:r])
        out[m + A_SUFFIX], out[m + B_SUFFIX] = A_c.to(A.dtype), B_c.to(B.dtype)
    return out
