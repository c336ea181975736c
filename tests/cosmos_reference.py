"""The independent reference for the video model's tests (its fixtures are in conftest.py): the small random
diffusers CosmosTransformer3DModel's config, its velocity, and NVIDIA's original checkpoint names."""
import re

import torch

# A small model that still exercises the 3D RoPE split (head dim 64 -> t 24, h 20, w 20) and distinct NTK scales.
REF_CONFIG = dict(in_channels=17, out_channels=16, num_attention_heads=2, attention_head_dim=64, num_layers=3,
                  mlp_ratio=2.0, text_embed_dim=32, adaln_lora_dim=16, max_size=(16, 32, 32), patch_size=(1, 2, 2),
                  rope_scale=(2.0, 3.0, 1.5), concat_padding_mask=True, extra_pos_embed_type=None)
B, C, T, H, W, L_TEXT = 2, 16, 3, 4, 6, 5   # H != W; 2 x 3 patches per frame


def reference_velocity(ref, x, tau, text, cond_mask):
    with torch.no_grad():
        return ref(x, tau.view(B, 1, T, 1, 1), text, fps=None,   # fps=None: NVIDIA's RoPE has no fps scaling
                   condition_mask=cond_mask.view(B, 1, T, 1, 1).expand(B, 1, T, H, W),
                   padding_mask=torch.zeros(1, 1, H, W), return_dict=False)[0]


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
