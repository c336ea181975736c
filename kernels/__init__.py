"""The one dispatch point for the fused operations that video_model.py and action_decoder.py call.

CUDA tensors run the Triton kernels (kernels/flash_attention.py, kernels/adaln.py), CPU tensors plain torch. Inside
`with kernels.force("triton"):` CPU tensors run the Triton kernels too, on Triton's CPU interpreter (10x-100x slower
than torch: for tests); `kernels.force("torch")` runs torch on any device.

Triton runs a whole process either on the GPU or on its CPU interpreter. TRITON_INTERPRET decides, read when triton
is first imported (triton.language decorates its own tl.sum, tl.max, ... then), when a kernel is decorated, and at
the first launch; triton 3.6 and 3.9 alike. torch imports triton as a side effect (torch._dynamo), so a process that
wants the interpreter must set TRITON_INTERPRET=1 before anything imports torch._dynamo: tests/conftest.py does so on
machines without a GPU. The variable selects the interpreter; it does not send CPU tensors to Triton, so a test run
with it set keeps the fast torch path everywhere outside force("triton").

Triton is imported only when the Triton path is first taken, so importing this package costs nothing without it.
"""
import contextlib
import os
import sys

import torch
import torch.nn.functional as F

_forced = None  # "triton" or "torch" inside a force() block; None: decided by the device
_triton = None  # the kernel modules (flash_attention, adaln), imported when the Triton path is first taken


@contextlib.contextmanager
def force(backend):
    """Run every attention / modulated_layer_norm call in the block with `backend`: "triton" or "torch"."""
    global _forced
    if backend not in ("triton", "torch"):
        raise ValueError(f"backend must be 'triton' or 'torch', got {backend!r}")
    previous, _forced = _forced, backend
    try:
        yield
    finally:
        _forced = previous


def _use_triton(x):
    return _forced == "triton" if _forced is not None else x.is_cuda


def _kernels(device):
    """The Triton kernel modules; on first use from CPU tensors, with the interpreter switched on if still possible."""
    global _triton
    if _triton is None:
        if device.type == "cpu" and "triton" not in sys.modules:
            os.environ["TRITON_INTERPRET"] = "1"  # left set: the first launch reads it too
        from . import adaln, flash_attention
        _triton = (flash_attention, adaln)
    if device.type == "cpu" and not _triton[0].INTERPRETED:
        raise RuntimeError("CPU tensors reached the Triton kernels, but triton was imported for the GPU in this "
                           "process; set TRITON_INTERPRET=1 before anything imports triton (torch._dynamo does) to "
                           "run them on Triton's CPU interpreter")
    return _triton


def attention(q, k, v):
    """softmax(q k^T / sqrt(D)) v, non-causal, no mask.  q (B, H, Lq, D), k and v (B, H, Lk, D) -> (B, H, Lq, D)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention expects 4-D (B, H, L, D) tensors, got q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    B, H, _, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[1] != H or k.shape[3] != D:
        raise ValueError(f"k and v must be (B, H, Lk, D) = ({B}, {H}, Lk, {D}) to match q {tuple(q.shape)}, got "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[2] == 0:
        raise ValueError("attention over zero keys (Lk = 0) is undefined")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if _use_triton(q):
        return _kernels(q.device)[0].attention(q, k, v)
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        # on the CPU, torch's bf16 attention (forward + backward) is slower than its fp32 one (benchmarks/
        # train_profile.py --precision bf16): under bf16 autocast only the matmuls around it gain
        with torch.autocast("cpu", enabled=False):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v)


def modulated_layer_norm(x, shift, scale, eps=1e-6):
    """adaLN modulation: LN(x) * (1 + scale) + shift, LN without affine weights.

    x (B, L, D) holds T groups of L / T consecutive tokens (a latent frame's tokens in the video model, one token
    each in the action decoder); shift and scale (B, T, D) hold one row per group, broadcast over its tokens.
    """
    if x.dim() != 3 or shift.dim() != 3 or shift.shape != scale.shape:
        raise ValueError(f"expected x (B, L, D) and shift, scale (B, T, D), got x {tuple(x.shape)}, "
                         f"shift {tuple(shift.shape)}, scale {tuple(scale.shape)}")
    B, L, D = x.shape
    T = shift.shape[1]
    if shift.shape[0] != B or shift.shape[2] != D:
        raise ValueError(f"shift and scale must be (B, T, D) = ({B}, T, {D}) to match x, got {tuple(shift.shape)}")
    if T == 0 or L % T:
        raise ValueError(f"{L} tokens do not split into {T} equal groups")
    if _use_triton(x):
        return _kernels(x.device)[1].modulated_layer_norm(x, shift, scale, eps)
    y = F.layer_norm(x.float(), (D,), eps=eps).view(B, T, L // T, D)
    y = y * (1 + scale.float()[:, :, None]) + shift.float()[:, :, None]
    return y.view(B, L, D).to(x.dtype)
