"""NVIDIA's public Cosmos-Predict2 checkpoints into video_model.VideoDiT: the diffusers layout (config.json plus one
or several safetensors shards), NVIDIA's original `net.` names in a single safetensors file, or a Hub repo id.

    video = cosmos_weights.from_pretrained("nvidia/Cosmos-Predict2-2B-Video2World")   # only transformer/ is fetched

Every name and shape is checked before any weight is read; each weight is read straight into its parameter (one
copy in memory); pickles are refused. Not here: the model itself (video_model.py), this project's own checkpoint
files (checkpoints.py).
"""
import json
import re
from dataclasses import replace
from pathlib import Path

import torch
from huggingface_hub import snapshot_download

import checkpoints
import video_model
from video_model import VideoDiT, VideoDiTConfig


def from_pretrained(source, config=None, dtype=None):
    """Load Cosmos-Predict2 weights without unpickling anything and without a second copy in memory.

    source: a diffusers-layout folder (config.json + diffusion_pytorch_model*.safetensors, sharded with an
    index json or single; a pipeline folder with a transformer/ subfolder also works), a single safetensors
    file (NVIDIA's original `net.` names or diffusers names; its config is `config`, default the 2B preset),
    or a Hub repo id such as "nvidia/Cosmos-Predict2-2B-Video2World" (only transformer/ is downloaded).
    config: for a folder, config.json decides and config may differ only in qk_norm_eps (1e-5 reproduces
    diffusers exactly).
    dtype: None keeps the checkpoint's (bf16 for the public weights). Every check runs before any weight is
    read, so a bad checkpoint raises instead of giving a half-loaded model.
    """
    path = _resolve(source)
    if path.is_dir():
        files, cfg = _diffusers_folder(path)
        if config is not None:   # config.json fixes the architecture; config may only choose qk_norm_eps
            if replace(config, qk_norm_eps=cfg.qk_norm_eps) != cfg:
                raise ValueError(f"{path}/config.json describes {cfg}, which differs from the given {config}")
            cfg = config
    else:
        if _is_pickle(path):
            raise ValueError(f"{path}: {_PICKLE_REFUSAL}")
        files, cfg = [path], config or video_model.PRESETS["cosmos-predict2-2b"]
    headers, _ = checkpoints.read_headers(files)
    nvidia = any(name.startswith("net.") for name in headers)
    if nvidia:
        headers = {n: h for n, h in headers.items() if not _not_a_weight(n)}
    names = checkpoint_names(cfg, "nvidia" if nvidia else "diffusers")   # checkpoint name -> ours
    with torch.device("meta"):   # shapes only: the weights are allocated once, by reading them
        model = VideoDiT(cfg)
    expected = {ours: tuple(p.shape) for ours, p in model.state_dict().items()}
    checkpoints.check_names_and_shapes(expected, {n: shape for n, (_, shape, _) in headers.items()}, names, path,
                                       f"the config {cfg}")
    dtypes = {d for _, _, d in headers.values()}
    if not all(d.is_floating_point for d in dtypes):
        raise ValueError(f"{path}: weights must be floating point, the checkpoint holds {sorted(map(str, dtypes))}")
    if dtype is None and len(dtypes) > 1:
        raise ValueError(f"{path}: the checkpoint mixes dtypes {sorted(map(str, dtypes))}; pass dtype=")
    model.load_state_dict(checkpoints.read_tensors(headers, names, dtype), assign=True)   # reads become parameters
    return model


# ----------------------------------------------------------------------------- checkpoint names

# (ours, diffusers layout, NVIDIA's original names without their "net." prefix)
_TOP_NAMES = [
    ("patch_embed.weight", "patch_embed.proj.weight", "x_embedder.proj.1.weight"),
    ("time_embed.linear_1.weight", "time_embed.t_embedder.linear_1.weight", "t_embedder.1.linear_1.weight"),
    ("time_embed.linear_2.weight", "time_embed.t_embedder.linear_2.weight", "t_embedder.1.linear_2.weight"),
    ("time_embed.norm.weight", "time_embed.norm.weight", "t_embedding_norm.weight"),
    ("final.adaln.down.weight", "norm_out.linear_1.weight", "final_layer.adaln_modulation.1.weight"),
    ("final.adaln.up.weight", "norm_out.linear_2.weight", "final_layer.adaln_modulation.2.weight"),
    ("final.linear.weight", "proj_out.weight", "final_layer.linear.weight"),
]
# within block i: blocks.{i}. / transformer_blocks.{i}. / blocks.{i}.
_BLOCK_NAMES = [
    (f"{ours}.{proj}.weight", f"{attn}.{diffusers}.weight", f"{ours}.{nvidia}.weight")
    for ours, attn in (("self_attn", "attn1"), ("cross_attn", "attn2"))
    for proj, diffusers, nvidia in (("q_proj", "to_q", "q_proj"), ("k_proj", "to_k", "k_proj"),
                                    ("v_proj", "to_v", "v_proj"), ("out_proj", "to_out.0", "output_proj"),
                                    ("q_norm", "norm_q", "q_norm"), ("k_norm", "norm_k", "k_norm"))
] + [
    ("mlp.layer1.weight", "ff.net.0.proj.weight", "mlp.layer1.weight"),
    ("mlp.layer2.weight", "ff.net.2.weight", "mlp.layer2.weight"),
] + [
    (f"adaln_{sub}.{ours}.weight", f"norm{n}.linear_{i}.weight", f"adaln_modulation_{sub}.{i}.weight")
    for n, sub in ((1, "self_attn"), (2, "cross_attn"), (3, "mlp"))
    for i, ours in ((1, "down"), (2, "up"))
]


def checkpoint_names(cfg, layout):
    """{checkpoint parameter name: our parameter name} for layout "diffusers" or "nvidia"."""
    column = {"diffusers": 1, "nvidia": 2}[layout]
    block = {"diffusers": "transformer_blocks", "nvidia": "blocks"}[layout]
    prefix = "net." if layout == "nvidia" else ""
    names = {prefix + row[column]: row[0] for row in _TOP_NAMES}
    for i in range(cfg.num_layers):
        names.update({f"{prefix}{block}.{i}.{row[column]}": f"blocks.{i}.{row[0]}" for row in _BLOCK_NAMES})
    return names


def _not_a_weight(name):
    """Entries of NVIDIA's checkpoints that are no weights: RoPE buffers, training counters, TransformerEngine state."""
    return name.startswith(("net.pos_embedder.", "net.accum_")) or name.endswith("._extra_state")

# ----------------------------------------------------------------------------- files


_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")
_PICKLE_REFUSAL = ("refusing to load a pickle (torch.save) checkpoint: unpickling can run arbitrary code. "
                   "Use the safetensors files (diffusers layout) or convert this one to safetensors yourself")


def _resolve(source, subfolder="transformer"):
    """A local file or folder as is; a folder holding transformer/config.json -> that subfolder; else a Hub repo id."""
    path = Path(source)
    if path.exists():
        return path / subfolder if (path / subfolder / "config.json").is_file() else path
    if re.fullmatch(r"[\w.-]+/[\w.-]+", str(source)):
        patterns = [f"{subfolder}/config.json", f"{subfolder}/*.safetensors", f"{subfolder}/*.safetensors.index.json"]
        try:
            return Path(snapshot_download(str(source), allow_patterns=patterns)) / subfolder
        except Exception as e:   # offline, unknown repo, no access: say what was tried
            raise FileNotFoundError(f"{source}: not a local path, and fetching it as a Hugging Face repo id failed: "
                                    f"{type(e).__name__}: {e}") from e
    raise FileNotFoundError(f"{source}: no such file or folder, and not a Hugging Face repo id (owner/name)")


def _is_pickle(path):
    with open(path, "rb") as f:
        zip_archive = f.read(4) == b"PK\x03\x04"   # what torch.save writes
    return zip_archive or path.suffix.lower() in _PICKLE_SUFFIXES


def _diffusers_folder(folder):
    """The weight files and config of a diffusers-layout transformer folder."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder}: no config.json; a diffusers-layout folder needs one (or pass a "
                                f"single .safetensors file with config=)")
    index = sorted(folder.glob("*.safetensors.index.json"))
    if index:
        try:
            weight_map = json.loads(index[0].read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index[0]}: not a safetensors index (needs a 'weight_map'): {e}") from None
        files = [folder / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"{index[0]} lists the shard {f.name}, which is not in {folder}")
    else:
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            pickles = [f.name for f in folder.iterdir() if f.suffix.lower() in _PICKLE_SUFFIXES]
            if pickles:
                raise ValueError(f"{folder}: only {pickles}: {_PICKLE_REFUSAL}")
            raise FileNotFoundError(f"{folder}: no *.safetensors weight files")
        if len(files) > 1:
            raise ValueError(f"{folder}: {len(files)} safetensors files and no index json to say which are shards")
    return files, config_from_diffusers(json.loads(config_file.read_text()), config_file)


def config_from_diffusers(d, source="config.json"):
    """Our config from a diffusers CosmosTransformer3DModel config.json, refusing variants this model is not."""
    required = ("in_channels", "out_channels", "num_attention_heads", "attention_head_dim", "num_layers", "mlp_ratio",
                "text_embed_dim", "adaln_lora_dim", "patch_size", "rope_scale", "concat_padding_mask",
                "extra_pos_embed_type")
    missing = [k for k in required if k not in d]
    if missing:
        raise ValueError(f"{source}: missing {missing}; is this a CosmosTransformer3DModel config?")
    # Cosmos-Predict2 Video2World: padding-mask channel, no learned positions, no extra projections or branches
    expected = {"concat_padding_mask": True, "extra_pos_embed_type": None, "use_crossattn_projection": False,
                "img_context_dim_in": None, "controlnet_block_every_n": None}
    for key, value in expected.items():
        if d.get(key, value) != value:
            raise ValueError(f"{source}: {key} = {d[key]!r} is not supported "
                             f"(Cosmos-Predict2 Video2World has {value!r})")
    pt, ph, pw = d["patch_size"]
    if pt != 1 or ph != pw:
        raise ValueError(f"{source}: patch_size {d['patch_size']} is not supported, expected (1, p, p)")
    if d["out_channels"] != d["in_channels"] - 1:   # diffusers' in_channels counts the condition-mask channel
        raise ValueError(f"{source}: in_channels = {d['in_channels']} and out_channels = {d['out_channels']}; "
                         f"Video2World needs in_channels = latent channels + 1 (condition mask) = out_channels + 1")
    return VideoDiTConfig(in_channels=d["out_channels"], patch=ph, num_heads=d["num_attention_heads"],
                          head_dim=d["attention_head_dim"], num_layers=d["num_layers"], mlp_ratio=d["mlp_ratio"],
                          text_dim=d["text_embed_dim"], adaln_lora_dim=d["adaln_lora_dim"],
                          rope_scale=tuple(float(r) for r in d["rope_scale"]))
