"""The Triton kernels against float64 references, on the GPU where there is one, else on Triton's CPU interpreter.

Tolerance (flash-attn's rule): the kernel may be at most twice as far from the float64 reference as torch computing
in the same dtype, plus atol:  max|kernel - ref| <= 2 max|torch_same_dtype - ref| + atol.
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kernels

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ATOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def assert_as_close_as_torch(name, kernel, same_dtype, ref, dtype):
    err = (kernel.double() - ref).abs().max().item()
    bound = 2 * (same_dtype.double() - ref).abs().max().item() + ATOL[dtype]
    assert err <= bound, f"{name} ({dtype}): max error {err:.3g} vs the float64 reference exceeds {bound:.3g}"


def run(backend, fn, inputs, grad_out=None):
    """fn(*inputs) on `backend` and, given grad_out, the gradients of every input."""
    inputs = [t.detach().requires_grad_(grad_out is not None) for t in inputs]
    with kernels.force(backend):
        out = fn(*inputs)
    if grad_out is None:
        return out.detach(), []
    return out.detach(), list(torch.autograd.grad(out, inputs, grad_out))


# ----------------------------------------------------------------------------------------------------- attention

def attention_float64(q, k, v):
    s = q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1])
    return s.softmax(-1) @ v.double()


def attention_inputs(B, H, Lq, Lk, D, dtype, seed, transposed=False):
    """q (B, H, Lq, D), k and v (B, H, Lk, D); transposed: as strided views of (B, L, H, D) projections."""
    g = torch.Generator().manual_seed(seed)

    def make(L):
        shape = (B, L, H, D) if transposed else (B, H, L, D)
        t = torch.randn(shape, generator=g).to(dtype).to(DEVICE)
        return t.transpose(1, 2) if transposed else t

    return make(Lq), make(Lk), make(Lk)


def check_attention(B, H, Lq, Lk, D, dtype, seed=0, transposed=False, backward=True):
    q, k, v = attention_inputs(B, H, Lq, Lk, D, dtype, seed, transposed)
    do = torch.randn((B, H, Lq, D), generator=torch.Generator().manual_seed(seed + 1)).to(dtype).to(DEVICE)
    check_attention_on(q, k, v, do if backward else None)


def check_attention_on(q, k, v, do=None):
    """The Triton attention's output (and, given do, every gradient) within the tolerance rule."""
    dtype = q.dtype
    out, grads = run("triton", kernels.attention, (q, k, v), do)
    out_torch, grads_torch = run("torch", kernels.attention, (q, k, v), do)
    out_ref, grads_ref = run("torch", attention_float64, [t.double() for t in (q, k, v)],
                             None if do is None else do.double())
    assert out.shape == q.shape and out.dtype == dtype
    assert_as_close_as_torch("O", out, out_torch, out_ref, dtype)
    for name, g, g_torch, g_ref in zip(("dQ", "dK", "dV"), grads, grads_torch, grads_ref):
        assert g.shape == g_ref.shape and g.dtype == dtype and g_ref.dtype == torch.float64
        assert_as_close_as_torch(name, g, g_torch, g_ref, dtype)


# (B, H, Lq, Lk, D, transposed): token counts 1, 7, 33, 200, self- and cross-attention both ways, all head dims
ATTENTION_CASES = [
    (2, 3, 1, 1, 32, False),
    (2, 3, 7, 7, 64, True),
    (2, 2, 33, 33, 128, False),
    (1, 2, 200, 200, 32, True),
    (2, 3, 33, 7, 64, False),
    (2, 2, 7, 200, 128, True),
    (1, 3, 200, 33, 64, False),
    (2, 2, 1, 33, 32, False),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B, H, Lq, Lk, D, transposed", ATTENTION_CASES)
def test_attention_forward_and_gradients(B, H, Lq, Lk, D, transposed, dtype):
    check_attention(B, H, Lq, Lk, D, dtype, transposed=transposed)


@settings(max_examples=20, deadline=None)
@given(B=st.integers(1, 2), H=st.integers(1, 3), Lq=st.integers(1, 80), Lk=st.integers(1, 80),
       D=st.sampled_from([16, 32, 48, 64, 80, 128]), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_attention_forward_property(B, H, Lq, Lk, D, dtype, seed):
    check_attention(B, H, Lq, Lk, D, dtype, seed, backward=False)


def test_attention_rows_are_independent_across_batches_and_heads():
    # A ragged last block must not read or write another (batch, head)'s rows: change one head's inputs and
    # every other head's output must stay bit-identical.
    q, k, v = attention_inputs(2, 2, 33, 7, 32, torch.float32, seed=3)
    with kernels.force("triton"):
        before = kernels.attention(q, k, v)
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        for t in (q2, k2, v2):
            t[1, 0] = 100.0
        after = kernels.attention(q2, k2, v2)
    changed = (before != after).flatten(2).any(-1)  # (B, H)
    assert changed.tolist() == [[False, False], [True, False]]


def fp32_logit_error(q, k):
    """A bound on fp32's rounding error of every logit q . k / sqrt(D), whatever the order of the sums (a dot
    product of D terms is off by at most D 2^-24 sum_d |q_d k_d|; Higham, Accuracy and Stability, 3.1)."""
    D = q.shape[-1]
    return (D * 2.0 ** -24 * (q.double().abs() @ k.double().abs().transpose(-1, -2)) / math.sqrt(D)).max().item()


def test_attention_equal_keys_average_the_values_even_far_below_exp_range():
    # Identical keys get equal weights: O is the mean of the values, dV the mean of dO, dQ zero. The logits here
    # are -100 to -200 (base 2: below -144), so 2^(-lse) overflows fp32, which the backward must never multiply into
    # anything. fp32 resolves such logits only to about 1e-5, and how the copies of a logit round differs between
    # CPUs (the interpreter's dot products are numpy's); a logit error of e is a relative error of at most 2e of a
    # weight, which bounds how far O, dV and dQ may be from their exact values.
    B, H, Lq, Lk, D = 1, 2, 5, 33, 32
    g = torch.Generator().manual_seed(4)
    u = torch.randn(B, H, 1, D, generator=g)
    logits = -100 * (1 + torch.rand(B, H, Lq, 1, generator=g))
    q = (logits * math.sqrt(D) * u / u.square().sum(-1, keepdim=True)).to(DEVICE)   # q . u / sqrt(D) = logits
    k = u.expand(B, H, Lk, D).to(DEVICE)
    v, do = torch.randn(B, H, Lk, D, generator=g).to(DEVICE), torch.randn(B, H, Lq, D, generator=g).to(DEVICE)
    out, (dq, dk, dv) = run("triton", kernels.attention, (q, k, v), do)
    weight_error = 2 * fp32_logit_error(q, k)                                   # relative, per weight
    assert 1e-6 < weight_error < 1e-3
    assert torch.isfinite(out).all() and torch.isfinite(dq).all() and torch.isfinite(dk).all()
    mean_v, mean_do = v.double().mean(2, keepdim=True), do.double().sum(2, keepdim=True) / Lk
    assert (out.double() - mean_v).abs().max() <= weight_error * v.abs().max() + 1e-6
    assert (dv.double() - mean_do).abs().max() <= weight_error * do.abs().sum(2).max() / Lk + 1e-6
    # dQ = sm_scale sum_j P_j (dP_j - delta) k: zero for equal weights; a weight off by w moves it by at most
    # sm_scale 2 w max|dP| |k|
    dp = (do.double() @ v.double().transpose(-1, -2)).abs().max()
    assert dq.abs().max() <= 2 * weight_error * dp * k.abs().max() / math.sqrt(D) + 1e-6


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("peak", [50.0, 300.0])
def test_attention_with_a_dominant_key(peak, dtype):
    # One key every query attends to almost alone, its logits up to `peak` (QK-normed attention with a learned scale
    # reaches a few hundred): the backward must recompute P exactly as the forward did, or an ulp of a large logit
    # becomes a relative error of P that dV = P^T dO sums over every query.
    B, H, Lq, Lk, D = 1, 2, 61, 130, 64
    g = torch.Generator().manual_seed(5)
    q, k, v, do = (torch.randn(B, H, L, D, generator=g) for L in (Lq, Lk, Lk, Lq))
    u = q.mean(2, keepdim=True)
    u = u / u.norm(dim=-1, keepdim=True)
    q = q + math.sqrt(D) * u                          # every query leans the same way ...
    k[:, :, 17] = u[:, :, 0] * peak * 0.5             # ... and key 17 lies that way: logits ~ peak / 2 to peak
    q, k, v, do = (t.to(dtype).to(DEVICE) for t in (q, k, v, do))
    logits = q.double() @ k.double().transpose(-1, -2) / math.sqrt(D)
    assert 0.5 * peak < logits.max() < 2 * peak and logits.softmax(-1)[..., 17].min() > 0.5
    check_attention_on(q, k, v, do)


# --------------------------------------------------------------------------------------------------------- adaLN

def modulated_layer_norm_float64(x, shift, scale, eps=1e-6):
    B, L, D = x.shape
    T = shift.shape[1]
    x = x.double().view(B, T, L // T, D)
    xhat = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + eps)
    return (xhat * (1 + scale.double()[:, :, None]) + shift.double()[:, :, None]).view(B, L, D)


# (B, L, D, T): groups of 4, one token per group (the action decoder), one group, several chunks of rows per
# group (130 tokens), a video-width row (2048), D not a power of two
ADALN_CASES = [(2, 12, 32, 3), (2, 7, 48, 7), (1, 33, 64, 1), (1, 260, 16, 2), (1, 8, 2048, 2)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B, L, D, T", ADALN_CASES)
def test_modulated_layer_norm_forward_and_gradients(B, L, D, T, dtype):
    g = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(B, L, D, generator=g) + 1).to(dtype).to(DEVICE)
    # shift and scale as DiT makes them: strided chunks of one (B, T, 2D) modulation output
    shift, scale = (0.5 * torch.randn(B, T, 2 * D, generator=g)).to(dtype).to(DEVICE).chunk(2, dim=-1)
    dy = torch.randn(B, L, D, generator=g).to(dtype).to(DEVICE)
    out, grads = run("triton", kernels.modulated_layer_norm, (x, shift, scale), dy)
    out_torch, grads_torch = run("torch", kernels.modulated_layer_norm, (x, shift, scale), dy)
    out_ref, grads_ref = run("torch", modulated_layer_norm_float64, [t.double() for t in (x, shift, scale)],
                             dy.double())
    assert out.dtype == dtype
    assert_as_close_as_torch("y", out, out_torch, out_ref, dtype)
    for name, g, g_torch, g_ref in zip(("dx", "dshift", "dscale"), grads, grads_torch, grads_ref):
        assert g.shape == g_ref.shape and g.dtype == dtype and g_ref.dtype == torch.float64
        assert_as_close_as_torch(name, g, g_torch, g_ref, dtype)


def test_modulated_layer_norm_zero_modulation_is_plain_layer_norm():
    x = torch.randn(2, 6, 40, device=DEVICE)
    zeros = torch.zeros(2, 3, 40, device=DEVICE)
    with kernels.force("triton"):
        y = kernels.modulated_layer_norm(x, zeros, zeros)
    torch.testing.assert_close(y, torch.nn.functional.layer_norm(x, (40,), eps=1e-6), rtol=1e-5, atol=1e-5)


def test_empty_inputs_give_empty_outputs_and_zero_gradients():
    q, k, v = (torch.randn(2, 2, L, 32, device=DEVICE, requires_grad=True) for L in (0, 5, 5))
    x = torch.randn(2, 0, 16, device=DEVICE, requires_grad=True)
    shift, scale = (torch.randn(2, 3, 16, device=DEVICE, requires_grad=True) for _ in range(2))
    with kernels.force("triton"):
        out, y = kernels.attention(q, k, v), kernels.modulated_layer_norm(x, shift, scale)
    assert out.shape == (2, 2, 0, 32) and y.shape == (2, 0, 16)
    (out.sum() + y.sum()).backward()
    for t in (k, v, shift, scale):
        assert torch.equal(t.grad, torch.zeros_like(t))


# ----------------------------------------------------------------------------------------------- the two models

def randomize(model):
    """Random weights everywhere: the zero-initialised (adaLN-Zero) layers would hide the modulation terms."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if p.ndim == 1 else torch.randn_like(p) / p.shape[-1] ** 0.5)
    return model.to(DEVICE)


def assert_same_with_triton(model, inputs):
    """The model's output and every parameter's gradient are the same with the Triton kernels as with torch."""
    results = {}
    for backend in ("torch", "triton"):
        model.zero_grad()
        with kernels.force(backend):
            out = model(*inputs)
            out.square().mean().backward()
        results[backend] = out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    (out_torch, grads_torch), (out_triton, grads_triton) = results["torch"], results["triton"]
    torch.testing.assert_close(out_triton, out_torch, rtol=1e-4, atol=1e-4)
    assert grads_triton.keys() == grads_torch.keys()
    for name, g_torch in grads_torch.items():
        torch.testing.assert_close(grads_triton[name], g_torch, rtol=1e-3, atol=1e-4, msg=f"gradient of {name}")


def test_video_model_is_the_same_with_the_triton_path():
    # every attention (self and cross to text, Lq != Lk) and adaLN (one row per latent frame) of a small Cosmos DiT
    from video_model import VideoDiT, VideoDiTConfig
    model = randomize(VideoDiT(VideoDiTConfig(in_channels=4, num_heads=2, head_dim=32, num_layers=2, text_dim=16,
                                              adaln_lora_dim=8)))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 3, 4, 6, generator=g)  # (B, C, T, H, W): 3 latent frames of 2 x 3 patches
    tau, text = torch.rand(2, 3, generator=g), torch.randn(2, 5, 16, generator=g)
    assert_same_with_triton(model, [t.to(DEVICE) for t in (x, tau, text)])


def test_action_decoder_is_the_same_with_the_triton_path():
    # cross-attention of 1 + H_a tokens to the video states, self-attention, adaLN with one row per token
    from action_decoder import ActionDecoder, preset
    cfg = preset("tiny", H_a=6, action_dim=4, proprio_dim=5, video_dim=32, width=64, depth=2, heads=2, rank=16,
                 adaln_lora=8)
    model = randomize(ActionDecoder(cfg))
    g = torch.Generator().manual_seed(1)
    video, proprio = torch.randn(2, 40, 32, generator=g), torch.randn(2, 5, generator=g)
    actions, tau_v, tau_a = torch.randn(2, 6, 4, generator=g), torch.rand(2, generator=g), torch.rand(2, generator=g)
    assert_same_with_triton(model, [t.to(DEVICE) for t in (video, tau_v, proprio, actions, tau_a)])


# ------------------------------------------------------------------------------------------------ GPU compiler

H100_SHARED_MEMORY = 227 * 1024  # bytes one program may use on sm_90


def compile_for_h100():
    """Compile every kernel, as the GPU path launches it in bf16, with triton's NVIDIA backend for sm_90 (no GPU
    needed). Returns {kernel and head dim: shared memory in bytes}. Needs triton imported without the interpreter."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kernels import adaln, flash_attention as fa

    def compile_kernel(kernel, constexprs, num_warps, num_stages):
        fp32 = {"LSE", "DELTA", "MEAN", "RSTD", "DSHIFT", "DSCALE"}
        bf16 = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV", "X", "SHIFT", "SCALE", "Y", "DY", "DX"}
        types = {name: "constexpr" if name in constexprs else "*fp32" if name in fp32 else "*bf16" if name in bf16
                 else "fp32" if name in ("qk_scale", "sm_scale", "eps") else "i32" for name in kernel.arg_names}
        compiled = triton.compile(ASTSource(kernel, types, constexprs), target=GPUTarget("cuda", 90, 32),
                                  options=dict(num_warps=num_warps, num_stages=num_stages))
        return compiled.metadata.shared

    shared = {}
    attention_kernels = {"forward": fa._forward_kernel, "dkdv": fa._backward_dkdv_kernel, "dq": fa._backward_dq_kernel}
    for D in (32, 64, 128):
        for name, kernel in attention_kernels.items():
            num_warps, num_stages = fa.LAUNCH[name][64 if D <= 64 else 128]
            constexprs = dict(HEAD_DIM=D, BLOCK_D=D, BLOCK_M=fa.BLOCK_M, BLOCK_N=fa.BLOCK_N, UPCAST=False,
                              PRECISION="tf32")
            shared[f"attention {name} D={D}"] = compile_kernel(kernel, constexprs, num_warps, num_stages)
    for G, D in ((1200, 2048), (1, 1024)):  # video frames; one token per group (the action decoder)
        options = adaln._launch_options(G, D)
        num_warps = options.pop("num_warps")
        for name, kernel in (("forward", adaln._forward_kernel), ("backward", adaln._backward_kernel)):
            shared[f"adaln {name} D={D}"] = compile_kernel(kernel, options, num_warps, 1)
    return shared


def test_kernels_compile_for_the_h100():
    # CI never runs triton's GPU compiler (the interpreter skips it): run it here, in a process without the interpreter
    code = "import json, test_kernels; print(json.dumps(test_kernels.compile_for_h100()))"
    path = os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": path}
    result = subprocess.run([sys.executable, "-c", code], cwd=os.path.join(REPO, "tests"), env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    shared = json.loads(result.stdout.splitlines()[-1])
    assert len(shared) == 13
    too_big = {name: size for name, size in shared.items() if size > H100_SHARED_MEMORY}
    assert not too_big, f"kernels needing more shared memory than an H100 has: {too_big}"


# ------------------------------------------------------------------------------------------------------ dispatch

def test_cpu_tensors_take_torch_without_importing_triton():
    # TRITON_INTERPRET=1 (as tests/conftest.py sets it) selects the interpreter but must not route CPU tensors to it
    code = ("import sys, torch, kernels\n"
            "q = torch.randn(1, 2, 3, 8)\n"
            "sdpa = torch.nn.functional.scaled_dot_product_attention\n"
            "assert torch.equal(kernels.attention(q, q, q), sdpa(q, q, q))\n"
            "kernels.modulated_layer_norm(torch.randn(1, 4, 8), torch.zeros(1, 2, 8), torch.zeros(1, 2, 8))\n"
            "assert 'triton' not in sys.modules, 'importing and calling kernels on CPU imported triton'\n")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_cpu_bf16_attention_computes_in_fp32_even_under_autocast():
    # torch's bf16 attention on the CPU is slower than its fp32 one: kernels.attention upcasts, and autocast (which
    # would cast scaled_dot_product_attention's inputs back to bf16) is kept out of it
    q, k, v = attention_inputs(2, 3, 33, 7, 32, torch.bfloat16, seed=3)
    q, k, v = (t.cpu().requires_grad_() for t in (q, k, v))
    want = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(torch.bfloat16)
    with kernels.force("torch"), torch.autocast("cpu", torch.bfloat16):
        got = kernels.attention(q, k, v)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    got.float().sum().backward()
    assert all(t.grad.dtype == torch.bfloat16 and t.grad.abs().sum() > 0 for t in (q, k, v))


def test_force_nests_and_restores():
    x = torch.randn(1, 1, 2, 16)
    with kernels.force("triton"):
        with kernels.force("torch"):
            assert not kernels._use_triton(x)
        assert kernels._use_triton(x)
    assert kernels._use_triton(x) == x.is_cuda
    with pytest.raises(ValueError, match="backend must be 'triton' or 'torch'"):
        with kernels.force("cuda"):
            pass


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("args, message", [
    ((torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 5, 8)), "k and v must be"),
    ((torch.zeros(1, 2, 3, 8), torch.zeros(1, 3, 4, 8), torch.zeros(1, 3, 4, 8)), "k and v must be"),
    ((torch.zeros(2, 3, 8), torch.zeros(2, 4, 8), torch.zeros(2, 4, 8)), "4-D"),
    ((torch.zeros(1, 1, 3, 8), torch.zeros(1, 1, 0, 8), torch.zeros(1, 1, 0, 8)), "zero keys"),
    ((torch.zeros(1, 1, 3, 8), torch.zeros(1, 1, 3, 8, dtype=torch.float16), torch.zeros(1, 1, 3, 8)), "dtypes"),
])
def test_attention_rejects_bad_input(backend, args, message):
    with kernels.force(backend), pytest.raises(ValueError, match=message):
        kernels.attention(*args)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("shapes, message", [
    (((1, 10, 8), (1, 3, 8), (1, 3, 8)), "do not split into 3 equal groups"),
    (((1, 10, 8), (2, 5, 8), (2, 5, 8)), "must be \\(B, T, D\\)"),
    (((1, 10, 8), (1, 5, 8), (1, 2, 8)), "expected x \\(B, L, D\\)"),
])
def test_modulated_layer_norm_rejects_bad_input(backend, shapes, message):
    with kernels.force(backend), pytest.raises(ValueError, match=message):
        kernels.modulated_layer_norm(*(torch.zeros(s) for s in shapes))


def test_triton_attention_rejects_unsupported_dtype_and_head_dim():
    with kernels.force("triton"):
        with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
            kernels.attention(*(torch.zeros(1, 1, 2, 8, dtype=torch.float64, device=DEVICE) for _ in range(3)))
        with pytest.raises(ValueError, match="head dims up to 128"):
            kernels.attention(*(torch.zeros(1, 1, 2, 256, device=DEVICE) for _ in range(3)))
