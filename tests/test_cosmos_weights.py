"""cosmos_weights.py: NVIDIA's public checkpoints in every layout they come in, the Hub, and every refusal of a bad
checkpoint (before any weight is read)."""
import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

import cosmos_weights
import diffusers.models.transformers.transformer_cosmos as diffusers_cosmos   # the reference; a test dependency
import video_model as vm
from cosmos_reference import reference_velocity, to_nvidia_names
from video_model import VideoDiT


def test_parity_nvidia_layout(reference, model, inputs, tmp_path):
    state = to_nvidia_names(reference.state_dict())
    # entries of the original checkpoints that are no weights must be skipped
    state["net.pos_embedder.seq"] = torch.arange(8.0)
    state["net.accum_video_sample_counter"] = torch.zeros(1, dtype=torch.int64)
    state["net.blocks.0.self_attn.output_proj._extra_state"] = torch.zeros(2)
    save_file(state, tmp_path / "model.safetensors")
    nvidia = cosmos_weights.from_pretrained(tmp_path / "model.safetensors", config=model.cfg)
    with torch.no_grad():
        got = nvidia(**inputs)
        err = (got - reference_velocity(reference, **inputs)).abs().max().item()
        assert torch.equal(got, model(**inputs))   # the same weights as the diffusers-layout load
    print(f"net.-layout parity: max abs err {err:.2e}")
    assert err <= 1e-4


def test_2b_parameter_names_and_shapes_match_diffusers():
    cfg = vm.PRESETS["cosmos-predict2-2b"]
    with torch.device("meta"):
        ref = diffusers_cosmos.CosmosTransformer3DModel(
            in_channels=17, out_channels=16, num_attention_heads=16, attention_head_dim=128, num_layers=28,
            mlp_ratio=4.0, text_embed_dim=1024, adaln_lora_dim=256, max_size=(128, 240, 240), patch_size=(1, 2, 2),
            rope_scale=(1.0, 3.0, 3.0), concat_padding_mask=True, extra_pos_embed_type=None)
        ours = VideoDiT(cfg)
    theirs = {n: tuple(t.shape) for n, t in ref.state_dict().items()}
    names = cosmos_weights.checkpoint_names(cfg, "diffusers")
    mapped = {n: tuple(ours.state_dict()[names[n]].shape) for n in names}
    assert mapped == theirs
    assert len(ours.state_dict()) == len(names) == 567
    assert sum(p.numel() for p in ours.parameters()) == 1_956_413_440
    assert cosmos_weights.config_from_diffusers(dict(ref.config)) == cfg

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
    return cosmos_weights.config_from_diffusers(json.loads((folders / "single" / "config.json").read_text()))


def test_missing_unexpected_and_misshapen_keys(nvidia_file, folders):
    cfg = small_config(folders)
    with pytest.raises(ValueError, match=r"1 missing keys.*net\.blocks\.2\.mlp\.layer1\.weight"):
        cosmos_weights.from_pretrained(nvidia_file(lambda s: s.pop("net.blocks.2.mlp.layer1.weight")), config=cfg)
    with pytest.raises(ValueError, match=r"1 unexpected keys.*net\.blocks\.0\.self_attn\.q_proj\.bias"):
        cosmos_weights.from_pretrained(nvidia_file(lambda s: s.__setitem__("net.blocks.0.self_attn.q_proj.bias",
                                                                     torch.zeros(128))), config=cfg)
    with pytest.raises(ValueError, match=r"final_layer\.linear\.weight has shape \(64, 100\).*expects \(64, 128\)"):
        cosmos_weights.from_pretrained(nvidia_file(lambda s: s.__setitem__("net.final_layer.linear.weight",
                                                                     torch.zeros(64, 100))), config=cfg)


def test_config_that_does_not_match_the_weights(nvidia_file, folders, tmp_path):
    # the default config (the 2B model) for a small file
    with pytest.raises(ValueError, match=r"does not match the config.*missing keys"):
        cosmos_weights.from_pretrained(nvidia_file())
    # a config.json that disagrees with its weights: one block too many, a wrong text width
    for key, value, error in [("num_layers", 4, r"missing keys.*transformer_blocks\.3\."),
                              ("text_embed_dim", 48, r"attn2\.to_k\.weight has shape \(128, 32\).*\(128, 48\)")]:
        folder = tmp_path / key
        shutil.copytree(folders / "single", folder)
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(ValueError, match=error):
            cosmos_weights.from_pretrained(folder)
    # a config argument that contradicts config.json
    with pytest.raises(ValueError, match="differs from the given"):
        cosmos_weights.from_pretrained(folders / "single", config=vm.PRESETS["tiny"])


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
        cosmos_weights.from_pretrained(tmp_path / "m")


def test_truncated_and_foreign_files(nvidia_file, folders, tmp_path):
    cfg = small_config(folders)
    data = nvidia_file().read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.safetensors").write_text("definitely not a tensor file " * 20)
    for name in ("cut.safetensors", "text.safetensors"):
        with pytest.raises(ValueError, match=f"{name}: not a valid safetensors file"):
            cosmos_weights.from_pretrained(tmp_path / name, config=cfg)
    # one truncated shard: an error, not a partly loaded model
    shutil.copytree(folders / "sharded", tmp_path / "sharded")
    shard = sorted((tmp_path / "sharded").glob("*-00002-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(ValueError, match=f"{shard.name}: not a valid safetensors file"):
        cosmos_weights.from_pretrained(tmp_path / "sharded")


def test_pickles_are_refused(reference, tmp_path):
    state = reference.state_dict()
    torch.save(state, tmp_path / "model.pt")
    torch.save(state, tmp_path / "disguised.safetensors")   # a zip archive whatever the name says
    for name in ("model.pt", "disguised.safetensors"):
        with pytest.raises(ValueError, match="refusing to load a pickle.*arbitrary code"):
            cosmos_weights.from_pretrained(tmp_path / name)
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "config.json").write_text(json.dumps(dict(reference.config)))
    torch.save(state, tmp_path / "folder" / "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError, match="refusing to load a pickle"):
        cosmos_weights.from_pretrained(tmp_path / "folder")


def test_missing_source(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="not a Hugging Face repo id"):
        cosmos_weights.from_pretrained(tmp_path / "nothing" / "here")

    def offline(repo_id, allow_patterns):
        raise ConnectionError("no network")

    monkeypatch.setattr(cosmos_weights, "snapshot_download", offline)
    with pytest.raises(FileNotFoundError, match="fetching it as a Hugging Face repo id failed: ConnectionError"):
        cosmos_weights.from_pretrained("owner/no-such-model")


def test_hub_repo_id_fetches_only_the_transformer(folders, inputs, model, tmp_path, monkeypatch):
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns):
        calls.append((repo_id, allow_patterns))
        shutil.copytree(folders / "sharded", tmp_path / "snapshot" / "transformer")
        return str(tmp_path / "snapshot")

    monkeypatch.setattr(cosmos_weights, "snapshot_download", fake_snapshot_download)
    hub = cosmos_weights.from_pretrained("nvidia/Cosmos-Predict2-2B-Video2World")
    assert calls[0][0] == "nvidia/Cosmos-Predict2-2B-Video2World"
    assert all(p.startswith("transformer/") for p in calls[0][1])
    with torch.no_grad():
        assert torch.equal(hub(**inputs), model(**inputs))
    # a local pipeline folder (transformer/ inside) works the same way
    assert cosmos_weights.from_pretrained(tmp_path / "snapshot").cfg == model.cfg
