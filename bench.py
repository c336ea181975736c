"""Benchmark of the Triton kernels (kernels/) against torch, on a GPU:  python bench.py

Attention at the Cosmos-Predict2 2B shapes (batch 1, 16 heads, head dim 128, bf16): TFLOP/s of the forward and of
forward + backward, for the Triton kernel and for torch's scaled_dot_product_attention with its flash and cuDNN
backends. adaLN at the video model's shape: GB/s of the fused kernel and of the torch expression it replaces.
Without a GPU there is nothing to measure: it says so and exits 0.
"""
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import kernels

HEADS, HEAD_DIM = 16, 128
ATTENTION_SHAPES = [  # (what, Lq, Lk)
    ("self-attention, 480p: 16 latent frames of 30 x 40 tokens", 19200, 19200),
    ("self-attention, 720p", 28800, 28800),
    ("cross-attention, video queries -> text keys", 19200, 512),
    ("cross-attention, action queries -> video keys", 61, 19200),
]
ADALN_SHAPE = (1, 19200, 2048, 16)  # (B, L, D, T): 16 latent frames of 1200 tokens, width 2048


def milliseconds(fn, inputs):
    """Median time of fn() in ms; the inputs' gradients are reset between runs so that none accumulate."""
    import triton.testing
    return triton.testing.do_bench(fn, warmup=25, rep=200, grad_to_none=inputs, return_mode="median")


def attention_implementations():
    def sdpa(backend):
        def run(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v)
        return run

    def triton_attention(q, k, v):
        with kernels.force("triton"):
            return kernels.attention(q, k, v)

    return {"triton": triton_attention, "sdpa flash": sdpa(SDPBackend.FLASH_ATTENTION),
            "sdpa cudnn": sdpa(SDPBackend.CUDNN_ATTENTION)}


def bench_attention():
    print(f"attention, bf16, batch 1, {HEADS} heads, head dim {HEAD_DIM}: TFLOP/s (forward FLOPs = 4 Lq Lk D per "
          f"head; forward + backward = 3.5x that)")
    for what, Lq, Lk in ATTENTION_SHAPES:
        print(f"\n{what}: Lq {Lq}, Lk {Lk}")
        q = torch.randn(1, HEADS, Lq, HEAD_DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(1, HEADS, Lk, HEAD_DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(1, HEADS, Lk, HEAD_DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        do = torch.randn_like(q)
        flops = 4 * HEADS * Lq * Lk * HEAD_DIM
        with torch.no_grad(), sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):  # fp32, never an (Lq, Lk) matrix
            reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        for name, attention in attention_implementations().items():
            try:
                with torch.no_grad():
                    err = (attention(q, k, v).float() - reference).abs().max().item()
                forward = milliseconds(lambda: attention(q, k, v), [q, k, v])
                both = milliseconds(lambda: attention(q, k, v).backward(do), [q, k, v])
            except RuntimeError as e:  # a backend that does not take this shape / device
                print(f"  {name:11s} unavailable: {str(e).splitlines()[0][:100]}")
                continue
            print(f"  {name:11s} forward {flops / forward / 1e9:6.1f} TFLOP/s ({forward:7.3f} ms)   "
                  f"forward+backward {3.5 * flops / both / 1e9:6.1f} TFLOP/s ({both:7.3f} ms)   "
                  f"max |O - O_fp32| {err:.1e}")


def bench_adaln():
    B, L, D, T = ADALN_SHAPE
    print(f"\nadaLN LN(x) (1 + scale) + shift, bf16, x ({B}, {L}, {D}), shift and scale ({B}, {T}, {D}): GB/s "
          f"(bytes: forward reads x and writes y; backward also reads dy and writes dx)")
    x = torch.randn(B, L, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    shift, scale = (0.1 * torch.randn(B, T, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    shift.requires_grad_(), scale.requires_grad_()
    dy = torch.randn_like(x)
    x_bytes = x.numel() * x.element_size()
    for backend in ("triton", "torch"):
        def forward():
            with kernels.force(backend):
                return kernels.modulated_layer_norm(x, shift, scale)

        fwd = milliseconds(forward, [x, shift, scale])
        both = milliseconds(lambda: forward().backward(dy), [x, shift, scale])
        print(f"  {backend:11s} forward {2 * x_bytes / fwd / 1e6:7.1f} GB/s ({fwd:.3f} ms)   "
              f"forward+backward {5 * x_bytes / both / 1e6:7.1f} GB/s ({both:.3f} ms)")


if __name__ == "__main__":
    if not torch.cuda.is_available():
        print("bench.py measures the Triton kernels on a CUDA GPU, and this machine has none: nothing to measure.")
        sys.exit(0)
    import triton
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}\n")
    bench_attention()
    bench_adaln()
