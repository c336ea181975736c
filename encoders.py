"""The frozen encoders a Video-Action Model sees its inputs through: camera frames -> video latents, instructions ->
text states. Both stay frozen in both training stages and at inference.

Here the two stand-ins that the built-in world trains with, which need no download and cost nothing:
  - SpaceToDepth, in place of the video VAE (Cosmos-Predict2 uses Wan2.1's: 16 channels, 8x smaller, 4x fewer
    frames): a fixed, exactly invertible rearrangement of pixels into latent channels;
  - TextEncoder, in place of T5: a fixed pseudo-random vector per word plus a position code.
Not here: the models that read these latents and states (video_model.py), the dataset format (data.py).
"""
import hashlib
import math
import re

import numpy as np
import torch

# ----------------------------------------------------------------------------- the "latent" tokenizer stand-in


class SpaceToDepth:
    """Stand-in for the video VAE (Cosmos-Predict2 uses Wan2.1's, 16 channels, 8x smaller): a fixed, exactly
    invertible, parameter-free map from frames to "latents" shaped as the video DiT expects them, one latent frame
    per frame:

        z[b, c f^2 + i f + j, t, y, x] = frame[b, t, f y + i, f x + j, c] / 127.5 - 1        (values in [-1, 1])
    """

    def __init__(self, factor=2):
        self.f = factor

    def channels(self, frame_channels=3):
        return frame_channels * self.f ** 2

    def encode(self, frames):
        """(B, T, H, W, C) uint8 -> (B, C f^2, T, H / f, W / f) float32."""
        if frames.dtype != torch.uint8 or frames.ndim != 5:
            raise ValueError(f"frames must be (B, T, H, W, C) uint8, got {tuple(frames.shape)} {frames.dtype}")
        B, T, H, W, C = frames.shape
        f = self.f
        if H % f or W % f:
            raise ValueError(f"frame size {H}x{W} is not divisible by the space-to-depth factor {f}")
        x = frames.float() / 127.5 - 1
        x = x.view(B, T, H // f, f, W // f, f, C).permute(0, 6, 3, 5, 1, 2, 4)   # (B, C, i, j, T, y, x)
        return x.reshape(B, C * f * f, T, H // f, W // f)

    def decode(self, latents, frame_channels=3):
        """(B, C f^2, T, h, w) float -> (B, T, h f, w f, C) uint8; decode(encode(x)) == x exactly."""
        B, Cff, T, h, w = latents.shape
        f, C = self.f, frame_channels
        if Cff != C * f * f:
            raise ValueError(f"latents have {Cff} channels, expected {C} x {f}^2 = {C * f * f}")
        x = latents.reshape(B, C, f, f, T, h, w).permute(0, 4, 5, 2, 6, 3, 1)    # (B, T, y, i, x, j, C)
        x = ((x.float() + 1) * 127.5).round().clamp(0, 255)
        return x.to(torch.uint8).reshape(B, T, h * f, w * f, C)

# ----------------------------------------------------------------------------- the text-encoder stand-in


class TextEncoder:
    """Stand-in for the frozen T5 encoder (no download): an instruction becomes (L, D) float32 "encoder states",
    one row per word, zero past the last word, as T5 states past the prompt are.

        state_i = w(word_i) + 0.5 pos(i)

    w(word) is a fixed pseudo-random vector with entries uniform in [-sqrt(3), sqrt(3)] (unit variance), read from
    the SHAKE-256 hash of the word: stable across machines, numpy versions and runs, and every word gets one, even
    one never seen. pos(i) = [sin(i / 10000^(2k/D)), cos(i / 10000^(2k/D))]_k is the Transformer's position code;
    without it "stack the red block on the blue block" and "... blue ... on the red ..." would be the same set of
    rows. Words are the lower-cased runs of letters and digits.
    """

    def __init__(self, length=16, dim=64):
        if dim % 2 or dim < 2 or length < 1:
            raise ValueError(f"text encoder needs length >= 1 and an even dim >= 2, got {length}, {dim}")
        self.length, self.dim = length, dim
        k = np.arange(dim // 2)
        angle = np.arange(length)[:, None] / 10000 ** (2 * k / dim)
        self.pos = np.concatenate([np.sin(angle), np.cos(angle)], axis=1)          # (L, D)
        self.words = {}

    def word(self, w):
        if w not in self.words:
            raw = np.frombuffer(hashlib.shake_256(w.encode()).digest(4 * self.dim), dtype="<u4")
            self.words[w] = (raw / 2.0**32 * 2 - 1) * math.sqrt(3)
        return self.words[w]

    def __call__(self, instructions):
        """list of N strings -> (N, L, D) float32."""
        out = np.zeros((len(instructions), self.length, self.dim))
        for n, text in enumerate(instructions):
            words = re.findall(r"[a-z0-9]+", text.lower())
            if len(words) > self.length:
                raise ValueError(f"instruction {text!r} has {len(words)} words; the text encoder holds "
                                 f"{self.length} (raise its length)")
            for i, w in enumerate(words):
                out[n, i] = self.word(w) + 0.5 * self.pos[i]
        return torch.from_numpy(out.astype(np.float32))
