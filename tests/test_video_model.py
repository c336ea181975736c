"""video_model.py against diffusers' CosmosTransformer3DModel (the reference), plus its own contracts:
early exit, Video2World conditioning, LoRA, bad input."""
import copy
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings, strategies as st
from safetensors.torch import load_file

import checkpoints
import cosmos_weights
import flow
import video_model as vm
from cosmos_reference import B, C, H, REF_CONFIG, T, W, randomize, reference_velocity
from video_model import VideoDiT, VideoDiTConfig


# ----------------------------------------------------------------------------- parity with diffusers


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_parity_with_diffusers(reference, folders, inputs, layout):
    model = cosmos_weights.from_pretrained(folders / layout)
    assert model.cfg == VideoDiTConfig(in_channels=16, patch=2, num_heads=2, head_dim=64, num_layers=3, mlp_ratio=2.0,
                                       text_dim=32, adaln_lora_dim=16, rope_scale=(2.0, 3.0, 1.5))
    want = reference_velocity(reference, **inputs)
    with torch.no_grad():
        got = model(**inputs)
    err = (got - want).abs().max().item()
    print(f"diffusers-layout ({layout}) parity, NVIDIA's QK-norm eps 1e-6: max abs err {err:.2e} "
          f"(|v| max {want.abs().max().item():.2f})")
    assert err <= 1e-4


def test_parity_with_diffusers_qk_eps(reference, folders, inputs):
    """With diffusers' own QK-norm eps the only differences left are fp32 rounding."""
    cfg = replace(cosmos_weights.from_pretrained(folders / "single").cfg, qk_norm_eps=1e-5)
    model = cosmos_weights.from_pretrained(folders / "single", config=cfg)
    with torch.no_grad():
        err = (model(**inputs) - reference_velocity(reference, **inputs)).abs().max().item()
    print(f"diffusers-layout parity, QK-norm eps 1e-5 as diffusers: max abs err {err:.2e}")
    assert err <= 1e-5


def test_layer_k_states_match_diffusers_blocks(reference, model, inputs):
    seen = {}
    hooks = [blk.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out))
             for i, blk in enumerate(reference.transformer_blocks)]
    reference_velocity(reference, **inputs)
    for h in hooks:
        h.remove()
    x, tau, text, cond_mask = inputs.values()
    for k in range(REF_CONFIG["num_layers"]):
        with torch.no_grad():
            states = model.hidden_states(x, tau, text, k, cond_mask)
        assert states.shape == (B, T * (H // 2) * (W // 2), 128)
        assert (states - seen[k]).abs().max().item() <= 1e-4


# ----------------------------------------------------------------------------- early exit, dtype


def test_early_exit_is_block_k_of_the_full_forward(model, inputs):
    x, tau, text, cond_mask = inputs.values()
    seen, calls = {}, []
    hooks = [blk.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out) or calls.append(i))
             for i, blk in enumerate(model.blocks)]
    with torch.no_grad():
        model(x, tau, text, cond_mask)
        calls.clear()
        states = model.hidden_states(x, tau, text, 1, cond_mask)
    for h in hooks:
        h.remove()
    assert calls == [0, 1]   # block 2 never runs
    assert torch.equal(states, seen[1])


def test_attention_and_adaln_go_through_kernels(model, inputs, monkeypatch):
    """The Triton kernels replace kernels.attention / kernels.modulated_layer_norm: every call must go there."""
    calls = []
    for name in ("attention", "modulated_layer_norm"):
        original = getattr(vm.kernels, name)
        monkeypatch.setattr(vm.kernels, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    with torch.no_grad():
        model(**inputs)
    assert calls.count("attention") == 2 * 3   # self- and cross-attention in each of 3 blocks
    assert calls.count("modulated_layer_norm") == 3 * 3 + 1   # three sub-layers per block, the final layer


def test_bf16_checkpoint_stays_bf16(reference, inputs, tmp_path):
    copy.deepcopy(reference).to(torch.bfloat16).save_pretrained(tmp_path)
    model = cosmos_weights.from_pretrained(tmp_path)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    fp32 = cosmos_weights.from_pretrained(tmp_path, dtype=torch.float32)
    assert {p.dtype for p in fp32.parameters()} == {torch.float32}
    with torch.no_grad():
        v16, v32 = model(**inputs), fp32(**inputs)
    assert v16.dtype == torch.float32   # returned in the input's dtype
    assert (v16 - v32).abs().max().item() < 0.1 * v32.abs().max().item()

# ----------------------------------------------------------------------------- Video2World


def test_video2world_velocity(model, inputs):
    x_tau, _, text, _ = inputs.values()
    g = torch.Generator().manual_seed(2)
    context = torch.randn(B, C, 2, H, W, generator=g)
    tau_v = torch.tensor([0.3, 0.9])
    with torch.no_grad():
        v = model.video2world_velocity(x_tau, tau_v, text, context, 2)
        # the network sees the clean context frames, flagged, at tau_c
        x_in = torch.cat([context, x_tau[:, :, 2:]], dim=2)
        tau = torch.tensor([[vm.TAU_CONTEXT, vm.TAU_CONTEXT, 0.3], [vm.TAU_CONTEXT, vm.TAU_CONTEXT, 0.9]])
        direct = model(x_in, tau, text, torch.tensor([[1.0, 1, 0], [1, 1, 0]]))
        assert torch.allclose(v[:, :, 2:], direct[:, :, 2:], atol=1e-6)
        # so the noisy content of the context frames does not matter ...
        other = model.video2world_velocity(x_tau + torch.randn(x_tau.shape, generator=g) * torch.tensor(
            [1.0, 1, 0]).view(1, 1, T, 1, 1), tau_v, text, context, 2)
        assert torch.equal(other[:, :, 2:], v[:, :, 2:])
        states = model.video2world_hidden_states(x_tau, tau_v, text, context, 2, 1)
        assert torch.equal(states, model.hidden_states(x_in, tau, text, 1, torch.tensor([[1.0, 1, 0], [1, 1, 0]])))
    # ... and x0 there is exactly the clean context
    x0 = flow.x0_from_velocity(x_tau, tau_v, v)
    assert torch.allclose(x0[:, :, :2], context, atol=1e-5)


def test_video2world_context_is_the_training_target_and_stays_fixed(model, inputs):
    _, _, text, _ = inputs.values()
    g = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(B, C, T, H, W, generator=g), torch.randn(B, C, T, H, W, generator=g)
    tau_v = torch.tensor([0.25, 0.6])
    with torch.no_grad():
        v = model.video2world_velocity(flow.interpolate(x0, eps, tau_v), tau_v, text, x0, 1)
    assert torch.allclose(v[:, :, :1], flow.velocity_target(x0, eps)[:, :, :1], atol=1e-5)

    # sampling: context frames hold the clean latents, Euler from tau = 1 to tau_v leaves them untouched
    start = eps.clone()
    start[:, :, :1] = x0[:, :, :1]
    with torch.no_grad():
        out = flow.euler(lambda x, t: model.video2world_velocity(x, t, text, x0, 1), start, 1.0, 0.4, 3)
    assert torch.equal(out[:, :, :1], x0[:, :, :1])
    assert not torch.allclose(out[:, :, 1:], start[:, :, 1:])

# ----------------------------------------------------------------------------- LoRA


@pytest.fixture
def tiny():
    cfg = replace(vm.PRESETS["tiny"], num_layers=2, text_dim=8, in_channels=4)
    torch.manual_seed(0)
    model = randomize(VideoDiT(cfg))
    g = torch.Generator().manual_seed(4)
    args = (torch.randn(2, 4, 2, 4, 4, generator=g), torch.rand(2, 2, generator=g), torch.randn(2, 3, 8, generator=g))
    return model, args


def test_lora_zero_init_unchanged_and_only_adapters_train(tiny):
    model, args = tiny
    before = model(*args).detach()
    model.add_lora(rank=4, alpha=8)
    assert torch.equal(model(*args), before)
    adapted = {n.rsplit(".", 1)[0] for n, _ in model.named_parameters() if n.endswith(".lora_A")}
    per_block = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "cross_attn.q_proj",
                 "cross_attn.k_proj", "cross_attn.v_proj", "cross_attn.out_proj", "mlp.layer1", "mlp.layer2"}
    assert adapted == {"patch_embed", "time_embed.linear_1", "time_embed.linear_2"} | {
        f"blocks.{i}.{n}" for i in range(2) for n in per_block}
    model(*args).square().mean().backward()
    for name, p in model.named_parameters():
        is_adapter = name.endswith((".lora_A", ".lora_B"))
        assert p.requires_grad == is_adapter
        assert (p.grad is not None) == is_adapter, name
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n.endswith(".lora_B"))


def test_lora_fuse_and_save_load(tiny, tmp_path):
    model, args = tiny
    base = {n: p.clone() for n, p in model.state_dict().items()}
    model.add_lora(rank=4, alpha=8)
    randomize(model, seed=5)
    with torch.no_grad():   # keep the base weights, randomise only the adapters (B = 0 would make this trivial)
        for n, p in model.named_parameters():
            if n in base:
                p.copy_(base[n])
        adapted = model(*args)
    checkpoints.save_lora(model, tmp_path / "lora.safetensors")
    saved = load_file(tmp_path / "lora.safetensors")
    assert saved and all(n.endswith((".lora_A", ".lora_B")) for n in saved)

    fresh = VideoDiT(model.cfg)
    fresh.load_state_dict(base)
    with torch.no_grad():
        assert (fresh(*args) - adapted).abs().max() > 1e-3   # the adapters do change the output
        checkpoints.load_lora(fresh, tmp_path / "lora.safetensors")
        assert fresh.lora_config() == (4, 8)
        assert torch.equal(fresh(*args), adapted)
        model.fuse_lora()
        assert model.lora_config() is None and not any("lora" in n for n in model.state_dict())
        assert torch.allclose(model(*args), adapted, atol=1e-5)


def test_activation_checkpointing_gives_the_same_output_and_gradients(tiny):
    model, args = tiny
    model.add_lora(rank=4, alpha=8)
    randomize(model, seed=6)   # B = 0 would leave A without a gradient
    results = []
    for checkpointing in (False, True):
        model.checkpoint_blocks = checkpointing
        model.zero_grad()
        out = model(*args)
        out.square().mean().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (out, grads), (out_ckpt, grads_ckpt) = results
    assert torch.equal(out, out_ckpt) and grads.keys() == grads_ckpt.keys() and len(grads) > 10
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_lora_on_a_bf16_base_trains_fp32_adapters_and_fuses_with_one_rounding(tiny):
    model, args = tiny
    model.to(torch.bfloat16)
    base = {n: p.clone() for n, p in model.state_dict().items()}
    model.add_lora(rank=4, alpha=8)
    adapters = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert adapters and {p.dtype for p in adapters.values()} == {torch.float32}
    assert {p.dtype for n, p in model.named_parameters() if n not in adapters} == {torch.bfloat16}
    opt = torch.optim.AdamW(adapters.values(), lr=1e-2)
    for _ in range(3):   # a few steps: B moves off zero, then A gets a gradient too
        opt.zero_grad()
        model(*args).square().mean().backward()
        opt.step()
    assert all(s["exp_avg"].dtype == torch.float32 for s in opt.state.values())   # AdamW's moments in fp32
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base)   # the base never moves
    with torch.no_grad():
        unfused = model(*args)
        layer = model.blocks[0].mlp.layer1
        single_cast = (layer.weight.float() + layer.lora_scale * layer.lora_B @ layer.lora_A).to(torch.bfloat16)
        model.fuse_lora()
        assert torch.equal(layer.weight, single_cast) and layer.weight.dtype == torch.bfloat16
        fused = model(*args)
    # the fused model differs from the adapted one only by rounding each fused weight once to bf16 (2^-9 relative),
    # which this random bf16 model amplifies to 2.1% of max |v| (measured)
    assert (fused - unfused).abs().max() <= 0.05 * unfused.abs().max()


def test_bad_forward_inputs(model, inputs):
    x, tau, text, cond_mask = inputs.values()
    cases = [((x[:, :3], tau, text), r"x must be latents \(B, 16, T, H, W\)"),
             ((x[..., :3], tau, text), "multiples of the patch size 2"),
             ((x, tau[:, :2], text), r"one flow time per latent frame, shape \(2, 3\)"),
             ((x, tau + 1, text), r"tau must lie in \[0, 1\]"),
             ((x, tau, text[..., :8]), r"text must be encoder states \(2, L, 32\)"),
             ((x, tau, text, cond_mask[:, :1]), r"cond_mask must be \(2, 3\)")]
    for args, error in cases:
        with pytest.raises(ValueError, match=error):
            model(*args)
    with pytest.raises(ValueError, match=r"layer k must be an integer in \[0, 2\]"):
        model.hidden_states(x, tau, text, 3)
    with pytest.raises(ValueError, match=r"tau_v must lie in \(0, 1\]"):
        model.video2world_velocity(x, 0.0, text, x, 1)
    with pytest.raises(ValueError, match=r"n_cond must be an integer in \[0, 2\]"):
        model.video2world_velocity(x, 0.5, text, x, 3)
    with pytest.raises(ValueError, match="unknown video model preset"):
        vm.preset("cosmos-14b")
    with pytest.raises(ValueError, match="head_dim must be an even integer"):
        VideoDiTConfig(head_dim=31)

# ----------------------------------------------------------------------------- RoPE, learning


@settings(max_examples=30, deadline=None)
@given(p=st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(0, 3)),
       q=st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(0, 3)),
       d=st.tuples(st.integers(0, 2), st.integers(0, 2), st.integers(0, 2)), seed=st.integers(0, 2 ** 16))
def test_rope_scores_depend_only_on_relative_position(p, q, d, seed):
    """<R(p) a, R(q) b> = <R(p + d) a, R(q + d) b>: what makes RoPE a relative position code."""
    cfg = vm.PRESETS["tiny"]
    cos, sin = vm.rope_tables(cfg, 6, 6, 6, "cpu")
    index = lambda t, h, w: (t * 6 + h) * 6 + w   # noqa: E731  (t, h, w) token order
    a, b = torch.randn(2, 1, 1, 1, cfg.head_dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    rot = lambda x, pos: vm.apply_rope(x, cos[index(*pos)].double(), sin[index(*pos)].double())   # noqa: E731
    shifted = lambda pos: tuple(i + j for i, j in zip(pos, d))   # noqa: E731
    score = (rot(a, p) * rot(b, q)).sum()
    assert torch.allclose(score, (rot(a, shifted(p)) * rot(b, shifted(q))).sum(), atol=1e-4)


def test_tiny_model_learns_video2world():
    """Flow matching on a tiny world (frame t + 1 = frame t shifted right by one patch): the velocity loss on the
    predicted frame falls well below that of the untrained model, whose output is zero."""
    cfg = replace(vm.PRESETS["tiny"], num_layers=2, in_channels=4, text_dim=8)
    g = torch.Generator().manual_seed(0)
    first = torch.randn(16, 4, 1, 4, 8, generator=g)
    videos = torch.cat([first, first.roll(2, dims=-1)], dim=2)   # (16, 4, 2, 4, 8)
    text = torch.zeros(16, 1, 8)
    torch.manual_seed(0)
    model = VideoDiT(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def loss(n, generator):
        tau_v = torch.rand(n, generator=generator) * 0.8 + 0.1
        eps = torch.randn(videos[:n].shape, generator=generator)
        v = model.video2world_velocity(flow.interpolate(videos[:n], eps, tau_v), tau_v, text[:n], videos[:n], 1)
        return (v - flow.velocity_target(videos[:n], eps))[:, :, 1:].square().mean()

    with torch.no_grad():
        before = loss(16, torch.Generator().manual_seed(9)).item()
    for step in range(150):
        opt.zero_grad()
        loss(16, g).backward()
        opt.step()
    with torch.no_grad():
        after = loss(16, torch.Generator().manual_seed(9)).item()
    print(f"tiny Video2World flow loss: {before:.3f} -> {after:.3f}")
    assert after < 0.2 * before
