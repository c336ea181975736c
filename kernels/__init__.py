"""The one dispatch point for the fused operations that video_model.py and action_decoder.py call.

On CPU tensors these are plain torch. The Triton kernels (kernels/attention.py, kernels/adaln.py) replace them on
CUDA tensors, and on the CPU when Triton's interpreter is on (TRITON_INTERPRET=1), which is how CI tests them.
"""
import torch
import torch.nn.functional as F


def attention(q, k, v):
    """softmax(q k^T / sqrt(D)) v, non-causal, no mask.  q (B, H, Lq, D), k and v (B, H, Lk, D) -> (B, H, Lq, D)."""
    return F.scaled_dot_product_attention(q, k, v)


def modulated_layer_norm(x, shift, scale, eps=1e-6):
    """adaLN modulation: LN(x) * (1 + scale) + shift, LN without affine weights.

    x (B, L, D) holds T groups of L / T consecutive tokens (a latent frame's tokens in the video model, one token
    each in the action decoder); shift and scale (B, T, D) hold one row per group, broadcast over its tokens.
    """
    B, L, D = x.shape
    T = shift.shape[1]
    if L % T:
        raise ValueError(f"{L} tokens do not split into {T} equal groups")
    y = F.layer_norm(x.float(), (D,), eps=eps).view(B, T, L // T, D)
    y = y * (1 + scale.float()[:, :, None]) + shift.float()[:, :, None]
    return y.view(B, L, D).to(x.dtype)
