"""Flow matching, the math both of mimic-video's flows share.

Convention (video and action alike): tau = 1 is pure noise, tau = 0 is data,

    x_tau = (1 - tau) * x0 + tau * eps,          eps ~ N(0, I)
    v     = d x_tau / d tau = eps - x0           (what the networks predict)

and sampling integrates dx/dtau = v from tau = 1 towards tau = 0. The video flow is integrated only
partially, 1 -> tau_v; the action flow fully, 1 -> 0. Both are the same `euler` call.

Cosmos-Predict2 was trained in the EDM language (noise level sigma); its rectified-flow form has
tau = sigma / (1 + sigma), so NVIDIA's sampler schedule maps onto tau_v.

Not here: any network. The video model and the action decoder (video_model.py, action_decoder.py) predict v;
training and inference (train.py, sample.py) call these functions.
"""
import math

import torch

# ----------------------------------------------------------------------------- the probability path

def _check_tau(tau):
    t = torch.as_tensor(tau)
    if t.numel() and (torch.isnan(t).any() or t.min() < 0 or t.max() > 1):
        raise ValueError(f"tau must lie in [0, 1] (1 = noise, 0 = data), got values in "
                         f"[{t.min().item():.4g}, {t.max().item():.4g}]")


def _per_sample(tau, x):
    """A float, a tensor broadcastable to x, or a (B,) vector taken per sample: (B,) -> (B, 1, ..., 1)."""
    tau = torch.as_tensor(tau, dtype=x.dtype, device=x.device)
    if tau.ndim == 1 and x.ndim > 1 and tau.shape[0] == x.shape[0]:
        tau = tau.view(-1, *([1] * (x.ndim - 1)))
    return tau


def interpolate(x0, eps, tau):
    """x_tau = (1 - tau) x0 + tau eps."""
    _check_tau(tau)
    tau = _per_sample(tau, x0)
    return (1 - tau) * x0 + tau * eps


def velocity_target(x0, eps):
    """v = eps - x0: the constant velocity of the straight path from x0 (tau = 0) to eps (tau = 1)."""
    return eps - x0


def x0_from_velocity(x_tau, tau, v):
    """Invert the path: x0 = x_tau - tau v (exact when v is the true velocity)."""
    _check_tau(tau)
    return x_tau - _per_sample(tau, x_tau) * v


def euler(velocity_fn, x, tau_start, tau_end, steps):
    """Integrate dx/dtau = velocity_fn(x, tau) from tau_start to tau_end with `steps` Euler steps.

    tau_i = tau_start + (i / N) (tau_end - tau_start),   x_{i+1} = x_i + (tau_{i+1} - tau_i) v(x_i, tau_i).
    tau_start / tau_end are floats or tensors (per sample or per frame, broadcastable to x; a (B,) vector is
    taken per sample); velocity_fn receives tau_i in that same shape. steps = 0 requires tau_start == tau_end
    and returns x unchanged: the video flow's default tau_v = 1 is exactly this case.
    """
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
    _check_tau(tau_start)
    _check_tau(tau_end)
    t0 = torch.as_tensor(tau_start, dtype=x.dtype, device=x.device)
    t1 = torch.as_tensor(tau_end, dtype=x.dtype, device=x.device)
    if steps == 0:
        if not torch.equal(*torch.broadcast_tensors(t0, t1)):
            raise ValueError("steps = 0 integrates nothing, so tau_start must equal tau_end")
        return x
    taus = [t0 + (t1 - t0) * (i / steps) for i in range(steps)] + [t1]   # the last one lands exactly on tau_end
    return euler_on(velocity_fn, x, taus)


def euler_on(velocity_fn, x, taus):
    """Euler on a given grid tau_0, tau_1, ..., tau_N:  x_{i+1} = x_i + (tau_{i+1} - tau_i) v(x_i, tau_i).

    Each tau_i is a float or a tensor as in `euler`; velocity_fn receives it as a tensor in x's dtype. N steps,
    N network calls (the last time is reached, never evaluated); a grid of one time returns x unchanged.
    The release's grid is `karras_taus`.
    """
    if len(taus) < 1:
        raise ValueError("the time grid needs at least one time (the start)")
    for tau in taus:
        _check_tau(tau)
    grid = [torch.as_tensor(tau, dtype=x.dtype, device=x.device) for tau in taus]
    for tau_i, tau_next in zip(grid[:-1], grid[1:]):
        x = x + _per_sample(tau_next - tau_i, x) * velocity_fn(x, tau_i)
    return x

# ----------------------------------------------------------------------------- EDM sigma <-> tau

def sigma_to_tau(sigma):
    """tau = sigma / (1 + sigma): EDM noise level to flow time (sigma = inf -> tau = 1)."""
    s = torch.as_tensor(sigma, dtype=torch.float64)
    if torch.isnan(s).any() or (s < 0).any():
        raise ValueError(f"sigma must be >= 0, got min {s.min().item():.4g}")
    return torch.where(torch.isinf(s), torch.ones_like(s), s / (1 + s))


def tau_to_sigma(tau):
    """sigma = tau / (1 - tau): flow time to EDM noise level (tau = 1 -> sigma = inf)."""
    _check_tau(tau)
    t = torch.as_tensor(tau, dtype=torch.float64)
    return t / (1 - t)


def karras_sigmas(steps=35, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """Karras et al.'s schedule, as Cosmos-Predict2's sampler uses it (rho = 7, 80 -> 0.002, 35 steps):

        sigma_i = (sigma_max^(1/rho) + i / (N - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,  i = 0..N-1.
    """
    if not isinstance(steps, int) or steps < 2:
        raise ValueError(f"the Karras schedule needs steps >= 2, got {steps!r}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    if rho <= 0:
        raise ValueError(f"rho must be > 0, got {rho}")
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return ((1 - ramp) * hi + ramp * lo) ** rho   # this form hits both ends exactly


def tau_v_at_step(s, steps=35, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """The tau_v of the official release's "stop_after_step = s": the video model's hidden states are read
    at the s-th noise level of the Karras schedule (s = 0: one pass at sigma = 80, tau_v = 80/81)."""
    if not isinstance(s, int) or not 0 <= s < steps:
        raise ValueError(f"stop-after step must be an integer in [0, {steps - 1}], got {s!r}")
    return sigma_to_tau(karras_sigmas(steps, sigma_min, sigma_max, rho)[s]).item()


def karras_taus(steps=35, stop_after_step=None, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """The release's grid for `euler_on`: the flow times tau_i = sigma_i / (1 + sigma_i) of the Karras sigmas.

    Full denoising (stop_after_step None): tau_0 .. tau_{N-1}, 0: N steps, the last one onto data.
    Partial (stop_after_step = s): tau_0 .. tau_s, the s steps that end at tau_v_at_step(s) (s = 0: none).
    Float64, (N + 1,) or (s + 1,). The grid starts at tau_0 = 80/81, not 1, and the sampler there on x = tau_0 eps
    (EDM's pure noise sigma_max eps, in flow units), not on the path's (1 - tau_0) x0 + tau_0 eps.
    Euler on it is the EDM Euler step of diffusers' Cosmos2VideoToWorldPipeline (tests/test_pipeline_parity.py);
    that pipeline stops at sigma_min by default, i.e. stop_after_step = N - 1.
    """
    taus = sigma_to_tau(karras_sigmas(steps, sigma_min, sigma_max, rho))
    if stop_after_step is None:
        return torch.cat([taus, taus.new_zeros(1)])
    if not isinstance(stop_after_step, int) or not 0 <= stop_after_step < steps:
        raise ValueError(f"stop-after step must be an integer in [0, {steps - 1}], got {stop_after_step!r}")
    return taus[:stop_after_step + 1]

# ----------------------------------------------------------------------------- training-time samplers

VIDEO_TAIL_PROB = 0.05             # share of video samples drawn from the high-noise tail
VIDEO_TAIL_SIGMA = (200.0, 1e5)    # sigma ~ LogUniform[200, 1e5] there
ACTION_TAU_MIN = 0.001             # tau_a lives in [0.001, 1]


def sample_tau_video(n, t_latent, generator=None):
    """tau_v for video training (Cosmos-Predict2's noise distribution), one per sample.

    With probability 0.95: logit(tau_v) = ln sigma ~ N(ln sqrt(T_latent), 1), i.e. sigma = sqrt(T) exp(N(0, 1));
    with probability 0.05: sigma ~ LogUniform[200, 1e5] (tau_v within 0.5% of pure noise).
    """
    if t_latent < 1:
        raise ValueError(f"T_latent (latent frames) must be >= 1, got {t_latent}")
    log_sigma = math.log(math.sqrt(t_latent)) + torch.randn(n, generator=generator, dtype=torch.float64)
    lo, hi = (math.log(s) for s in VIDEO_TAIL_SIGMA)
    log_sigma_tail = lo + (hi - lo) * torch.rand(n, generator=generator, dtype=torch.float64)
    tail = torch.rand(n, generator=generator, dtype=torch.float64) < VIDEO_TAIL_PROB
    return torch.sigmoid(torch.where(tail, log_sigma_tail, log_sigma)).float()   # sigmoid(ln sigma) = tau


def sample_tau_action(n, alpha=1.5, beta=1.0, generator=None):
    """tau_a ~ 0.001 + 0.999 Beta(alpha, beta).

    The paper's default Beta(1.5, 1) has density proportional to sqrt(tau_a - 0.001) (more weight near noise,
    as in pi0); the released configs use Beta(1, 1), uniform on [0.001, 1].
    Beta(a, b) = G_a / (G_a + G_b) with independent G ~ Gamma(., 1).
    """
    if alpha <= 0 or beta <= 0:
        raise ValueError(f"Beta parameters must be > 0, got alpha={alpha}, beta={beta}")
    g_a = torch._standard_gamma(torch.full((n,), float(alpha), dtype=torch.float64), generator=generator)
    g_b = torch._standard_gamma(torch.full((n,), float(beta), dtype=torch.float64), generator=generator)
    return (ACTION_TAU_MIN + (1 - ACTION_TAU_MIN) * g_a / (g_a + g_b)).float()

# ----------------------------------------------------------------------------- time embedding

def sinusoidal_embedding(tau, dim, min_period=4e-3, max_period=4.0):
    """phi(tau): sinusoids with periods spaced geometrically in [min_period, max_period] (the action decoder's,
    as in pi0):  period_j = min_period (max_period / min_period)^(j / (dim/2 - 1)),
    phi(tau) = [sin(2 pi tau / period_j)]_j ++ [cos(2 pi tau / period_j)]_j.   tau (...) -> (..., dim), fp32.
    """
    if dim % 2 or dim < 4:
        raise ValueError(f"embedding dim must be even and >= 4, got {dim}")
    if not 0 < min_period < max_period:
        raise ValueError(f"need 0 < min_period < max_period, got {min_period}, {max_period}")
    tau = torch.as_tensor(tau, dtype=torch.float32)
    frac = torch.linspace(0, 1, dim // 2, dtype=torch.float64, device=tau.device)
    period = min_period * (max_period / min_period) ** frac
    angle = tau[..., None] * (2 * math.pi / period).float()
    return torch.cat([torch.sin(angle), torch.cos(angle)], dim=-1)
