"""Fused attention in Triton: O = softmax(Q K^T / sqrt(D)) V without materializing the (Lq, Lk) score matrix.

Forward (FlashAttention-2 loop order). A program owns BLOCK_M query rows of one (batch, head) and streams over the
keys in blocks of BLOCK_N, keeping in fp32 a running row max m, a running row sum l and an unnormalized output acc
(online softmax). It works in base 2, since exp2 is the GPU's native exponential: with s = (q . k) * sm_scale * log2(e),
    softmax_j(q . k_j * sm_scale) = 2^(s_j - m) / l,
and a new block that raises the max from m to m' rescales l and acc by 2^(m - m').
Per query row it stores lse = m + log2(l), all the backward needs to recompute P = 2^(s - lse).

Backward, with dO the gradient of O and delta = rowsum(O * dO):
    dV = P^T dO,   dP = dO V^T,   dS = P * (dP - delta),   dK = sm_scale dS^T Q,   dQ = sm_scale dS K.
One kernel sweeps all queries for a block of keys (dK, dV), another all keys for a block of queries (dQ): no atomics,
so the result is deterministic. Both recompute each (BLOCK_M, BLOCK_N) tile of S = Q K^T exactly as the forward did,
as FlashAttention-2 does: lse is consistent only with the forward's own rounding of S (dV = P^T dO takes the
transpose of that tile, not a tile of K Q^T, which rounds differently).

Layouts: q, k, v may be strided (B, H, L, D) views, e.g. a transposed (B, L, H, D) projection, read in place if their
stride over D is 1; o, lse and all gradients are allocated contiguous here.
"""
import math

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

LOG2E = 1.4426950408889634  # log2(e): exp(x) = exp2(x * log2(e))


@triton.jit
def _load(base, rows, row_stride, n_rows, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr):
    """Rows `rows` of an (n_rows, HEAD_DIM) matrix as a (len(rows), BLOCK_D) tile, zero outside the matrix."""
    cols = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < HEAD_DIM)
    tile = tl.load(base + rows[:, None] * row_stride + cols[None, :], mask=mask, other=0.0)
    if UPCAST:  # the interpreter multiplies bf16 as raw integers (triton issue #11584): compute in fp32 there
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _store(base, rows, n_rows, tile, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Write a (len(rows), BLOCK_D) tile into rows `rows` of a contiguous (n_rows, HEAD_DIM) matrix."""
    cols = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < HEAD_DIM)
    tl.store(base + rows[:, None] * HEAD_DIM + cols[None, :], tile.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _forward_kernel(Q, K, V, O, LSE,
                    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                    H, Lq, Lk, qk_scale,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)  # int64: offsets past 2^31 elements at large B * L
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)

    q = _load(Q, offs_m, stride_qm, Lq, HEAD_DIM, BLOCK_D, UPCAST)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, Lk, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load(K, offs_n, stride_kn, Lk, HEAD_DIM, BLOCK_D, UPCAST)
        v = _load(V, offs_n, stride_vn, Lk, HEAD_DIM, BLOCK_D, UPCAST)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), base-2 logits
        s = tl.where(offs_n[None, :] < Lk, s, float("-inf"))  # keys past Lk get no weight
        m_new = tl.maximum(m, tl.max(s, 1))  # finite: every block holds at least one real key
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m - m_new)  # rescales what was summed under the old max (0 on the first block)
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new

    _store(O + bh.to(tl.int64) * Lq * HEAD_DIM, offs_m, Lq, acc / l[:, None], HEAD_DIM, BLOCK_D)
    tl.store(LSE + bh * Lq + offs_m, m + tl.log2(l), mask=offs_m < Lq)


@triton.jit
def _backward_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV,
                          stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                          stride_vb, stride_vh, stride_vn,
                          H, Lq, Lk, qk_scale, sm_scale,
                          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    DO += bh.to(tl.int64) * Lq * HEAD_DIM
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)

    k = _load(K, offs_n, stride_kn, Lk, HEAD_DIM, BLOCK_D, UPCAST)
    v = _load(V, offs_n, stride_vn, Lk, HEAD_DIM, BLOCK_D, UPCAST)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start_m in range(0, Lq, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = _load(Q, offs_m, stride_qm, Lq, HEAD_DIM, BLOCK_D, UPCAST)
        do = _load(DO, offs_m, HEAD_DIM, Lq, HEAD_DIM, BLOCK_D, UPCAST)
        # Queries past Lq load as zeros (q, dO, lse, delta), so P there is 1 and dS 0: they add nothing.
        lse = tl.load(LSE + bh * Lq + offs_m, mask=offs_m < Lq, other=0.0)
        delta = tl.load(DELTA + bh * Lq + offs_m, mask=offs_m < Lq, other=0.0)
        # The score tile exactly as the forward computed it (same orientation, same tile), then transposed: the
        # stored lse matches only the forward's own rounding of s, and one ulp of a logit s ~ 300 is already a
        # 2e-5 relative error of P = 2^(s - lse), which dV = P^T dO sums over every query.
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        # Keys past Lk are never stored, but 2^(0 - lse) may overflow there: keep infinities out
        p = tl.exp2(tl.where(offs_n[None, :] < Lk, s, float("-inf")) - lse[:, None])
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)

    offset = bh.to(tl.int64) * Lk * HEAD_DIM
    _store(DK + offset, offs_n, Lk, dk * sm_scale, HEAD_DIM, BLOCK_D)
    _store(DV + offset, offs_n, Lk, dv, HEAD_DIM, BLOCK_D)


@triton.jit
def _backward_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ,
                        stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                        stride_vb, stride_vh, stride_vn,
                        H, Lq, Lk, qk_scale, sm_scale,
                        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    offset = bh.to(tl.int64) * Lq * HEAD_DIM
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)

    q = _load(Q, offs_m, stride_qm, Lq, HEAD_DIM, BLOCK_D, UPCAST)
    do = _load(DO + offset, offs_m, HEAD_DIM, Lq, HEAD_DIM, BLOCK_D, UPCAST)
    lse = tl.load(LSE + bh * Lq + offs_m, mask=offs_m < Lq, other=0.0)
    delta = tl.load(DELTA + bh * Lq + offs_m, mask=offs_m < Lq, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, Lk, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load(K, offs_n, stride_kn, Lk, HEAD_DIM, BLOCK_D, UPCAST)
        v = _load(V, offs_n, stride_vn, Lk, HEAD_DIM, BLOCK_D, UPCAST)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        # Keys past Lk load as zeros: 2^(0 - lse) may overflow there, and inf * 0 would poison dQ
        p = tl.exp2(tl.where(offs_n[None, :] < Lk, s, float("-inf")) - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)

    _store(DQ + offset, offs_m, Lq, dq * sm_scale, HEAD_DIM, BLOCK_D)


# GPU code or the CPU interpreter: TRITON_INTERPRET decided it when triton and this module were imported.
INTERPRETED = isinstance(_forward_kernel, InterpretedFunction)
if INTERPRETED != isinstance(tl.sum, InterpretedFunction):
    raise ImportError(f"triton was imported {'for the GPU' if INTERPRETED else 'for its CPU interpreter'} but "
                      f"kernels/flash_attention.py {'for the interpreter' if INTERPRETED else 'for the GPU'}: "
                      "TRITON_INTERPRET changed in between; set it once, before anything imports triton")


# One score tile (BLOCK_M queries, BLOCK_N keys) for all three kernels: the backward recomputes S tile by tile
# exactly as the forward computed it (see _backward_dkdv_kernel). Then (num_warps, num_stages) per kernel, for head
# dims up to 64 and up to 128. Not tuned (no GPU was available); compiled for sm_90 by triton 3.9 each fits an
# H100's shared memory (tested) and spills no registers (cuobjdump), except dq at head dim 128: 40 bytes of stack.
BLOCK_M, BLOCK_N = 128, 64
LAUNCH = {
    "forward": {64: (4, 3), 128: (8, 3)},
    "dkdv": {64: (8, 2), 128: (8, 1)},
    "dq": {64: (8, 2), 128: (8, 1)},
}


def _launch(kernel, name, rows, q, args):
    """Run `kernel` on `args` over (cdiv(rows, its row block), B * H) programs, configured for q's head dim."""
    B, H, _, D = q.shape
    num_warps, num_stages = LAUNCH[name][64 if D <= 64 else 128]
    grid = (triton.cdiv(rows, BLOCK_N if name == "dkdv" else BLOCK_M), B * H)
    # fp32 inputs use tf32 tensor cores only where torch's own fp32 matmuls may
    precision = "tf32" if q.dtype != torch.float32 or torch.get_float32_matmul_precision() != "highest" else "ieee"
    kernel[grid](*args, HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                 UPCAST=INTERPRETED and q.dtype == torch.bfloat16, PRECISION=precision,
                 num_warps=num_warps, num_stages=num_stages)


def _strides(*tensors):
    """The (batch, head, row) strides of each (B, H, L, D) tensor; the stride over D is 1."""
    return [s for t in tensors for s in t.stride()[:3]]


def _forward(q, k, v):
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)
    sm_scale = 1 / math.sqrt(D)
    _launch(_forward_kernel, "forward", Lq, q, (q, k, v, o, lse, *_strides(q, k, v), H, Lq, Lk, sm_scale * LOG2E))
    return o, lse


def _backward(q, k, v, o, lse, do):
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    do = do.contiguous()
    delta = (o.float() * do.float()).sum(-1)  # (B, H, Lq): rowsum(O * dO)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    sm_scale = 1 / math.sqrt(D)
    args = (*_strides(q, k, v), H, Lq, Lk, sm_scale * LOG2E, sm_scale)
    _launch(_backward_dkdv_kernel, "dkdv", Lk, q, (q, k, v, do, lse, delta, dk, dv, *args))
    _launch(_backward_dq_kernel, "dq", Lq, q, (q, k, v, do, lse, delta, dq, *args))
    return dq, dk, dv


class FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v):
        o, lse = _forward(q, k, v)
        ctx.save_for_backward(q, k, v, o, lse)
        return o

    @staticmethod
    def backward(ctx, do):
        return _backward(*ctx.saved_tensors, do)


def attention(q, k, v):
    """softmax(q k^T / sqrt(D)) v for q (B, H, Lq, D), k and v (B, H, Lk, D); shapes checked by kernels.attention."""
    D = q.shape[-1]
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"the Triton attention takes float32, float16 or bfloat16, got {q.dtype}")
    if D > 128:
        raise ValueError(f"the Triton attention takes head dims up to 128, got {D}")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    return FlashAttention.apply(q, k, v)
