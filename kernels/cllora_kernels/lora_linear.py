"""Fused LoRA linear in Triton: ``y = x W^T + b + s (x A^T) B^T`` in one pass over y, with the
base weight dense (fp32/bf16/fp16) or NF4-packed as bitsandbytes stores it.

Usage::

    from cllora_kernels.lora_linear import lora_linear
    y = lora_linear(x, w, lora_A, lora_B, scaling)    # x (..., K), w (N, K), A (r, K), B (N, r)
    y = lora_linear(x, NF4Weight.from_bnb(lin4.weight), lora_A, lora_B, scaling, lin4.bias)

Prefer ``cllora_kernels.lora_linear`` (the dispatch). Dropout is not part of the fused path (the
caller falls back to the unfused module when LoRA dropout is active).

Kernels: the forward tile (BM, BN) accumulates ``x W^T`` and, in the same K loop, ``x A^T``
(BM, r); the LoRA term ``s (x A^T) B^T`` is added to the same accumulator before the single store
of y; the column-0 programs also store ``xa = x A^T`` (M, r) for the backward. The input-gradient
kernel does the same over N: ``dx = dy W + s (dy B) A`` and stores ``dyb = dy B`` (M, r). The
adapter gradients are two thin reductions over tokens: ``dA = s dyb^T x``, ``dB = s dy^T xa``.
NF4: each (BN, BK) weight tile is decoded in registers (byte ``i // 2``, high nibble for even
``i``, ``NF4[code] * absmax[i // blocksize]``, absmax itself decoded when double-quantized): the
full-size weight never exists in memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .nf4 import NF4_LEVELS, NF4Weight

BLOCK_M, BLOCK_N, BLOCK_K = 64, 64, 32
_LUT: dict[torch.device, torch.Tensor] = {}


@triton.jit
def _w_tile(
    w_ptr, absmax_ptr, code2_ptr, absmax2_ptr, lut_ptr, offset, rn, rk, N, K,
    stride_wn, stride_wk, blocksize, blocksize2, NF4: tl.constexpr, NESTED: tl.constexpr,
):  # fmt: skip
    """Weight tile W[rn, rk] (BN, BK) in fp32, decoded from NF4 when ``NF4``."""
    mask = (rn[:, None] < N) & (rk[None, :] < K)
    if NF4:
        idx = rn[:, None].to(tl.int64) * K + rk[None, :]  # flat row-major index
        byte = tl.load(w_ptr + idx // 2, mask=mask, other=0).to(tl.int32)
        code = tl.where(idx % 2 == 0, byte >> 4, byte & 15)
        level = tl.load(lut_ptr + code, mask=mask, other=0.0)
        blk = idx // blocksize
        if NESTED:
            q = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
            a2 = tl.load(absmax2_ptr + blk // blocksize2, mask=mask, other=0.0)
            scale = tl.load(code2_ptr + q, mask=mask, other=0.0) * a2 + offset
        else:
            scale = tl.load(absmax_ptr + blk, mask=mask, other=0.0)
        w = level * scale
    else:
        w = tl.load(w_ptr + rn[:, None] * stride_wn + rk[None, :] * stride_wk, mask=mask, other=0.0)
    return w.to(tl.float32)


@triton.jit
def _lora_fwd(
    x_ptr, a_ptr, b_ptr, bias_ptr, y_ptr, xa_ptr, M, N, K, R, scaling,
    w_ptr, absmax_ptr, code2_ptr, absmax2_ptr, lut_ptr, offset, stride_wn, stride_wk,
    blocksize, blocksize2, NF4: tl.constexpr, NESTED: tl.constexpr, HAS_BIAS: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rr = tl.arange(0, BR)
    acc = tl.zeros((BM, BN), tl.float32)
    xa = tl.zeros((BM, BR), tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        xmask = (rm[:, None] < M) & (rk[None, :] < K)
        x = tl.load(x_ptr + rm[:, None].to(tl.int64) * K + rk[None, :], mask=xmask, other=0.0)
        w = _w_tile(w_ptr, absmax_ptr, code2_ptr, absmax2_ptr, lut_ptr, offset, rn, rk, N, K,
                    stride_wn, stride_wk, blocksize, blocksize2, NF4, NESTED)  # fmt: skip
        acc += tl.dot(x, tl.trans(w.to(x.dtype)))  # (BM, BN)
        amask = (rr[:, None] < R) & (rk[None, :] < K)
        a = tl.load(a_ptr + rr[:, None] * K + rk[None, :], mask=amask, other=0.0)  # (BR, BK)
        xa += tl.dot(x.to(tl.float32), tl.trans(a))  # (BM, BR)
    bmask = (rn[:, None] < N) & (rr[None, :] < R)
    b = tl.load(b_ptr + rn[:, None] * R + rr[None, :], mask=bmask, other=0.0)  # (BN, BR)
    acc += scaling * tl.dot(xa, tl.trans(b))
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    ymask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(y_ptr + rm[:, None].to(tl.int64) * N + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=ymask)  # fmt: skip
    if pid_n == 0:
        rmask = (rm[:, None] < M) & (rr[None, :] < R)
        tl.store(xa_ptr + rm[:, None] * R + rr[None, :], xa, mask=rmask)


@triton.jit
def _lora_bwd_dx(
    dy_ptr, a_ptr, b_ptr, dx_ptr, dyb_ptr, M, N, K, R, scaling,
    w_ptr, absmax_ptr, code2_ptr, absmax2_ptr, lut_ptr, offset, stride_wn, stride_wk,
    blocksize, blocksize2, NF4: tl.constexpr, NESTED: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
):  # fmt: skip
    pid_m, pid_k = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rk = pid_k * BK + tl.arange(0, BK)
    rr = tl.arange(0, BR)
    acc = tl.zeros((BM, BK), tl.float32)
    dyb = tl.zeros((BM, BR), tl.float32)
    for n0 in range(0, N, BN):
        rn = n0 + tl.arange(0, BN)
        dmask = (rm[:, None] < M) & (rn[None, :] < N)
        dy = tl.load(dy_ptr + rm[:, None].to(tl.int64) * N + rn[None, :], mask=dmask, other=0.0)
        w = _w_tile(w_ptr, absmax_ptr, code2_ptr, absmax2_ptr, lut_ptr, offset, rn, rk, N, K,
                    stride_wn, stride_wk, blocksize, blocksize2, NF4, NESTED)  # fmt: skip
        acc += tl.dot(dy, w.to(dy.dtype))  # (BM, BK)
        bmask = (rn[:, None] < N) & (rr[None, :] < R)
        b = tl.load(b_ptr + rn[:, None] * R + rr[None, :], mask=bmask, other=0.0)  # (BN, BR)
        dyb += tl.dot(dy.to(tl.float32), b)  # (BM, BR)
    a = tl.load(a_ptr + rr[:, None] * K + rk[None, :], mask=(rr[:, None] < R) & (rk[None, :] < K),
                other=0.0)  # fmt: skip
    acc += scaling * tl.dot(dyb, a)
    xmask = (rm[:, None] < M) & (rk[None, :] < K)
    tl.store(dx_ptr + rm[:, None].to(tl.int64) * K + rk[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=xmask)  # fmt: skip
    if pid_k == 0:
        rmask = (rm[:, None] < M) & (rr[None, :] < R)
        tl.store(dyb_ptr + rm[:, None] * R + rr[None, :], dyb, mask=rmask)


@triton.jit
def _matmul_tn(
    x_ptr, y_ptr, c_ptr, M, P, Q, sxm, sxp, sym, syq, scale,
    BM: tl.constexpr, BP: tl.constexpr, BQ: tl.constexpr,
):  # fmt: skip
    """C (P, Q) = scale * X^T Y with X (M, P), Y (M, Q): a reduction over the token dim M."""
    rp = tl.program_id(0) * BP + tl.arange(0, BP)
    rq = tl.program_id(1) * BQ + tl.arange(0, BQ)
    acc = tl.zeros((BP, BQ), tl.float32)
    for m0 in range(0, M, BM):
        rm = m0 + tl.arange(0, BM)
        xm = (rm[:, None] < M) & (rp[None, :] < P)
        x = tl.load(x_ptr + rm[:, None].to(tl.int64) * sxm + rp[None, :] * sxp, mask=xm, other=0.0)
        ym = (rm[:, None] < M) & (rq[None, :] < Q)
        y = tl.load(y_ptr + rm[:, None].to(tl.int64) * sym + rq[None, :] * syq, mask=ym, other=0.0)
        acc += tl.dot(tl.trans(x.to(tl.float32)), y.to(tl.float32))  # (BP, BQ)
    cmask = (rp[:, None] < P) & (rq[None, :] < Q)
    c = (acc * scale).to(c_ptr.dtype.element_ty)
    tl.store(c_ptr + rp[:, None] * Q + rq[None, :], c, mask=cmask)


def _w_args(weight: torch.Tensor | NF4Weight) -> tuple:
    """The kernels' weight arguments (pointers, strides, NF4 fields, constexpr flags)."""
    if isinstance(weight, NF4Weight):
        dev = weight.device
        if dev not in _LUT:
            _LUT[dev] = torch.tensor(NF4_LEVELS, dtype=torch.float32, device=dev)
        absmax = weight.absmax if weight.nested else weight.absmax.float()
        c2 = weight.code2 if weight.nested else absmax
        a2 = weight.absmax2 if weight.nested else absmax
        return (weight.packed, absmax, c2, a2, _LUT[dev], weight.offset, 0, 0,
                weight.blocksize, weight.blocksize2, True, weight.nested)  # fmt: skip
    w = weight
    return (w, w, w, w, w, 0.0, w.stride(0), w.stride(1), 1, 1, False, False)


def _reduce_tn(x: torch.Tensor, y: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * x^T y`` (P, Q) fp32 for x (M, P), y (M, Q)."""
    m, p = x.shape
    q = y.shape[1]
    c = torch.empty((p, q), dtype=torch.float32, device=x.device)
    bp = max(16, min(64, triton.next_power_of_2(p)))
    bq = max(16, min(64, triton.next_power_of_2(q)))
    grid = (triton.cdiv(p, bp), triton.cdiv(q, bq))
    _matmul_tn[grid](x, y, c, m, p, q, *x.stride(), *y.stride(), scale, BM=64, BP=bp, BQ=bq)
    return c


def lora_forward(
    x2: torch.Tensor, weight: torch.Tensor | NF4Weight, a: torch.Tensor, b: torch.Tensor,
    scaling: float, bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Launch the fused forward on x2 (M, K): returns y (M, N) in x's dtype and xa (M, r) fp32."""
    m, k = x2.shape
    n, r = b.shape
    y = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    xa = torch.empty((m, r), dtype=torch.float32, device=x2.device)
    w = _w_args(weight)
    grid = (triton.cdiv(m, BLOCK_M), triton.cdiv(n, BLOCK_N))
    _lora_fwd[grid](
        x2, a, b, bias if bias is not None else b, y, xa, m, n, k, r, scaling, *w[:10],
        NF4=w[10], NESTED=w[11], HAS_BIAS=bias is not None,
        BM=BLOCK_M, BN=BLOCK_N, BK=BLOCK_K, BR=max(16, triton.next_power_of_2(r)),
    )  # fmt: skip
    return y, xa


def lora_backward_dx(
    dy: torch.Tensor, weight: torch.Tensor | NF4Weight, a: torch.Tensor, b: torch.Tensor,
    scaling: float, k: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """dx (M, K) = dy W + s (dy B) A, and dyb = dy B (M, r) fp32."""
    m, n = dy.shape
    r = b.shape[1]
    dx = torch.empty((m, k), dtype=dy.dtype, device=dy.device)
    dyb = torch.empty((m, r), dtype=torch.float32, device=dy.device)
    w = _w_args(weight)
    grid = (triton.cdiv(m, BLOCK_M), triton.cdiv(k, BLOCK_K))
    _lora_bwd_dx[grid](
        dy, a, b, dx, dyb, m, n, k, r, scaling, *w[:10], NF4=w[10], NESTED=w[11],
        BM=BLOCK_M, BN=BLOCK_N, BK=BLOCK_K, BR=max(16, triton.next_power_of_2(r)),
    )  # fmt: skip
    return dx, dyb


class LoRALinearFunction(torch.autograd.Function):
    """Forward: ``y = x W^T + bias + s (x A^T) B^T`` with ``xa = x A^T`` (M, r) kept.

    Backward: ``dx = dy W + s (dy B) A``, ``dA = s (dy B)^T x``, ``dB = s dy^T xa``; W and the
    bias are frozen (no gradient). Saved: x, xa, A, B and the (packed) weight.
    """

    @staticmethod
    def forward(ctx, x, dense_w, lora_A, lora_B, bias, nf4, scaling):
        weight = nf4 if nf4 is not None else dense_w
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()  # (M, K)
        a, b = lora_A.contiguous(), lora_B.contiguous()
        y, xa = lora_forward(x2, weight, a, b, scaling, bias)
        ctx.save_for_backward(x2, xa, a, b, dense_w)
        ctx.nf4, ctx.scaling, ctx.shape = nf4, scaling, shape
        return y.reshape(*shape[:-1], b.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x2, xa, a, b, dense_w = ctx.saved_tensors
        weight = ctx.nf4 if ctx.nf4 is not None else dense_w
        dy2 = dy.reshape(-1, dy.shape[-1]).contiguous()  # (M, N)
        s = ctx.scaling
        if ctx.needs_input_grad[0]:
            dx, dyb = lora_backward_dx(dy2, weight, a, b, s, x2.shape[1])
            dx = dx.reshape(ctx.shape)
        else:  # e.g. the first layer's projections: only dy B (M, r) is needed
            dx, dyb = None, dy2.float() @ b
        da = _reduce_tn(dyb, x2, s) if ctx.needs_input_grad[2] else None  # (r, K)
        db = _reduce_tn(dy2, xa, s) if ctx.needs_input_grad[3] else None  # (N, r)
        return dx, None, da, db, None, None, None


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor | NF4Weight,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x W^T + bias + scaling (x A^T) B^T`` with the Triton kernels (reference's signature)."""
    n, k = weight.shape if isinstance(weight, NF4Weight) else tuple(weight.shape)
    if x.shape[-1] != k or lora_A.shape[1] != k or lora_B.shape[0] != n:
        raise ValueError(
            f"shapes do not match: x {tuple(x.shape)}, W ({n}, {k}), A {tuple(lora_A.shape)}, "
            f"B {tuple(lora_B.shape)}"
        )
    if isinstance(weight, NF4Weight):
        return LoRALinearFunction.apply(x, None, lora_A, lora_B, bias, weight, float(scaling))
    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError("the fused LoRA linear gives no gradient for the base weight; freeze it")
    return LoRALinearFunction.apply(x, weight, lora_A, lora_B, bias, None, float(scaling))
