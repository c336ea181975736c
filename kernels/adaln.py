"""Fused adaLN modulation in Triton: y = LN(x) * (1 + scale) + shift, LayerNorm without affine weights.

The torch expression reads and writes a tensor the size of x for each of its operations (upcast, layer_norm, multiply,
add, downcast); this kernel reads x once and writes y once, computing in fp32.

x (B, L, D) holds T groups of G = L / T consecutive tokens (a latent frame's tokens in the video model, one token each
in the action decoder); shift and scale (B, T, D) hold one row per group. Seen as a (B * L, D) matrix, group
bt = b * T + t owns rows bt * G ... bt * G + G - 1, so a program takes ROWS rows of one group and loads its
shift/scale row once.

Backward, with xhat = (x - mean) * rstd and dxhat = dy * (1 + scale), means taken over D:
    dshift = sum over the group's rows of dy,   dscale = sum over the group's rows of dy * xhat,
    dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)).
Each program writes its partial dshift/dscale sums to a (B * T, chunks, D) fp32 buffer that torch then sums: no
atomics, deterministic.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _forward_kernel(X, SHIFT, SCALE, Y, MEAN, RSTD,
                    stride_shift_b, stride_shift_t, stride_scale_b, stride_scale_t,
                    T, G, D, eps,
                    ROWS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    chunk, bt = tl.program_id(0), tl.program_id(1)
    b, t = bt // T, bt % T
    cols = tl.arange(0, BLOCK_D)
    shift = tl.load(SHIFT + b * stride_shift_b + t * stride_shift_t + cols, mask=cols < D, other=0.0).to(tl.float32)
    scale = tl.load(SCALE + b * stride_scale_b + t * stride_scale_t + cols, mask=cols < D, other=0.0).to(tl.float32)
    for r in range(0, ROWS, BLOCK_R):
        in_group = chunk * ROWS + r + tl.arange(0, BLOCK_R)  # token index within the group
        rows = bt.to(tl.int64) * G + in_group
        mask = (in_group[:, None] < G) & (cols[None, :] < D)
        x = tl.load(X + rows[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, 1) / D
        xc = tl.where(mask, x - mean[:, None], 0.0)
        rstd = tl.math.rsqrt(tl.sum(xc * xc, 1) / D + eps)
        y = xc * rstd[:, None] * (1 + scale[None, :]) + shift[None, :]
        tl.store(Y + rows[:, None] * D + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
        tl.store(MEAN + rows, mean, mask=in_group < G)
        tl.store(RSTD + rows, rstd, mask=in_group < G)


@triton.jit
def _backward_kernel(X, SCALE, DY, MEAN, RSTD, DX, DSHIFT, DSCALE,
                     stride_scale_b, stride_scale_t,
                     T, G, D,
                     ROWS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    chunk, bt = tl.program_id(0), tl.program_id(1)
    b, t = bt // T, bt % T
    cols = tl.arange(0, BLOCK_D)
    scale = tl.load(SCALE + b * stride_scale_b + t * stride_scale_t + cols, mask=cols < D, other=0.0).to(tl.float32)
    dshift = tl.zeros([BLOCK_D], tl.float32)
    dscale = tl.zeros([BLOCK_D], tl.float32)
    for r in range(0, ROWS, BLOCK_R):
        in_group = chunk * ROWS + r + tl.arange(0, BLOCK_R)
        rows = bt.to(tl.int64) * G + in_group
        mask = (in_group[:, None] < G) & (cols[None, :] < D)
        x = tl.load(X + rows[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + rows, mask=in_group < G, other=0.0)
        rstd = tl.load(RSTD + rows, mask=in_group < G, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        dshift += tl.sum(dy, 0)
        dscale += tl.sum(dy * xhat, 0)
        dxhat = dy * (1 + scale[None, :])
        dx = rstd[:, None] * (dxhat - (tl.sum(dxhat, 1) / D)[:, None] - xhat * (tl.sum(dxhat * xhat, 1) / D)[:, None])
        tl.store(DX + rows[:, None] * D + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
    partial = (bt * tl.num_programs(0) + chunk).to(tl.int64) * D + cols
    tl.store(DSHIFT + partial, dshift, mask=cols < D)
    tl.store(DSCALE + partial, dscale, mask=cols < D)


def _launch_options(G, D):
    """Tile sizes: BLOCK_R rows of BLOCK_D columns (about 4096 fp32 values) at a time, ROWS rows per program."""
    G = max(G, 1)  # no tokens: no programs run, but the sizes must still be valid
    BLOCK_D = triton.next_power_of_2(D)
    BLOCK_R = min(triton.next_power_of_2(G), max(1, 4096 // BLOCK_D))
    ROWS = max(BLOCK_R, min(64, triton.next_power_of_2(G)))
    return dict(ROWS=ROWS, BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D, num_warps=8 if BLOCK_D >= 2048 else 4)


class ModulatedLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shift, scale, eps):
        B, L, D = x.shape
        T = shift.shape[1]
        G = L // T
        x = x.contiguous()
        shift, scale = (s if s.stride(-1) == 1 else s.contiguous() for s in (shift, scale))
        y = torch.empty_like(x)
        mean = torch.empty((B, L), dtype=torch.float32, device=x.device)
        rstd = torch.empty((B, L), dtype=torch.float32, device=x.device)
        options = _launch_options(G, D)
        _forward_kernel[(triton.cdiv(G, options["ROWS"]), B * T)](
            x, shift, scale, y, mean, rstd, *shift.stride()[:2], *scale.stride()[:2], T, G, D, eps, **options)
        ctx.save_for_backward(x, scale, mean, rstd)
        ctx.shift_dtype = shift.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x, scale, mean, rstd = ctx.saved_tensors
        B, L, D = x.shape
        T = scale.shape[1]
        G = L // T
        options = _launch_options(G, D)
        chunks = triton.cdiv(G, options["ROWS"])
        dx = torch.empty_like(x)
        dshift = torch.empty((B * T, chunks, D), dtype=torch.float32, device=x.device)
        dscale = torch.empty((B * T, chunks, D), dtype=torch.float32, device=x.device)
        _backward_kernel[(chunks, B * T)](
            x, scale, dy.contiguous(), mean, rstd, dx, dshift, dscale, *scale.stride()[:2], T, G, D, **options)
        dshift = dshift.sum(1).view(B, T, D).to(ctx.shift_dtype)
        dscale = dscale.sum(1).view(B, T, D).to(scale.dtype)
        return dx, dshift, dscale, None


def modulated_layer_norm(x, shift, scale, eps=1e-6):
    """LN(x) * (1 + scale) + shift for x (B, L, D), shift and scale (B, T, D); shapes checked by kernels."""
    return ModulatedLayerNorm.apply(x, shift, scale, eps)
