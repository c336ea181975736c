"""The video backbone: a Cosmos-Predict2 Video2World DiT, weight-compatible with NVIDIA's public checkpoints.

A latent video x (B, C, T, H, W) is cut into (1, p, p) patches, one token each, ordered (t, h, w) with w fastest.
Every block modulates its three sub-layers (self-attention with 3D RoPE, cross-attention to text, MLP) with a
shift / scale / gate per latent frame computed from that frame's flow time tau, so clean context frames and noisy
frames share one forward pass. The network predicts the flow velocity (flow.py's convention):

    x_tau = (1 - tau) x0 + tau eps,    v = eps - x0.

mimic-video uses it in two ways:
  - stage 1 adapts it to robot video with LoRA (`add_lora`, `fuse_lora`) and the Video2World velocity;
  - the policy integrates it only from tau = 1 to tau_v and then reads the hidden states after block k
    (`video2world_hidden_states`), running blocks 0..k only; the paper's k = 19 runs 20 of 28 blocks.

Not here: loading NVIDIA's public checkpoints into it (cosmos_weights.py: the diffusers layout, NVIDIA's original
names, the Hub) and this project's checkpoint files (checkpoints.py, which also saves and loads LoRA adapters).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

import kernels

# Video2World feeds the context frames as (almost) clean: EDM noise level sigma_c = 1e-4,
# tau_c = sigma_c / (1 + sigma_c).
TAU_CONTEXT = 1e-4 / (1 + 1e-4)

# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class VideoDiTConfig:
    in_channels: int = 16          # latent channels C; the condition- and padding-mask channels are added inside
    patch: int = 2                 # spatial patch p; the temporal patch is 1, so each latent frame keeps its own tau
    num_heads: int = 16
    head_dim: int = 128
    num_layers: int = 28
    mlp_ratio: float = 4.0
    text_dim: int = 1024           # width of the text encoder's states (T5-11B: 1024)
    adaln_lora_dim: int = 256      # rank of each block's adaLN modulation branch
    rope_scale: tuple = (1.0, 3.0, 3.0)   # NTK scale of the RoPE bases for (t, h, w)
    qk_norm_eps: float = 1e-6      # NVIDIA's value; diffusers uses 1e-5 (outputs differ by ~1e-6)

    def __post_init__(self):
        for name in ("in_channels", "patch", "num_heads", "num_layers", "text_dim", "adaln_lora_dim"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"VideoDiTConfig.{name} must be a positive integer, got {getattr(self, name)!r}")
        # RoPE splits the head dim into (t, h, w) parts of even size > 2 (the NTK exponent divides by dim - 2).
        if not isinstance(self.head_dim, int) or self.head_dim % 2 or self.head_dim < 12:
            raise ValueError(f"VideoDiTConfig.head_dim must be an even integer >= 12 (3D RoPE), got {self.head_dim!r}")
        if len(self.rope_scale) != 3 or min(self.rope_scale) <= 0:
            raise ValueError(f"VideoDiTConfig.rope_scale must be three positive numbers (t, h, w), "
                             f"got {self.rope_scale!r}")

    @property
    def width(self):
        return self.num_heads * self.head_dim


PRESETS = {
    "cosmos-predict2-2b": VideoDiTConfig(),
    # trains on a 2-core CPU in minutes; the integrator sets in_channels / patch / text_dim for its tokenizer
    "tiny": VideoDiTConfig(num_heads=4, head_dim=32, num_layers=6, text_dim=64, adaln_lora_dim=32),
}


def preset(name):
    if name not in PRESETS:
        raise ValueError(f"unknown video model preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]

# ----------------------------------------------------------------------------- layers


class LoRALinear(nn.Linear):
    """A bias-free linear layer that can carry a low-rank adapter (stage 1):  y = W x + (alpha / r) B A x.

    Only the layers the paper adapts use this class; A is random and B zero, so a new adapter changes nothing.
    The adapter is fp32 whatever the base weight's dtype (the public weights are bf16): its updates, and AdamW's
    moments, would round away in bf16. Without autocast its branch computes in fp32 and is cast back to y's dtype;
    under CUDA's bf16 autocast, F.linear casts it like every other matmul.
    """

    def __init__(self, d_in, d_out):
        super().__init__(d_in, d_out, bias=False)
        self.register_parameter("lora_A", None)   # (r, d_in)
        self.register_parameter("lora_B", None)   # (d_out, r)
        self.lora_alpha = None

    def add_lora(self, rank, alpha):
        device = self.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, dtype=torch.float32, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, dtype=torch.float32, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))   # nn.Linear's own init
        self.lora_alpha = alpha

    @property
    def lora_scale(self):
        return self.lora_alpha / self.lora_A.shape[0]

    def fuse_lora(self):
        """W <- W + (alpha / r) B A in fp32, rounded once to W's dtype; then drop the adapter: the same function,
        at the base layer's cost."""
        with torch.no_grad():
            delta = self.lora_B.float() @ self.lora_A.float()
            self.weight.copy_(self.weight.float() + self.lora_scale * delta)
        self.lora_A = self.lora_B = self.lora_alpha = None

    def forward(self, x):
        y = F.linear(x, self.weight)
        if self.lora_A is not None:
            low_rank = F.linear(F.linear(x.to(self.lora_A.dtype), self.lora_A), self.lora_B)
            y = y + (self.lora_scale * low_rank).to(y.dtype)
        return y


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * w over the last dim, in x's dtype (w cast to it: bf16 under autocast); the
    statistics in fp32 whatever the model dtype."""

    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight.to(x.dtype)


def rope_tables(cfg, T, H, W, device):
    """cos and sin of the 3D rotary angles, each (T*H*W, head_dim), fp32; tokens in (t, h, w) order.

    The head dim is split into d_t + d_h + d_w (d_h = d_w = head_dim // 6 * 2); axis a rotates at frequencies
    freq_a,j = theta_a^(-2j / d_a) with the NTK-scaled base theta_a = 10000 r_a^(d_a / (d_a - 2)).
    Positions are integer patch-grid indices. The angle vector [t freq_t, h freq_h, w freq_w] is repeated twice,
    pairing channel i with i + head_dim / 2 (rotate-half).
    """
    d_hw = cfg.head_dim // 6 * 2
    angles = []
    for n, d, r in zip((T, H, W), (cfg.head_dim - 2 * d_hw, d_hw, d_hw), cfg.rope_scale):
        theta = 10000.0 * r ** (d / (d - 2))
        freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d)
        angles.append(torch.outer(torch.arange(n, dtype=torch.float32, device=device), freq))   # (n, d / 2)
    t, h, w = angles
    grid = torch.cat([t[:, None, None].expand(T, H, W, -1),
                      h[None, :, None].expand(T, H, W, -1),
                      w[None, None, :].expand(T, H, W, -1)], dim=-1).reshape(T * H * W, -1)
    grid = torch.cat([grid, grid], dim=-1)
    return grid.cos(), grid.sin()


def apply_rope(x, cos, sin):
    """x (B, heads, L, D) rotated in pairs (i, i + D/2):  x cos + [-x2, x1] sin, in fp32."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


class Attention(nn.Module):
    """Multi-head attention, queries and keys RMS-normalised per head (QK-norm); RoPE for self-attention only."""

    def __init__(self, cfg, context_dim):
        super().__init__()
        self.heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.q_proj = LoRALinear(cfg.width, cfg.width)
        self.k_proj = LoRALinear(context_dim, cfg.width)
        self.v_proj = LoRALinear(context_dim, cfg.width)
        self.out_proj = LoRALinear(cfg.width, cfg.width)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.qk_norm_eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.qk_norm_eps)

    def forward(self, x, context, rope=None):
        B, L, _ = x.shape
        heads = (B, -1, self.heads, self.head_dim)   # channel = head * head_dim + d
        q = self.q_norm(self.q_proj(x).view(heads)).transpose(1, 2)         # (B, heads, L, head_dim)
        k = self.k_norm(self.k_proj(context).view(heads)).transpose(1, 2)   # (B, heads, L_context, head_dim)
        v = self.v_proj(context).view(heads).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        y = kernels.attention(q, k, v)                                      # (B, heads, L, head_dim)
        return self.out_proj(y.transpose(1, 2).reshape(B, L, -1))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        hidden = int(cfg.width * cfg.mlp_ratio)
        self.layer1 = LoRALinear(cfg.width, hidden)
        self.layer2 = LoRALinear(hidden, cfg.width)

    def forward(self, x):
        return self.layer2(F.gelu(self.layer1(x)))   # exact (erf) GELU, as trained


class AdaLNLoRA(nn.Module):
    """n modulation vectors per frame:  chunk_n( up(down(SiLU(emb))) + temb ).

    A low-rank branch of its own per sub-layer plus the time MLP's output temb, which all blocks share.
    """

    def __init__(self, cfg, n):
        super().__init__()
        self.n = n
        self.down = nn.Linear(cfg.width, cfg.adaln_lora_dim, bias=False)
        self.up = nn.Linear(cfg.adaln_lora_dim, n * cfg.width, bias=False)

    def forward(self, silu_emb, temb):   # (B, T, width), (B, T, 3 width) -> n x (B, T, width)
        width = silu_emb.shape[-1]
        return (self.up(self.down(silu_emb)) + temb[..., :self.n * width]).chunk(self.n, dim=-1)


def add_gated(x, gate, y):
    """x + gate * y with one gate row per latent frame:  x, y (B, T*H*W, D), gate (B, T, D)."""
    B, L, D = x.shape
    T = gate.shape[1]
    return x + (gate[:, :, None] * y.view(B, T, L // T, D)).view(B, L, D)


class Block(nn.Module):
    """x += gate * f(LN(x) (1 + scale) + shift) for f = self-attention, cross-attention to text, MLP."""

    def __init__(self, cfg):
        super().__init__()
        self.adaln_self_attn = AdaLNLoRA(cfg, 3)
        self.self_attn = Attention(cfg, cfg.width)
        self.adaln_cross_attn = AdaLNLoRA(cfg, 3)
        self.cross_attn = Attention(cfg, cfg.text_dim)
        self.adaln_mlp = AdaLNLoRA(cfg, 3)
        self.mlp = MLP(cfg)

    def forward(self, x, text, silu_emb, temb, rope):
        shift, scale, gate = self.adaln_self_attn(silu_emb, temb)
        h = kernels.modulated_layer_norm(x, shift, scale)
        x = add_gated(x, gate, self.self_attn(h, h, rope))
        shift, scale, gate = self.adaln_cross_attn(silu_emb, temb)
        x = add_gated(x, gate, self.cross_attn(kernels.modulated_layer_norm(x, shift, scale), text))
        shift, scale, gate = self.adaln_mlp(silu_emb, temb)
        return add_gated(x, gate, self.mlp(kernels.modulated_layer_norm(x, shift, scale)))


class TimeEmbedding(nn.Module):
    """Per-frame flow time tau (B, T) -> temb (B, T, 3 width) added to every modulation, emb (B, T, width).

    s(tau) = [cos(tau f_j), sin(tau f_j)],  f_j = 10000^(-j / (width / 2)),  tau raw in [0, 1];
    temb = linear_2(SiLU(linear_1(s))),  emb = RMSNorm(s) (input of every adaLN-LoRA branch).
    """

    def __init__(self, cfg):
        super().__init__()
        self.linear_1 = LoRALinear(cfg.width, cfg.width)
        self.linear_2 = LoRALinear(cfg.width, 3 * cfg.width)
        self.norm = RMSNorm(cfg.width, eps=1e-6)

    def forward(self, tau, dtype):
        half = self.linear_1.in_features // 2
        freq = torch.exp(-math.log(10000.0) / half * torch.arange(half, dtype=torch.float32, device=tau.device))
        angle = tau.to(dtype).float()[..., None] * freq   # NVIDIA rounds tau to the model dtype first
        s = torch.cat([angle.cos(), angle.sin()], dim=-1).to(dtype)
        return self.linear_2(F.silu(self.linear_1(s))), self.norm(s)


class FinalLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.adaln = AdaLNLoRA(cfg, 2)
        self.linear = nn.Linear(cfg.width, cfg.patch * cfg.patch * cfg.in_channels, bias=False)

    def forward(self, x, silu_emb, temb):
        shift, scale = self.adaln(silu_emb, temb)
        return self.linear(kernels.modulated_layer_norm(x, shift, scale))

# ----------------------------------------------------------------------------- the network


class VideoDiT(nn.Module):
    def __init__(self, cfg: VideoDiTConfig):
        super().__init__()
        self.cfg = cfg
        # the + 2: Video2World's condition mask and Cosmos' padding mask (always 0 here), as extra input channels
        self.patch_embed = LoRALinear((cfg.in_channels + 2) * cfg.patch ** 2, cfg.width)
        self.time_embed = TimeEmbedding(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.final = FinalLayer(cfg)
        self._rope_cache = {}   # (T, H', W', device) -> (cos, sin)
        # activation checkpointing: keep only each block's input for the backward and recompute the rest (trades
        # one more forward per block for memory: the 2B model's 19,200-token windows need it on one GPU)
        self.checkpoint_blocks = False
        self._zero_init()

    def _zero_init(self):
        """adaLN-Zero (as in DiT): zero modulations make every block start as the identity and the output 0."""
        modulations = [m.up for m in self.modules() if isinstance(m, AdaLNLoRA)]
        for layer in modulations + [self.time_embed.linear_2, self.final.linear]:
            nn.init.zeros_(layer.weight)

    @property
    def dtype(self):
        return self.patch_embed.weight.dtype

    def forward(self, x, tau, text, cond_mask=None):
        """The velocity v (B, C, T, H, W) for latents x (B, C, T, H, W) at per-frame flow times tau (B, T).

        text: (B, L, text_dim) encoder states. cond_mask: (B, T), 1 on clean context frames (Video2World), else 0.
        Computed in the model's dtype, returned in x's.
        """
        B, C, T, H, W = x.shape
        h, silu_emb, temb = self._trunk(x, tau, text, cond_mask, self.cfg.num_layers)
        p = self.cfg.patch
        out = self.final(h, silu_emb, temb)   # (B, T*H'*W', p*p*C), features ordered (p_h, p_w, C)
        out = out.view(B, T, H // p, W // p, p, p, C).permute(0, 6, 1, 2, 4, 3, 5).reshape(B, C, T, H, W)
        return out.to(x.dtype)

    def hidden_states(self, x, tau, text, k, cond_mask=None):
        """The tokens after block k (0-based), (B, T*H'*W', width) in (t, h, w) order, running blocks 0..k only."""
        if not isinstance(k, int) or not 0 <= k < self.cfg.num_layers:
            raise ValueError(f"layer k must be an integer in [0, {self.cfg.num_layers - 1}], got {k!r}")
        return self._trunk(x, tau, text, cond_mask, k + 1)[0]

    def _trunk(self, x, tau, text, cond_mask, n_blocks):
        B, C, T, H, W = self._check_inputs(x, tau, text, cond_mask)
        p, dtype = self.cfg.patch, self.dtype
        if cond_mask is None:
            cond_mask = torch.zeros(B, T, device=x.device)
        masks = torch.stack([cond_mask.to(dtype), torch.zeros_like(cond_mask, dtype=dtype)], dim=1)   # (B, 2, T)
        x = torch.cat([x.to(dtype), masks[..., None, None].expand(B, 2, T, H, W)], dim=1)
        # patchify: (B, C+2, T, H, W) -> (B, T*H'*W', (C+2)*p*p), features channel-major (c, p_h, p_w)
        x = x.view(B, C + 2, T, H // p, p, W // p, p).permute(0, 2, 3, 5, 1, 4, 6)
        x = x.reshape(B, T * (H // p) * (W // p), (C + 2) * p * p)
        h = self.patch_embed(x)
        temb, emb = self.time_embed(tau, dtype)
        silu_emb = F.silu(emb)   # shared by every adaLN-LoRA branch
        rope = self._rope(T, H // p, W // p, x.device)
        text = text.to(dtype)
        for block in self.blocks[:n_blocks]:
            if self.checkpoint_blocks and torch.is_grad_enabled():
                h = torch.utils.checkpoint.checkpoint(block, h, text, silu_emb, temb, rope, use_reentrant=False)
            else:
                h = block(h, text, silu_emb, temb, rope)
        return h, silu_emb, temb

    def _rope(self, T, H, W, device):
        key = (T, H, W, device)
        if key not in self._rope_cache:
            self._rope_cache[key] = rope_tables(self.cfg, T, H, W, device)
        return self._rope_cache[key]

    def _check_inputs(self, x, tau, text, cond_mask):
        cfg = self.cfg
        if x.ndim != 5 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"x must be latents (B, {cfg.in_channels}, T, H, W), got shape {tuple(x.shape)}")
        B, C, T, H, W = x.shape
        if H % cfg.patch or W % cfg.patch:
            raise ValueError(f"latent H, W = {H}, {W} must be multiples of the patch size {cfg.patch}")
        if tuple(tau.shape) != (B, T):
            raise ValueError(f"tau must hold one flow time per latent frame, shape {(B, T)}, got {tuple(tau.shape)}")
        if torch.isnan(tau).any() or tau.min() < 0 or tau.max() > 1:
            raise ValueError(f"tau must lie in [0, 1], got values in [{tau.min().item():.4g}, {tau.max().item():.4g}]")
        if text.ndim != 3 or text.shape[0] != B or text.shape[2] != cfg.text_dim:
            raise ValueError(f"text must be encoder states ({B}, L, {cfg.text_dim}), got shape {tuple(text.shape)}")
        if cond_mask is not None and tuple(cond_mask.shape) != (B, T):
            raise ValueError(f"cond_mask must be ({B}, {T}), one flag per latent frame, got {tuple(cond_mask.shape)}")
        return B, C, T, H, W

    # ------------------------------------------------------------------------- Video2World conditioning

    def video2world_velocity(self, x_tau, tau_v, text, context, n_cond):
        """The velocity for a video whose first n_cond latent frames are given (Video2World).

        x_tau (B, C, T, H, W) noisy latents at per-sample flow time tau_v (float or (B,), in (0, 1]);
        context (B, C, >= n_cond, H, W) clean latents, of which the first n_cond frames are used.
        The network sees those frames clean, flagged in the mask channel, at tau_c = TAU_CONTEXT. On them the
        returned velocity is v = (x_tau - x_context) / tau_v, so x0 = x_tau - tau_v v is exactly the clean
        context (NVIDIA overwrites x0 there); when x_tau already holds the context, v = 0 and flow.euler leaves
        those frames fixed. For x_tau = (1 - tau_v) x0 + tau_v eps it equals the training target eps - x0.
        """
        x_in, tau, cond_mask, tau_v = self._video2world_inputs(x_tau, tau_v, context, n_cond)
        v = self(x_in, tau, text, cond_mask)
        v_context = (x_tau[:, :, :n_cond] - context[:, :, :n_cond]) / tau_v.view(-1, 1, 1, 1, 1).to(x_tau.dtype)
        return torch.cat([v_context.to(v.dtype), v[:, :, n_cond:]], dim=2)

    def video2world_hidden_states(self, x_tau, tau_v, text, context, n_cond, k):
        """The tokens after block k for the same conditioned input as video2world_velocity (context frames included)."""
        x_in, tau, cond_mask, _ = self._video2world_inputs(x_tau, tau_v, context, n_cond)
        return self.hidden_states(x_in, tau, text, k, cond_mask)

    def _video2world_inputs(self, x_tau, tau_v, context, n_cond):
        B, C, T, H, W = x_tau.shape
        if not isinstance(n_cond, int) or not 0 <= n_cond < T:
            raise ValueError(f"n_cond must be an integer in [0, {T - 1}] (context frames of {T}), got {n_cond!r}")
        if context.ndim != 5 or context.shape[2] < n_cond or context.shape[:2] != x_tau.shape[:2] \
                or context.shape[3:] != x_tau.shape[3:]:
            raise ValueError(f"context must be clean latents ({B}, {C}, >= {n_cond}, {H}, {W}), "
                             f"got {tuple(context.shape)}")
        tau_v = torch.as_tensor(tau_v, dtype=torch.float32, device=x_tau.device).reshape(-1)
        if tau_v.numel() not in (1, B):
            raise ValueError(f"tau_v must be a float or one value per sample ({B},), got {tau_v.numel()} values")
        tau_v = tau_v.expand(B)
        if torch.isnan(tau_v).any() or tau_v.min() <= 0 or tau_v.max() > 1:
            raise ValueError(f"tau_v must lie in (0, 1] (at 0 there is nothing left to denoise), got {tau_v.tolist()}")
        x_in = torch.cat([context[:, :, :n_cond].to(x_tau.dtype), x_tau[:, :, n_cond:]], dim=2)
        is_context = (torch.arange(T, device=x_tau.device) < n_cond).expand(B, T)
        tau = torch.where(is_context, TAU_CONTEXT, tau_v[:, None])   # (B, T)
        return x_in, tau, is_context.float(), tau_v

    # ------------------------------------------------------------------------- LoRA (stage 1)

    def add_lora(self, rank, alpha):
        """Freeze every weight, then give the adapted layers (attention q/k/v/out, patch embedding, time MLP,
        block MLPs) a trainable rank-r adapter scaled by alpha / r. The paper: rank 256, alpha 32."""
        if not isinstance(rank, int) or rank < 1 or alpha <= 0:
            raise ValueError(f"LoRA needs an integer rank >= 1 and alpha > 0, got rank={rank!r}, alpha={alpha!r}")
        if self.lora_config() is not None:
            raise ValueError("this model already has LoRA adapters; fuse_lora() them first")
        self.requires_grad_(False)
        for m in self.modules():
            if isinstance(m, LoRALinear):
                m.add_lora(rank, alpha)

    def fuse_lora(self):
        """Fold every adapter into its base weight (W += (alpha / r) B A) and remove the adapters."""
        if self.lora_config() is None:
            raise ValueError("this model has no LoRA adapters to fuse")
        for m in self.modules():
            if isinstance(m, LoRALinear):
                m.fuse_lora()

    def lora_config(self):
        """(rank, alpha) of the adapters, or None without adapters."""
        A = self.patch_embed.lora_A
        return None if A is None else (A.shape[0], self.patch_embed.lora_alpha)
