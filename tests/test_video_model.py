"""video_model.py against diffusers' CosmosTransformer3DModel (the reference), plus its own contracts:
early exit, Video2World conditioning, LoRA, loading and every refusal of bad input."""
import copy
import json
import re
import shutil
import types
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from safetensors.torch import load_file, save_file

import diffusers.models.transformers.transformer_cosmos as diffusers_cosmos   # the reference; a test dependency
import flow
import video_model as vm
from video_model import VideoDiT, VideoDiTConfig


# A small model that still exercises the 3D RoPE split (head dim 64 -> t 24, h 20, w 20) and distinct NTK scales.
REF_CONFIG = dict(in_channels=17, out_channels=16, num_attention_heads=2, attention_head_dim=64, num_layers=3,
                  mlp_ratio=2.0, text_embed_dim=32, adaln_lora_dim=16, max_size=(16, 32, 32), patch_size=(1, 2, 2),
                  rope_scale=(2.0, 3.0, 1.5), concat_padding_mask=True, extra_pos_embed_type=None)
B, C, T, H, W, L_TEXT = 2, 16, 3, 4, 6, 5   # H != W; 2 x 3 patches per frame


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These shapes are tiny: a second thread gains nothing, and on a busy 2-core machine each parallel op would
    wait for a descheduled thread (measured: 100x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference():
    """A random diffusers model (every weight randomised, norms included), in fp32."""
    torch.manual_seed(0)
    ref = diffusers_cosmos.CosmosTransformer3DModel(**REF_CONFIG).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if p.ndim == 1 else torch.randn_like(p) / p.shape[1] ** 0.5)
    # diffusers resizes its (all-zero) padding mask with torchvision, which the CI does not install
    resize = lambda img, size, interpolation: F.interpolate(img, size=size, mode="nearest")   # noqa: E731
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(diffusers_cosmos, "transforms", types.SimpleNamespace(
            functional=types.SimpleNamespace(resize=resize), InterpolationMode=types.SimpleNamespace(NEAREST=None)),
            raising=False)
        yield ref


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    cond_mask = torch.zeros(B, T)
    cond_mask[:, 0] = 1
    cond_mask[1, 1] = 1   # one or two context frames
    return dict(x=torch.randn(B, C, T, H, W, generator=g), tau=torch.rand(B, T, generator=g),
                text=torch.randn(B, L_TEXT, 32, generator=g), cond_mask=cond_mask)


def reference_velocity(ref, x, tau, text, cond_mask):
    with torch.no_grad():
        return ref(x, tau.view(B, 1, T, 1, 1), text, fps=None,   # fps=None: NVIDIA's RoPE has no fps scaling
                   condition_mask=cond_mask.view(B, 1, T, 1, 1).expand(B, 1, T, H, W),
                   padding_mask=torch.zeros(1, 1, H, W), return_dict=False)[0]


@pytest.fixture(scope="module")
def folders(reference, tmp_path_factory):
    """The reference saved by diffusers: sharded with an index json, and as one file."""
    root = tmp_path_factory.mktemp("ckpt")
    reference.save_pretrained(root / "sharded", max_shard_size="300KB")
    reference.save_pretrained(root / "single")
    assert len(list((root / "sharded").glob("*.safetensors"))) > 1
    assert len(list((root / "single").glob("*.safetensors"))) == 1
    return root


@pytest.fixture(scope="module")
def model(folders):
    return VideoDiT.from_pretrained(folders / "single").eval()


def to_nvidia_names(state):
    """diffusers names -> NVIDIA's original ones (net. prefix), written from the reference's name table."""
    rules = [(r"^patch_embed\.proj\.", "x_embedder.proj.1."), (r"^time_embed\.t_embedder\.", "t_embedder.1."),
             (r"^time_embed\.norm\.", "t_embedding_norm."),
             (r"^norm_out\.linear_(\d)\.", r"final_layer.adaln_modulation.\1."),
             (r"^proj_out\.", "final_layer.linear."), (r"^transformer_blocks\.", "blocks."),
             (r"attn1\.to_out\.0\.", "self_attn.output_proj."), (r"attn2\.to_out\.0\.", "cross_attn.output_proj."),
             (r"attn1\.to_([qkv])\.", r"self_attn.\1_proj."), (r"attn2\.to_([qkv])\.", r"cross_attn.\1_proj."),
             (r"attn1\.norm_([qk])\.", r"self_attn.\1_norm."), (r"attn2\.norm_([qk])\.", r"cross_attn.\1_norm."),
             (r"ff\.net\.0\.proj\.", "mlp.layer1."), (r"ff\.net\.2\.", "mlp.layer2."),
             (r"norm1\.linear_(\d)\.", r"adaln_modulation_self_attn.\1."),
             (r"norm2\.linear_(\d)\.", r"adaln_modulation_cross_attn.\1."),
             (r"norm3\.linear_(\d)\.", r"adaln_modulation_mlp.\1.")]
    out = {}
    for name, t in state.items():
        for pattern, repl in rules:
            name = re.sub(pattern, repl, name)
        out["net." + name] = t.contiguous()
    return out


def randomize(model, seed=0):
    """Random weights everywhere (a fresh model's zero-initialised modulations would make many checks trivial)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / (p.shape[-1] ** 0.5 if p.ndim > 1 else 4) + (p.ndim == 1))
    return model

# ----------------------------------------------------------------------------- parity with diffusers


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_parity_with_diffusers(reference, folders, inputs, layout):
    model = VideoDiT.from_pretrained(folders / layout)
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
    cfg = replace(VideoDiT.from_pretrained(folders / "single").cfg, qk_norm_eps=1e-5)
    model = VideoDiT.from_pretrained(folders / "single", config=cfg)
    with torch.no_grad():
        err = (model(**inputs) - reference_velocity(reference, **inputs)).abs().max().item()
    print(f"diffusers-layout parity, QK-norm eps 1e-5 as diffusers: max abs err {err:.2e}")
    assert err <= 1e-5


def test_parity_nvidia_layout(reference, model, inputs, tmp_path):
    state = to_nvidia_names(reference.state_dict())
    # entries of the original checkpoints that are no weights must be skipped
    state["net.pos_embedder.seq"] = torch.arange(8.0)
    state["net.accum_video_sample_counter"] = torch.zeros(1, dtype=torch.int64)
    state["net.blocks.0.self_attn.output_proj._extra_state"] = torch.zeros(2)
    save_file(state, tmp_path / "model.safetensors")
    nvidia = VideoDiT.from_pretrained(tmp_path / "model.safetensors", config=model.cfg)
    with torch.no_grad():
        got = nvidia(**inputs)
        err = (got - reference_velocity(reference, **inputs)).abs().max().item()
        assert torch.equal(got, model(**inputs))   # the same weights as the diffusers-layout load
    print(f"net.-layout parity: max abs err {err:.2e}")
    assert err <= 1e-4


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


def test_2b_parameter_names_and_shapes_match_diffusers():
    cfg = vm.PRESETS["cosmos-predict2-2b"]
    with torch.device("meta"):
        ref = diffusers_cosmos.CosmosTransformer3DModel(
            in_channels=17, out_channels=16, num_attention_heads=16, attention_head_dim=128, num_layers=28,
            mlp_ratio=4.0, text_embed_dim=1024, adaln_lora_dim=256, max_size=(128, 240, 240), patch_size=(1, 2, 2),
            rope_scale=(1.0, 3.0, 3.0), concat_padding_mask=True, extra_pos_embed_type=None)
        ours = VideoDiT(cfg)
    theirs = {n: tuple(t.shape) for n, t in ref.state_dict().items()}
    names = vm.checkpoint_names(cfg, "diffusers")
    mapped = {n: tuple(ours.state_dict()[names[n]].shape) for n in names}
    assert mapped == theirs
    assert len(ours.state_dict()) == len(names) == 567
    assert sum(p.numel() for p in ours.parameters()) == 1_956_413_440
    assert vm.config_from_diffusers(dict(ref.config)) == cfg

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
    model = VideoDiT.from_pretrained(tmp_path)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    fp32 = VideoDiT.from_pretrained(tmp_path, dtype=torch.float32)
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
    model.save_lora(tmp_path / "lora.safetensors")
    saved = load_file(tmp_path / "lora.safetensors")
    assert saved and all(n.endswith((".lora_A", ".lora_B")) for n in saved)

    fresh = VideoDiT(model.cfg)
    fresh.load_state_dict(base)
    with torch.no_grad():
        assert (fresh(*args) - adapted).abs().max() > 1e-3   # the adapters do change the output
        fresh.load_lora(tmp_path / "lora.safetensors")
        assert fresh.lora_config() == (4, 8)
        assert torch.equal(fresh(*args), adapted)
        model.fuse_lora()
        assert model.lora_config() is None and not any("lora" in n for n in model.state_dict())
        assert torch.allclose(model(*args), adapted, atol=1e-5)


def test_lora_file_errors(tiny, tmp_path):
    model, _ = tiny
    model.add_lora(rank=4, alpha=8)
    model.save_lora(tmp_path / "a.safetensors")
    other = VideoDiT(model.cfg)
    other.add_lora(rank=2, alpha=8)
    with pytest.raises(ValueError, match="rank 4"):
        other.load_lora(tmp_path / "a.safetensors")
    adapters = load_file(tmp_path / "a.safetensors")
    adapters.pop("blocks.1.mlp.layer2.lora_B")
    save_file(adapters, tmp_path / "b.safetensors", metadata={"lora_rank": "4", "lora_alpha": "8"})
    with pytest.raises(ValueError, match=r"missing keys.*blocks\.1\.mlp\.layer2\.lora_B"):
        VideoDiT(model.cfg).load_lora(tmp_path / "b.safetensors")
    save_file(adapters, tmp_path / "c.safetensors")
    with pytest.raises(ValueError, match="not a LoRA adapter file"):
        VideoDiT(model.cfg).load_lora(tmp_path / "c.safetensors")

# ----------------------------------------------------------------------------- bad input


@pytest.fixture
def nvidia_file(reference, tmp_path):
    def write(edit=lambda state: None, name="model.safetensors"):
        state = to_nvidia_names(reference.state_dict())
        edit(state)
        save_file(state, tmp_path / name)
        return tmp_path / name
    return write


def small_config(folders):
    return vm.config_from_diffusers(json.loads((folders / "single" / "config.json").read_text()))


def test_missing_unexpected_and_misshapen_keys(nvidia_file, folders):
    cfg = small_config(folders)
    with pytest.raises(ValueError, match=r"1 missing keys.*net\.blocks\.2\.mlp\.layer1\.weight"):
        VideoDiT.from_pretrained(nvidia_file(lambda s: s.pop("net.blocks.2.mlp.layer1.weight")), config=cfg)
    with pytest.raises(ValueError, match=r"1 unexpected keys.*net\.blocks\.0\.self_attn\.q_proj\.bias"):
        VideoDiT.from_pretrained(nvidia_file(lambda s: s.__setitem__("net.blocks.0.self_attn.q_proj.bias",
                                                                     torch.zeros(128))), config=cfg)
    with pytest.raises(ValueError, match=r"final_layer\.linear\.weight has shape \(64, 100\).*expects \(64, 128\)"):
        VideoDiT.from_pretrained(nvidia_file(lambda s: s.__setitem__("net.final_layer.linear.weight",
                                                                     torch.zeros(64, 100))), config=cfg)


def test_config_that_does_not_match_the_weights(nvidia_file, folders, tmp_path):
    # the default config (the 2B model) for a small file
    with pytest.raises(ValueError, match=r"does not match the config.*missing keys"):
        VideoDiT.from_pretrained(nvidia_file())
    # a config.json that disagrees with its weights: one block too many, a wrong text width
    for key, value, error in [("num_layers", 4, r"missing keys.*transformer_blocks\.3\."),
                              ("text_embed_dim", 48, r"attn2\.to_k\.weight has shape \(128, 32\).*\(128, 48\)")]:
        folder = tmp_path / key
        shutil.copytree(folders / "single", folder)
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(ValueError, match=error):
            VideoDiT.from_pretrained(folder)
    # a config argument that contradicts config.json
    with pytest.raises(ValueError, match="differs from the given"):
        VideoDiT.from_pretrained(folders / "single", config=vm.PRESETS["tiny"])


@pytest.mark.parametrize("key,value,error", [
    ("extra_pos_embed_type", "learnable", "extra_pos_embed_type = 'learnable' is not supported"),
    ("patch_size", [2, 2, 2], r"patch_size \[2, 2, 2\] is not supported"),
    ("out_channels", 17, "in_channels = latent channels \\+ 1"),
    ("num_layers", None, r"missing \['num_layers'\]"),
])
def test_unsupported_config_json(folders, tmp_path, key, value, error):
    shutil.copytree(folders / "single", tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    if value is None:
        del config[key]
    else:
        config[key] = value
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=error):
        VideoDiT.from_pretrained(tmp_path / "m")


def test_truncated_and_foreign_files(nvidia_file, folders, tmp_path):
    cfg = small_config(folders)
    data = nvidia_file().read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.safetensors").write_text("definitely not a tensor file " * 20)
    for name in ("cut.safetensors", "text.safetensors"):
        with pytest.raises(ValueError, match=f"{name}: not a valid safetensors file"):
            VideoDiT.from_pretrained(tmp_path / name, config=cfg)
    # one truncated shard: an error, not a partly loaded model
    shutil.copytree(folders / "sharded", tmp_path / "sharded")
    shard = sorted((tmp_path / "sharded").glob("*-00002-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(ValueError, match=f"{shard.name}: not a valid safetensors file"):
        VideoDiT.from_pretrained(tmp_path / "sharded")


def test_pickles_are_refused(reference, tmp_path):
    state = reference.state_dict()
    torch.save(state, tmp_path / "model.pt")
    torch.save(state, tmp_path / "disguised.safetensors")   # a zip archive whatever the name says
    for name in ("model.pt", "disguised.safetensors"):
        with pytest.raises(ValueError, match="refusing to load a pickle.*arbitrary code"):
            VideoDiT.from_pretrained(tmp_path / name)
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "config.json").write_text(json.dumps(dict(reference.config)))
    torch.save(state, tmp_path / "folder" / "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError, match="refusing to load a pickle"):
        VideoDiT.from_pretrained(tmp_path / "folder")


def test_missing_source(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="not a Hugging Face repo id"):
        VideoDiT.from_pretrained(tmp_path / "nothing" / "here")

    def offline(repo_id, allow_patterns):
        raise ConnectionError("no network")

    monkeypatch.setattr(vm, "snapshot_download", offline)
    with pytest.raises(FileNotFoundError, match="fetching it as a Hugging Face repo id failed: ConnectionError"):
        VideoDiT.from_pretrained("owner/no-such-model")


def test_hub_repo_id_fetches_only_the_transformer(folders, inputs, model, tmp_path, monkeypatch):
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns):
        calls.append((repo_id, allow_patterns))
        shutil.copytree(folders / "sharded", tmp_path / "snapshot" / "transformer")
        return str(tmp_path / "snapshot")

    monkeypatch.setattr(vm, "snapshot_download", fake_snapshot_download)
    hub = VideoDiT.from_pretrained("nvidia/Cosmos-Predict2-2B-Video2World")
    assert calls[0][0] == "nvidia/Cosmos-Predict2-2B-Video2World"
    assert all(p.startswith("transformer/") for p in calls[0][1])
    with torch.no_grad():
        assert torch.equal(hub(**inputs), model(**inputs))
    # a local pipeline folder (transformer/ inside) works the same way
    assert VideoDiT.from_pretrained(tmp_path / "snapshot").cfg == model.cfg


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
