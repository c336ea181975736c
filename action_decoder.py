"""The action decoder: a flow-matching DiT that turns the video model's latent plan into an action chunk.

It is an inverse-dynamics model. Its inputs are the frozen video model's hidden states at layer k (taken at
video flow time tau_v), the proprioception, and a noisy action chunk at action flow time tau_a; it predicts the
chunk's velocity v = eps - x0 (flow.py's convention: tau = 1 is noise, tau = 0 is data).

    sequence   [proprio token, H_a noisy-action tokens] + learned position embedding
    video      LN(layer-k states)  (+ learned token positions if context_tokens > 0; not in the release)
    block      x += gate * CrossAttn(mod(LN(x)), video)      (keys/values: the video states, never tau_a)
               x += gate * SelfAttn(mod(LN(x)))
               x += gate * MLP(mod(LN(x)))                   mod(y) = y * (1 + scale) + shift
    output     Linear(mod(LN(x)))  on the H_a action tokens

The modulations come from both flow times through a low-rank bilinear-affine encoding,

    e_a = SiLU(W_a phi(tau_a) + b_a),   e_v = SiLU(W_v phi(tau_v) + b_v)
    z   = (B e_a + b) * (C e_v + c) - b * c          rank R: a bilinear term plus an affine term, no constant
    [shift, scale, gate] = U_l D_l SiLU(RMSNorm(z)) + A z      (U_l D_l: per sub-layer, A: shared by all)

and time is per token: the proprio token is clean, tau_a = 1e-3. Read flow.py first.
Not here: the video model whose states it reads (video_model.py), the random draws of a training step
(train.py), the replan that integrates it (sample.py).
"""
import functools
import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

import flow
import kernels

PROPRIO_TAU = 1e-3    # the proprio token's action flow time: it is observed, i.e. clean
BC_BIAS_INIT = 0.382  # std of SiLU(N(0, 1/2)), the spread of e_a and e_v at init: affine and bilinear parts start even


@dataclass(frozen=True)
class ActionDecoderConfig:
    H_a: int = 15             # actions per chunk (Bridge: 15 at 5 Hz; LIBERO: 60 at 20 Hz)
    action_dim: int = 10      # 3 position + 6D rotation + gripper
    proprio_dim: int = 10
    video_dim: int = 2048     # width of the video model's hidden states (Cosmos-Predict2 2B)
    width: int = 1024
    depth: int = 24           # blocks
    heads: int = 8
    mlp_ratio: float = 4.0
    rank: int = 1024          # R, the rank of the bilinear-affine time encoding
    adaln_lora: int = 128     # bottleneck of each sub-layer's modulation MLP
    loss_weight: float = 10.0
    # > 0: a learned position embedding for up to this many video tokens, added to the normalised states. Not in the
    # release, whose cross-attention sees the video tokens as an unordered set: a RoPE-only video model's states
    # say where a token is only through its content, which a plain background does not give. 0: none.
    context_tokens: int = 0

    def __post_init__(self):
        for name in ("H_a", "action_dim", "proprio_dim", "video_dim", "width", "depth", "heads", "rank",
                     "adaln_lora"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"ActionDecoderConfig.{name} must be a positive integer, got {getattr(self, name)!r}")
        if not isinstance(self.context_tokens, int) or self.context_tokens < 0:
            raise ValueError(f"ActionDecoderConfig.context_tokens must be an integer >= 0, got {self.context_tokens!r}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} does not split into {self.heads} heads")


PRESETS = {
    # the official release's decoder (Bridge horizon); about 0.5 B parameters
    "mimic-video": ActionDecoderConfig(),
    # trains on a 2-core CPU in minutes
    "tiny": ActionDecoderConfig(video_dim=128, width=128, depth=4, heads=4, rank=128, adaln_lora=32),
}


def preset(name, **overrides):
    """A named config, with fields overridden (the integrator sets H_a, action_dim, proprio_dim, video_dim)."""
    if name not in PRESETS:
        raise ValueError(f"unknown action decoder preset {name!r}; expected one of {sorted(PRESETS)}")
    return replace(PRESETS[name], **overrides)

# ----------------------------------------------------------------------------- building blocks

class TokenEmbedder(nn.Module):
    """in_dim -> width by a GELU MLP whose widths grow geometrically, about 4x a layer (10 -> 1024: 3 layers).
    The output is scaled by 1/sqrt(width), matching the size of the position embedding it is added to."""

    def __init__(self, in_dim, width, growth=4.0):
        super().__init__()
        n = max(1, round(math.log(width / in_dim, growth)))
        dims = [round(in_dim * (width / in_dim) ** (i / n)) for i in range(n)] + [width]
        layers = []
        for d_in, d_out in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(d_in, d_out), nn.GELU()]
        self.mlp = nn.Sequential(*layers[:-1])
        self.out_scale = width ** -0.5

    def forward(self, x):
        return self.mlp(x) * self.out_scale


class TimeEncoding(nn.Module):
    """(tau_a per token, tau_v per sample) -> z, the low-rank bilinear-affine encoding of both flow times."""

    def __init__(self, width, rank):
        super().__init__()
        self.width = width
        self.W_a = nn.Linear(width, width)
        self.W_v = nn.Linear(width, width)
        self.B = nn.Linear(width, rank)
        self.C = nn.Linear(width, rank)

    def embed(self, tau_a, tau_v):
        """e_a = SiLU(W_a phi(tau_a) + b_a), e_v = SiLU(W_v phi(tau_v) + b_v).  (B, L), (B,) -> (B, L, D), (B, 1, D)"""
        e_a = F.silu(self.W_a(flow.sinusoidal_embedding(tau_a, self.width).to(self.W_a.weight.dtype)))
        e_v = F.silu(self.W_v(flow.sinusoidal_embedding(tau_v, self.width).to(self.W_v.weight.dtype)))
        return e_a, e_v[:, None]

    def bilinear(self, e_a, e_v):
        """z = (B e_a + b) * (C e_v + c) - b * c: subtracting b * c removes the constant, leaving
        (B e_a) * (C e_v) + c * (B e_a) + b * (C e_v)."""
        return self.B(e_a) * self.C(e_v) - self.B.bias * self.C.bias

    def forward(self, tau_a, tau_v):
        return self.bilinear(*self.embed(tau_a, tau_v))   # (B, L, R)


class Modulation(nn.Module):
    """One sub-layer's adaLN parameters from the time encoding: a low-rank MLP of SiLU(RMSNorm(z)) plus the shared
    A z, which the caller passes in (computed once per forward for all sub-layers)."""

    def __init__(self, rank, bottleneck, width, chunks):
        super().__init__()
        self.down = nn.Linear(rank, bottleneck, bias=False)
        self.up = nn.Linear(bottleneck, chunks * width, bias=False)   # zero at init
        self.chunks = chunks

    def forward(self, z_act, Az):
        """z_act = SiLU(RMSNorm(z)) (B, L, R), Az (B, L, 3D) -> `chunks` tensors (B, L, D)."""
        out = self.up(self.down(z_act))
        return (out + Az[..., :out.shape[-1]]).chunk(self.chunks, dim=-1)


class RMSNorm(nn.RMSNorm):
    """torch's RMSNorm with its weight cast to the input's dtype, so that under bf16 autocast it stays in bf16 (and
    on torch's fused kernel) rather than mixing a bf16 input with an fp32 weight."""

    def forward(self, x):
        return F.rms_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.eps)


class Attention(nn.Module):
    """Multi-head attention with QK-RMSNorm and no positional encoding; cross-attention when context_dim is given."""

    def __init__(self, width, heads, context_dim=None):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(width, width, bias=False)
        self.k = nn.Linear(context_dim or width, width, bias=False)
        self.v = nn.Linear(context_dim or width, width, bias=False)
        self.out = nn.Linear(width, width, bias=False)
        self.q_norm = RMSNorm(width // heads, eps=1e-6)
        self.k_norm = RMSNorm(width // heads, eps=1e-6)

    def split_heads(self, x):
        B, L, _ = x.shape
        return x.view(B, L, self.heads, -1).transpose(1, 2)   # (B, H, L, D/H)

    def keys_values(self, context):
        """(B, N, C) -> k, v (B, H, N, D/H)."""
        return self.k_norm(self.split_heads(self.k(context))), self.split_heads(self.v(context))

    def forward(self, x, kv=None):
        """x (B, L, D); kv: precomputed keys/values (cross-attention), or None to attend over x itself."""
        q = self.q_norm(self.split_heads(self.q(x)))
        k, v = self.keys_values(x) if kv is None else kv
        o = kernels.attention(q, k, v)                        # (B, H, L, D/H)
        return self.out(o.transpose(1, 2).flatten(2))


class Block(nn.Module):
    """cross-attention to the video -> self-attention over [proprio, actions] -> GELU MLP, each adaLN-gated."""

    def __init__(self, cfg):
        super().__init__()
        D = cfg.width
        self.cross_attn = Attention(D, cfg.heads, context_dim=cfg.video_dim)
        self.self_attn = Attention(D, cfg.heads)
        self.mlp = nn.Sequential(nn.Linear(D, int(D * cfg.mlp_ratio), bias=False), nn.GELU(),
                                 nn.Linear(int(D * cfg.mlp_ratio), D, bias=False))
        self.mod_cross, self.mod_self, self.mod_mlp = (Modulation(cfg.rank, cfg.adaln_lora, D, 3) for _ in range(3))

    def forward(self, x, z_act, Az, video_kv):
        shift, scale, gate = self.mod_cross(z_act, Az)
        x = x + gate * self.cross_attn(kernels.modulated_layer_norm(x, shift, scale), video_kv)
        shift, scale, gate = self.mod_self(z_act, Az)
        x = x + gate * self.self_attn(kernels.modulated_layer_norm(x, shift, scale))
        shift, scale, gate = self.mod_mlp(z_act, Az)
        return x + gate * self.mlp(kernels.modulated_layer_norm(x, shift, scale))

# ----------------------------------------------------------------------------- the decoder

class ActionDecoder(nn.Module):

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        D = cfg.width
        self.proprio_embed = TokenEmbedder(cfg.proprio_dim, D)
        self.action_embed = TokenEmbedder(cfg.action_dim, D)
        self.proprio_mask = nn.Parameter(torch.empty(1, D))   # replaces a dropped proprio token
        self.pos = nn.Parameter(torch.empty(1 + cfg.H_a, D))
        self.video_norm = nn.LayerNorm(cfg.video_dim, eps=1e-6)
        self.video_pos = nn.Parameter(torch.empty(cfg.context_tokens, cfg.video_dim)) if cfg.context_tokens else None
        self.time = TimeEncoding(D, cfg.rank)
        self.z_norm = RMSNorm(cfg.rank, eps=1e-6)
        self.A = nn.Linear(cfg.rank, 3 * D, bias=False)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.final_mod = Modulation(cfg.rank, cfg.adaln_lora, D, 2)
        self.final = nn.Linear(D, cfg.action_dim, bias=False)
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self):
        # every matrix: truncated normal with std 1/sqrt(fan_in) (keeps activations O(1)); biases 0
        for m in self.modules():
            if isinstance(m, nn.Linear):
                std = m.in_features ** -0.5
                nn.init.trunc_normal_(m.weight, std=std, a=-3 * std, b=3 * std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for embed in (self.proprio_embed, self.action_embed):   # He init before each GELU
            linears = [m for m in embed.mlp if isinstance(m, nn.Linear)]
            for m in linears[:-1]:
                nn.init.kaiming_uniform_(m.weight, nonlinearity="relu")
            nn.init.kaiming_uniform_(linears[-1].weight, nonlinearity="linear")
        std = self.cfg.width ** -0.5
        nn.init.trunc_normal_(self.proprio_mask, std=std, a=-3 * std, b=3 * std)
        nn.init.trunc_normal_(self.pos, std=std, a=-3 * std, b=3 * std)
        if self.video_pos is not None:   # half the scale of the normalised states it is added to
            nn.init.trunc_normal_(self.video_pos, std=0.5, a=-1.5, b=1.5)
        nn.init.constant_(self.time.B.bias, BC_BIAS_INIT)
        nn.init.constant_(self.time.C.bias, BC_BIAS_INIT)
        # adaLN-Zero: each sub-layer's own modulation starts at A z alone, and the output layer at zero, so an
        # untrained decoder predicts v = 0. (The release draws the output layer like the others.)
        for mod in [self.final_mod] + [m for b in self.blocks for m in (b.mod_cross, b.mod_self, b.mod_mlp)]:
            nn.init.zeros_(mod.up.weight)
        nn.init.zeros_(self.final.weight)

    def video_keys_values(self, video_states):
        """Every block's cross-attention keys and values of the video states: they depend on neither tau_a nor the
        noisy actions, so one call serves all integration steps of a replan.  (B, N, video_dim) -> [(k, v)] * depth.

        The video model is frozen: the states are detached, so no gradient can reach it.
        """
        cfg = self.cfg
        if video_states.ndim != 3 or video_states.shape[-1] != cfg.video_dim:
            raise ValueError(f"video_states must be (B, N, video_dim={cfg.video_dim}), got {tuple(video_states.shape)}")
        context = self.video_norm(video_states.detach().to(self.pos.dtype))
        if self.video_pos is not None:
            if context.shape[1] > cfg.context_tokens:
                raise ValueError(f"{context.shape[1]} video tokens, but the decoder has positions for "
                                 f"context_tokens={cfg.context_tokens}")
            context = context + self.video_pos[:context.shape[1]]
        return [block.cross_attn.keys_values(context) for block in self.blocks]

    def velocity(self, video_kv, tau_v, proprio, noisy_actions, tau_a, *, drop_proprio=None):
        """v_theta(x_tau_a | video, tau_v, proprio) from precomputed video keys/values (see video_keys_values).

        tau_v, tau_a: floats or (B,) tensors in [0, 1]; proprio (B, P); noisy_actions (B, H_a, A) -> (B, H_a, A).
        drop_proprio: (B,) bool, samples whose proprio token is replaced by the mask token (None: none).
        """
        cfg = self.cfg
        B = noisy_actions.shape[0]
        if noisy_actions.shape[1:] != (cfg.H_a, cfg.action_dim):
            raise ValueError(f"noisy_actions must be (B, H_a={cfg.H_a}, action_dim={cfg.action_dim}), "
                             f"got {tuple(noisy_actions.shape)}")
        if proprio.shape != (B, cfg.proprio_dim):
            raise ValueError(f"proprio must be (B={B}, proprio_dim={cfg.proprio_dim}), got {tuple(proprio.shape)}")
        tau_a, tau_v = (_per_sample(t, B, name, noisy_actions.device) for t, name in ((tau_a, "tau_a"), (tau_v, "tau_v")))

        # pi0's input scaling: x_tau = (1 - tau) x0 + tau eps has variance (1 - tau)^2 + tau^2 for unit-variance x0
        x_scaled = noisy_actions / ((1 - tau_a) ** 2 + tau_a ** 2).sqrt()[:, None, None].to(noisy_actions.dtype)
        proprio_tok = self.proprio_embed(proprio)                                   # (B, D)
        if drop_proprio is not None:
            proprio_tok = torch.where(drop_proprio[:, None], self.proprio_mask, proprio_tok)
        x = torch.cat([proprio_tok[:, None], self.action_embed(x_scaled)], dim=1) + self.pos   # (B, 1 + H_a, D)

        tau_tokens = torch.cat([torch.full_like(tau_a[:, None], PROPRIO_TAU), tau_a[:, None].expand(B, cfg.H_a)], 1)
        z = self.time(tau_tokens, tau_v)                                            # (B, 1 + H_a, R)
        z_act, Az = F.silu(self.z_norm(z)), self.A(z)   # the sub-layer MLPs read z normalised, the shared A raw z
        for block, kv in zip(self.blocks, video_kv):
            x = block(x, z_act, Az, kv)
        shift, scale = self.final_mod(z_act, Az)
        return self.final(kernels.modulated_layer_norm(x, shift, scale))[:, 1:]    # drop the proprio token

    def forward(self, video_states, tau_v, proprio, noisy_actions, tau_a, *, drop_proprio=None):
        """The velocity of the action flow.  video_states (B, N, video_dim) -> (B, H_a, A); see velocity()."""
        return self.velocity(self.video_keys_values(video_states), tau_v, proprio, noisy_actions, tau_a,
                             drop_proprio=drop_proprio)

    def loss(self, video_states, tau_v, proprio, actions, tau_a, eps, drop_proprio=None):
        """Per-sample loss_weight * MSE(v_theta(x_tau_a), eps - x0) with x_tau_a = (1 - tau_a) actions + tau_a eps, (B,).

        The caller draws the step's randomness (train.py draws all of a step's at once): tau_a (B,), in training
        0.001 + 0.999 Beta(1.5, 1) (flow.sample_tau_action); eps like actions; drop_proprio (B,) bool, the samples
        whose proprio token is replaced by the mask token (the release drops 20%)."""
        v = self(video_states, tau_v, proprio, flow.interpolate(actions, eps, tau_a), tau_a, drop_proprio=drop_proprio)
        return self.cfg.loss_weight * (v.float() - flow.velocity_target(actions, eps).float()).pow(2).mean(dim=(1, 2))

    @torch.no_grad()
    def sample(self, video_states, tau_v, proprio, steps=10, generator=None, temperature=1.0):
        """An action chunk (B, H_a, A): Euler from eps = temperature * torch.randn((B, H_a, A), generator) at
        tau_a = 1 to tau_a = 0, with the video's keys/values computed once and reused at every step.

        temperature 1 is the paper's eps ~ N(0, I); 0 integrates the flow from eps = 0, one deterministic chunk per
        plan (a departure from the paper: README, "Measured results")."""
        video_kv = self.video_keys_values(video_states)
        cfg = self.cfg
        eps = temperature * torch.randn((video_states.shape[0], cfg.H_a, cfg.action_dim), generator=generator)
        eps = eps.to(device=video_states.device, dtype=self.pos.dtype)
        return flow.euler(functools.partial(self.velocity, video_kv, tau_v, proprio), eps, 1.0, 0.0, steps)


def _per_sample(tau, B, name, device):
    """A float, a 0-dim or a (B,) tensor of flow times -> (B,) fp32."""
    tau = torch.as_tensor(tau, dtype=torch.float32, device=device)
    if tau.ndim == 0:
        tau = tau.expand(B)
    if tau.shape != (B,):
        raise ValueError(f"{name} must be a float or a (B={B},) tensor, got shape {tuple(tau.shape)}")
    if torch.isnan(tau).any() or tau.min() < 0 or tau.max() > 1:
        raise ValueError(f"{name} must lie in [0, 1] (1 = noise, 0 = data), got [{tau.min().item():.4g}, "
                         f"{tau.max().item():.4g}]")
    return tau
