"""Activation memory of the 2B video model in stage 1, from what autograd saves for the backward: measured on the
CPU on blocks of the 2B's width (bf16 weights, LoRA rank 256) at a few token counts, per block and for the rest,
with and without activation checkpointing, then scaled to the recipe's 28 blocks and 19,200 tokens (480x640,
5 + 56 frames: 16 latent frames of 30 x 40 patches). The scaling is linear in the tokens, which holds where
attention stores O(tokens) (FlashAttention; torch's CPU attention here); the numbers printed say which are
measured and which extrapolated.

    python benchmarks/activation_memory.py
"""
import os
import sys
from dataclasses import replace

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import video_model  # noqa: E402


def saved_bytes(model, x, tau, text):
    """Bytes of the tensors autograd keeps for the backward of one stage-1 forward: each storage once, the
    model's own weights (which it saves too, but which exist anyway) left out."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, tau, text).float().square().mean()
    return sum(seen.values())


def main():
    torch.manual_seed(0)
    cfg2b = video_model.preset("cosmos-predict2-2b")
    rows = {}
    for layers in (1, 2):
        with torch.device("cpu"):
            model = video_model.VideoDiT(replace(cfg2b, num_layers=layers)).to(torch.bfloat16)
        model.add_lora(256, 32.0)
        for T, h, w in ((2, 10, 20), (4, 10, 20), (8, 10, 20)):    # 400, 800, 1600 tokens
            x = torch.randn(1, cfg2b.in_channels, T, h * 2, w * 2)
            tau, text = torch.full((1, T), 0.5), torch.randn(1, 512, cfg2b.text_dim)
            for ckpt in (False, True):
                model.checkpoint_blocks = ckpt
                rows[(layers, T * h * w, ckpt)] = saved_bytes(model, x, tau, text)
    print("measured (bytes autograd saves, one sample):")
    for (layers, n, ckpt), b in sorted(rows.items()):
        print(f"  {layers} block(s), {n:5d} tokens, checkpointing {ckpt!s:5}: {b / 2**20:8.1f} MiB")
    N, L = 16 * 30 * 40, cfg2b.num_layers
    for ckpt in (False, True):
        per_block = {n: rows[(2, n, ckpt)] - rows[(1, n, ckpt)] for n in (400, 800, 1600)}
        rest = {n: rows[(1, n, ckpt)] - per_block[n] for n in (400, 800, 1600)}
        slope_block, slope_rest = ((d[1600] - d[800]) / 800 for d in (per_block, rest))
        linear = (per_block[800] - per_block[400]) / 400 / slope_block
        print(f"checkpointing {ckpt}: per-block bytes per token from 400 -> 800 tokens / from 800 -> 1600: "
              f"{linear:.3f} (1: linear in the tokens)")
        block_at_n = per_block[400] + slope_block * (N - 400)
        rest_at_n = rest[400] + slope_rest * (N - 400)
        total = L * block_at_n + rest_at_n
        print(f"extrapolated to {L} blocks, {N} tokens, checkpointing {ckpt}: {block_at_n / 2**30:.2f} GiB per "
              f"block, {rest_at_n / 2**30:.2f} GiB the rest, {total / 2**30:.1f} GiB per sample")
    print("(with checkpointing the backward recomputes one block at a time: add one block's activations without "
          "checkpointing to the peak)")


if __name__ == "__main__":
    main()
