"""The frozen encoders a Video-Action Model sees its inputs through: camera frames -> video latents, instructions ->
text states. Both stay frozen in both training stages and at inference; train.py, sample.py and preencode.py build
them from one description (`build(spec)`, the spec recorded with every run and every pre-encoded dataset).

The interface both kinds share:
    video encoder   encode(frames (B, T, H, W, C) uint8) -> latents (B, C_lat, latent_frames(T), h, w) float32
                    decode(latents) -> frames uint8;  channels(frame_channels) -> C_lat;  latent_frames(T);
                    latent_size(H, W) -> (h, w)
    text encoder    encoder(instructions [N]) -> states (N, L, D) float32, zero past each prompt;  .length L, .dim D

Two kinds:
  - the stand-ins the built-in world trains with, which need no download and cost nothing: SpaceToDepth in place
    of the VAE (one latent frame per frame) and TextEncoder in place of T5 (a hash per word);
  - the encoders of the real Cosmos-Predict2 2B: the Wan2.1 VAE (WanVAE: 16 channels, 8x smaller, 4x fewer frames)
    and the T5-XXL encoder (T5Encoder: 512 tokens of 1024), from diffusers and transformers, optional extras
    (requirements-real.txt) imported only when one of them is built.
Not here: the models that read these latents and states (video_model.py), the dataset formats (data.py,
latent_data.py), pre-encoding a dataset (preencode.py).
"""
import hashlib
import math
import re

import numpy as np
import torch
from PIL import Image

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

    def latent_frames(self, T):
        return T

    def latent_size(self, H, W):
        return H // self.f, W // self.f

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

# ----------------------------------------------------------------------------- the encoders of Cosmos-Predict2

COSMOS_SOURCE = "nvidia/Cosmos-Predict2-2B-Video2World"   # diffusers layout: vae/, text_encoder/, tokenizer/
SIGMA_DATA = 1.0                                          # Cosmos' EDM sigma_data, which scales the latents


class WanVAE:
    """The Wan2.1 VAE (diffusers' AutoencoderKLWan), as Cosmos-Predict2 reads video through it:

        x = 2 frame / 255 - 1                                   frames in [-1, 1], resized first to `size`
        z = (mu(x) - mean_c) / std_c * sigma_data               per channel c, from the VAE's config

    mu is the posterior mean (NVIDIA's choice; diffusers' pipeline draws a posterior sample instead). The VAE is
    causal and compresses time 4x with the first frame alone: a clip of T = 1 + 4n frames gives 1 + n latent
    frames, and latent frame j depends on frames 0 .. 4j only. So the H_o = 1 + 4m history frames encoded alone give
    exactly the first 1 + m latent frames of any longer clip that starts with them: Video2World's context frames.
    Resizing is PIL's Lanczos per frame, as the pipeline does for PIL images.
    """

    def __init__(self, source=COSMOS_SOURCE, size=None, device="cpu", dtype=torch.float32):
        from diffusers import AutoencoderKLWan   # optional extra: requirements-real.txt
        self.vae = _pretrained(AutoencoderKLWan, source, "vae", dtype).to(device).eval().requires_grad_(False)
        config = self.vae.config
        self.mean = torch.tensor(config.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self.std = torch.tensor(config.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self.time_factor = 2 ** sum(self.vae.temperal_downsample)   # 4 (diffusers' spelling)
        self.space_factor = 2 ** len(self.vae.temperal_downsample)  # 8
        self.size = None if size is None else tuple(size)           # (H, W) the VAE sees; None: the frames' own
        self.device, self.dtype = torch.device(device), dtype

    def channels(self, frame_channels=3):
        if frame_channels != 3:
            raise ValueError(f"the Wan VAE reads RGB frames, got {frame_channels} channels")
        return self.vae.config.z_dim

    def latent_size(self, H, W):
        h, w = self.size or (H, W)
        return h // self.space_factor, w // self.space_factor

    def latent_frames(self, T):
        if (T - 1) % self.time_factor:
            raise ValueError(f"the Wan VAE encodes clips of 1 + {self.time_factor} n frames, got {T}")
        return (T - 1) // self.time_factor + 1

    @torch.no_grad()
    def encode(self, frames):
        """(B, T, H, W, 3) uint8, T = 1 + 4n -> normalised latents (B, z_dim, 1 + n, H' / 8, W' / 8) float32 (CPU),
        where (H', W') = size."""
        if frames.dtype != torch.uint8 or frames.ndim != 5:
            raise ValueError(f"frames must be (B, T, H, W, C) uint8, got {tuple(frames.shape)} {frames.dtype}")
        B, T, H, W, C = frames.shape
        self.latent_frames(T), self.channels(C)
        h, w = self.size or (H, W)
        if h % self.space_factor or w % self.space_factor:
            raise ValueError(f"the Wan VAE needs a size divisible by {self.space_factor}, got {h}x{w}")
        if (h, w) != (H, W):
            frames = torch.from_numpy(np.stack([np.asarray(Image.fromarray(f).resize((w, h), Image.LANCZOS))
                                                for f in frames.reshape(B * T, H, W, C).numpy()]))
        x = frames.reshape(B, T, h, w, C).permute(0, 4, 1, 2, 3).float() / 255 * 2 - 1   # (B, 3, T, h, w)
        mu = self.vae.encode(x.to(self.device, self.dtype)).latent_dist.mean.float().cpu()
        return (mu - self.mean) / self.std * SIGMA_DATA

    @torch.no_grad()
    def decode(self, latents, frame_channels=3):
        """Normalised latents (B, z_dim, 1 + n, h, w) -> frames (B, 1 + 4n, 8h, 8w, 3) uint8."""
        z = latents.float().cpu() * self.std / SIGMA_DATA + self.mean
        x = self.vae.decode(z.to(self.device, self.dtype)).sample.float().cpu()           # (B, 3, T, H, W) in [-1, 1]
        return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 4, 1)


class T5Encoder:
    """The T5 encoder Cosmos-Predict2 cross-attends to (T5-11B's, d_model 1024), as its pipeline prepares it: each
    instruction padded to `length` = 512 tokens, encoded with the padding masked out, the states past the prompt
    set to zero. Instructions are encoded once each and kept (the release, too, precomputes them per instruction).
    """

    def __init__(self, source=COSMOS_SOURCE, length=512, device="cpu", dtype=torch.float32):
        from transformers import AutoTokenizer, T5EncoderModel   # optional extra: requirements-real.txt
        self.tokenizer = AutoTokenizer.from_pretrained(source, subfolder="tokenizer")
        self.model = _pretrained(T5EncoderModel, source, "text_encoder", dtype).to(device).eval().requires_grad_(False)
        self.length, self.dim, self.device = length, self.model.config.d_model, torch.device(device)
        self.cache = {}   # instruction -> (L, D) float32

    @torch.no_grad()
    def __call__(self, instructions):
        """list of N strings -> (N, L, D) float32 (CPU)."""
        new = [s for s in dict.fromkeys(instructions) if s not in self.cache]
        if new:
            for s, ids in zip(new, self.tokenizer(new).input_ids):
                if len(ids) > self.length:
                    raise ValueError(f"instruction {s!r} has {len(ids)} tokens; the T5 encoder holds {self.length}")
            tokens = self.tokenizer(new, padding="max_length", max_length=self.length, return_tensors="pt")
            mask = tokens.attention_mask.bool()
            states = self.model(tokens.input_ids.to(self.device), attention_mask=mask.to(self.device))
            states = states.last_hidden_state.float().cpu()
            states[~mask] = 0   # the states past the prompt
            self.cache.update(zip(new, states))
        return torch.stack([self.cache[s] for s in instructions]) if instructions else torch.zeros(0, self.length,
                                                                                                    self.dim)


def _pretrained(model_class, source, subfolder, dtype):
    """A diffusers / transformers model from `source` (a local folder or a Hub id) and its subfolder, with a clear
    error where it is not there."""
    try:
        # diffusers names the dtype argument torch_dtype, transformers (5.x) dtype
        key = "torch_dtype" if model_class.__module__.startswith("diffusers") else "dtype"
        return model_class.from_pretrained(source, subfolder=subfolder, **{key: dtype})
    except (OSError, ValueError) as e:
        raise ValueError(f"{source}: cannot load {model_class.__name__} from its {subfolder}/ subfolder "
                         f"(a folder in the diffusers layout, or a Hub id): {e}") from None

# ----------------------------------------------------------------------------- one description, both encoders


def stand_in_spec(factor, text_length, text_dim):
    return {"video": {"kind": "space-to-depth", "factor": factor},
            "text": {"kind": "hash", "length": text_length, "dim": text_dim}}


def cosmos_spec(source=COSMOS_SOURCE, size=None, text_length=512):
    return {"video": {"kind": "wan2.1", "source": source, "size": list(size) if size else None},
            "text": {"kind": "t5", "source": source, "length": text_length}}


def build(spec, device="cpu", dtype=torch.float32):
    """(video encoder, text encoder) described by a spec of stand_in_spec or cosmos_spec (a JSON-able dict)."""
    video, text = spec["video"], spec["text"]
    kinds = {"space-to-depth": lambda: SpaceToDepth(video["factor"]),
             "wan2.1": lambda: WanVAE(video["source"], video["size"], device, dtype),
             "hash": lambda: TextEncoder(text["length"], text["dim"]),
             "t5": lambda: T5Encoder(text["source"], text["length"], device, dtype)}
    for part in (video, text):
        if part["kind"] not in kinds:
            raise ValueError(f"unknown encoder kind {part['kind']!r}; known: {sorted(kinds)}")
    return kinds[video["kind"]](), kinds[text["kind"]]()
