"""Property tests of flow.py: every function is pinned to an analytic result, not just a shape."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import flow

taus = st.floats(0.0, 1.0)
seeds = st.integers(0, 2**31 - 1)
steps = st.integers(1, 40)


def randn(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

# ----------------------------------------------------------------------------- the path

@given(seeds)
def test_path_endpoints_are_data_and_noise(seed):
    x0, eps = randn(seed, 3, 5), randn(seed + 1, 3, 5)
    assert torch.equal(flow.interpolate(x0, eps, 0.0), x0)
    assert torch.equal(flow.interpolate(x0, eps, 1.0), eps)


@given(seeds, taus, taus)
def test_path_is_straight_with_the_target_velocity(seed, t1, t2):
    # x_t2 - x_t1 = (t2 - t1) (eps - x0): the velocity target is the path's (constant) derivative
    x0, eps = randn(seed, 4, 3), randn(seed + 1, 4, 3)
    diff = flow.interpolate(x0, eps, t2) - flow.interpolate(x0, eps, t1)
    torch.testing.assert_close(diff, (t2 - t1) * flow.velocity_target(x0, eps), rtol=0, atol=1e-12)


@given(seeds, taus)
def test_x0_recovered_exactly_from_the_true_velocity(seed, tau):
    x0, eps = randn(seed, 2, 6), randn(seed + 1, 2, 6)
    x_tau = flow.interpolate(x0, eps, tau)
    x0_hat = flow.x0_from_velocity(x_tau, tau, flow.velocity_target(x0, eps))
    torch.testing.assert_close(x0_hat, x0, rtol=0, atol=1e-12)


@given(seeds)
def test_per_sample_tau_equals_one_call_per_sample(seed):
    x0, eps = randn(seed, 4, 2, 3), randn(seed + 1, 4, 2, 3)
    tau = torch.rand(4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    batched = flow.interpolate(x0, eps, tau)
    for b in range(4):
        torch.testing.assert_close(batched[b], flow.interpolate(x0[b], eps[b], tau[b].item()), rtol=0, atol=0)

# ----------------------------------------------------------------------------- Euler

@given(seeds, steps)
def test_euler_on_the_true_conditional_velocity_lands_on_x0_for_any_steps(seed, n):
    x0, eps = randn(seed, 3, 4), randn(seed + 1, 3, 4)
    x = flow.euler(lambda x, tau: eps - x0, eps, 1.0, 0.0, n)
    torch.testing.assert_close(x, x0, rtol=0, atol=1e-12)


@given(seeds, steps, taus)
def test_euler_follows_the_straight_path_from_any_start(seed, n, tau_end):
    # v(x, tau) = (x - x0) / tau is the velocity of the straight path through (x0, 0) and (x, tau); its flow is
    # x_tau' = x0 + (tau'/tau)(x - x0), and Euler reproduces that exactly for every number of steps.
    x0, x1 = randn(seed, 5), randn(seed + 1, 5)
    x = flow.euler(lambda x, tau: (x - x0) / tau, x1, 1.0, tau_end, n)
    torch.testing.assert_close(x, x0 + tau_end * (x1 - x0), rtol=0, atol=1e-10)


@given(steps)
def test_euler_step_rule_on_a_linear_ode(n):
    # dx/dtau = x from 1 to 0: each step multiplies by (1 - 1/N), so x_N = x (1 - 1/N)^N (-> x / e).
    x = flow.euler(lambda x, tau: x, torch.ones(1, dtype=torch.float64), 1.0, 0.0, n)
    assert x.item() == pytest.approx((1 - 1 / n) ** n, rel=1e-12)


@given(seeds, st.integers(1, 20), st.integers(1, 20), st.floats(0.05, 0.95))
def test_partial_then_rest_equals_the_whole_integration(seed, n1, n2, a):
    # 1 -> a -> 0 equals 1 -> 0 on the grid made of both halves: partial integration is the same call
    x0 = randn(seed, 6)
    field = lambda x, tau: torch.sin(3 * x) * tau - x0   # noqa: E731, any smooth non-linear field
    two_legs = flow.euler(field, flow.euler(field, x0, 1.0, a, n1), a, 0.0, n2)
    ref = x0.clone()
    grid = [1 + (a - 1) * i / n1 for i in range(n1)] + [a + (0 - a) * i / n2 for i in range(n2)] + [0.0]
    for t, t_next in zip(grid[:-1], grid[1:]):
        ref = ref + (t_next - t) * field(ref, torch.tensor(t, dtype=torch.float64))
    torch.testing.assert_close(two_legs, ref, rtol=0, atol=1e-10)


@given(seeds)
def test_euler_with_zero_steps_is_the_identity_and_never_calls_the_network(seed):
    x = randn(seed, 2, 3)
    def never(x, tau):
        raise AssertionError("velocity called with zero steps")
    assert flow.euler(never, x, 1.0, 1.0, 0) is x
    assert flow.euler(never, x, torch.tensor([0.3, 0.7]), torch.tensor([0.3, 0.7]), 0) is x


@given(seeds, steps)
def test_euler_per_sample_and_per_frame_times(seed, n):
    gen = torch.Generator().manual_seed(seed)
    x1 = torch.randn(3, 2, 4, 5, generator=gen, dtype=torch.float64)        # (B, C, T, X): T frames
    tau_end = torch.rand(3, generator=gen, dtype=torch.float64)             # per sample
    field = lambda x, tau: -torch.cos(x) * (1 + _bcast(tau, x))              # noqa: E731
    batched = flow.euler(field, x1, 1.0, tau_end, n)
    for b in range(3):
        one = flow.euler(field, x1[b:b + 1], 1.0, tau_end[b].item(), n)
        torch.testing.assert_close(batched[b:b + 1], one, rtol=0, atol=1e-12)
    # per frame: frames with tau_start == tau_end stay put (how conditioning frames behave), the others move
    t0 = torch.tensor([1.0, 1.0, 0.5, 0.5], dtype=torch.float64).view(1, 1, 4, 1)
    t1 = torch.tensor([0.2, 1.0, 0.0, 0.5], dtype=torch.float64).view(1, 1, 4, 1)
    out = flow.euler(field, x1, t0, t1, n)
    assert torch.equal(out[:, :, [1, 3]], x1[:, :, [1, 3]])
    assert not torch.allclose(out[:, :, [0, 2]], x1[:, :, [0, 2]])


def _bcast(tau, x):
    tau = torch.as_tensor(tau, dtype=x.dtype)
    return tau.view(-1, *([1] * (x.ndim - 1))) if tau.ndim == 1 else tau

grids = st.lists(st.floats(0.0, 1.0), min_size=1, max_size=12).map(lambda t: sorted(t, reverse=True))


@given(seeds, st.lists(st.floats(1e-3, 1.0), max_size=12), st.booleans())
def test_euler_on_any_grid_follows_the_straight_path(seed, grid, to_zero):
    # the straight-path field of test_euler_follows_the_straight_path_from_any_start, on a grid of any spacing
    # (evaluated at every time but the last, so only the last may be 0)
    x0, x1 = randn(seed, 5), randn(seed + 1, 5)
    grid = [1.0] + sorted(grid, reverse=True) + [0.0] * to_zero
    x = flow.euler_on(lambda x, tau: (x - x0) / tau, x1, grid)
    torch.testing.assert_close(x, x0 + grid[-1] * (x1 - x0), rtol=0, atol=1e-10)


@given(grids)
def test_euler_on_step_rule_on_a_linear_ode(grid):
    # dx/dtau = x: each step multiplies by 1 + (tau_{i+1} - tau_i)
    x = flow.euler_on(lambda x, tau: x, torch.ones(1, dtype=torch.float64), grid)
    assert x.item() == pytest.approx(math.prod(1 + b - a for a, b in zip(grid, grid[1:])), rel=1e-12)


@given(seeds, grids, grids)
def test_euler_on_a_grid_in_two_legs_equals_the_whole_grid(seed, g1, g2):
    x0 = randn(seed, 6)
    field = lambda x, tau: torch.sin(3 * x) * tau - x0   # noqa: E731
    g2 = [t * g1[-1] for t in g2]   # the second leg starts where the first ends, below it
    two_legs = flow.euler_on(field, flow.euler_on(field, x0, g1 + g2[:1]), g2)
    torch.testing.assert_close(two_legs, flow.euler_on(field, x0, g1 + g2), rtol=0, atol=0)


@given(seeds, steps, taus)
def test_euler_on_the_uniform_grid_is_euler(seed, n, tau_end):
    x1 = randn(seed, 4)
    field = lambda x, tau: -torch.cos(x) * (1 + tau)   # noqa: E731
    grid = [1 + (tau_end - 1) * i / n for i in range(n)] + [tau_end]
    torch.testing.assert_close(flow.euler_on(field, x1, grid), flow.euler(field, x1, 1.0, tau_end, n),
                               rtol=0, atol=1e-12)


def test_euler_on_a_single_time_is_the_identity_and_never_calls_the_network():
    x = torch.zeros(3)
    def never(x, tau):
        raise AssertionError("velocity called on a grid without a step")
    assert flow.euler_on(never, x, [0.4]) is x
    assert flow.euler_on(never, x, flow.karras_taus(35, stop_after_step=0)) is x

# ----------------------------------------------------------------------------- sigma <-> tau, Karras

@given(st.floats(0.0, 1e8))
def test_sigma_tau_round_trip(sigma):
    tau = flow.sigma_to_tau(sigma)
    assert 0 <= tau.item() < 1
    # 1 - tau loses digits as sigma grows: the round trip is exact up to float64 conditioning, ~(1 + sigma) ulp
    assert flow.tau_to_sigma(tau).item() == pytest.approx(sigma, rel=4e-16 * (2 + sigma), abs=1e-15)


@given(st.floats(0.0, 1e6), st.floats(0.0, 1e6))
def test_sigma_to_tau_is_monotone(s1, s2):
    # non-decreasing: near sigma = 1e6 two distinct sigmas can round to the same float64 tau
    s1, s2 = min(s1, s2), max(s1, s2)
    assert flow.sigma_to_tau(s1).item() <= flow.sigma_to_tau(s2).item()


def test_sigma_to_tau_limits_and_cosmos_values():
    assert flow.sigma_to_tau(0.0).item() == 0.0
    assert flow.sigma_to_tau(math.inf).item() == 1.0
    assert flow.sigma_to_tau(80.0).item() == pytest.approx(80 / 81, rel=1e-15)
    assert flow.tau_to_sigma(1.0).item() == math.inf


def test_karras_schedule_of_the_cosmos_sampler():
    s = flow.karras_sigmas()
    assert len(s) == 35 and s[0].item() == pytest.approx(80.0, rel=1e-12) and s[-1].item() == pytest.approx(0.002, rel=1e-12)
    assert (s[1:] < s[:-1]).all()
    # a middle value from the closed form, computed independently in plain floats
    i = 17
    expected = (80 ** (1 / 7) + i / 34 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert s[i].item() == pytest.approx(expected, rel=1e-12)


@given(st.integers(2, 60), st.floats(0.5, 10))
def test_karras_schedule_properties(n, rho):
    s = flow.karras_sigmas(n, 0.01, 50.0, rho)
    assert s[0].item() == pytest.approx(50.0, rel=1e-9) and s[-1].item() == pytest.approx(0.01, rel=1e-9)
    assert (s[1:] < s[:-1]).all()
    # sigma^(1/rho) is evenly spaced
    r = s ** (1 / rho)
    torch.testing.assert_close(r[1:] - r[:-1], (r[1] - r[0]).expand(n - 1), rtol=1e-9, atol=1e-12)
    if rho == 1:
        torch.testing.assert_close(s, torch.linspace(50, 0.01, n, dtype=torch.float64))


def test_tau_v_of_the_release_stop_after_step():
    assert flow.tau_v_at_step(0) == pytest.approx(80 / 81, rel=1e-12)
    taus = [flow.tau_v_at_step(s) for s in range(35)]
    assert all(a > b for a, b in zip(taus, taus[1:]))
    assert taus[-1] == pytest.approx(0.002 / 1.002, rel=1e-9)

@given(st.integers(2, 60))
def test_karras_taus_are_the_karras_sigmas_as_flow_times_then_zero(n):
    taus, sigmas = flow.karras_taus(n), flow.karras_sigmas(n)
    assert taus.dtype == torch.float64 and len(taus) == n + 1 and taus[-1].item() == 0.0
    torch.testing.assert_close(taus[:-1], sigmas / (1 + sigmas), rtol=1e-15, atol=0)
    assert taus[0].item() == pytest.approx(80 / 81, rel=1e-12) and (taus[1:] < taus[:-1]).all()


@given(st.integers(2, 60), st.data())
def test_karras_taus_stopped_after_step_s_end_at_the_release_tau_v(n, data):
    s = data.draw(st.integers(0, n - 1))
    partial = flow.karras_taus(n, stop_after_step=s)
    assert len(partial) == s + 1 and torch.equal(partial, flow.karras_taus(n)[:s + 1])
    assert partial[-1].item() == pytest.approx(flow.tau_v_at_step(s, n), rel=1e-12)


@given(seeds, st.integers(2, 40), st.booleans())
def test_flow_euler_on_karras_taus_is_edm_euler_on_the_karras_sigmas(seed, n, to_zero):
    # The Cosmos sampler's step in EDM units, x_sigma = (1 + sigma) x_tau: x' = x + (sigma' - sigma)(x - D) / sigma
    # for a denoiser D (its x0 prediction), from x = sigma_max eps. In flow time with v = (x_tau - D) / tau it is the
    # flow's Euler step on karras_taus, from x = tau_0 eps: the two samplers are one map, for any denoiser.
    x0, eps = randn(seed, 7), randn(seed + 1, 7)
    denoise = lambda x_sigma, sigma: torch.tanh(x_sigma / (1 + sigma)) * x0   # noqa: E731, any smooth D
    sigmas = torch.cat([flow.karras_sigmas(n), torch.zeros(1, dtype=torch.float64)])[:None if to_zero else -1]
    x = sigmas[0] * eps
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        x = x + (sigma_next - sigma) * (x - denoise(x, sigma)) / sigma
    taus = flow.karras_taus(n, stop_after_step=None if to_zero else n - 1)
    velocity = lambda x, tau: (x - denoise(x / (1 - tau), tau / (1 - tau))) / tau   # noqa: E731
    x_tau = flow.euler_on(velocity, taus[0] * eps, taus)
    torch.testing.assert_close((1 + sigmas[-1]) * x_tau, x, rtol=1e-9, atol=1e-9)

# ----------------------------------------------------------------------------- samplers vs analytic CDFs

N_DRAWS = 4000
KS_BOUND = 1.95 / math.sqrt(N_DRAWS)   # Kolmogorov's critical value at p ~ 0.001


def ks_statistic(samples, cdf):
    x = np.sort(np.asarray(samples, dtype=np.float64))
    f = cdf(x)
    n = len(x)
    return max(np.max(np.arange(1, n + 1) / n - f), np.max(f - np.arange(n) / n))


def video_cdf(t, t_latent):
    logit = np.log(t) - np.log1p(-t)
    normal = 0.5 * (1 + np.vectorize(math.erf)((logit - math.log(math.sqrt(t_latent))) / math.sqrt(2)))
    lo, hi = math.log(200), math.log(1e5)
    return 0.95 * normal + 0.05 * np.clip((logit - lo) / (hi - lo), 0, 1)


@settings(derandomize=True, max_examples=8, deadline=None)
@given(seeds, st.integers(1, 32))
def test_video_tau_sampler_matches_its_cdf(seed, t_latent):
    tau = flow.sample_tau_video(N_DRAWS, t_latent, torch.Generator().manual_seed(seed)).double()
    assert ((tau > 0) & (tau <= 1)).all()
    assert ks_statistic(tau.numpy(), lambda x: video_cdf(np.minimum(x, 1 - 1e-12), t_latent)) < KS_BOUND
    # the tail: sigma >= 200 for at least the 5% tail share (minus sampling noise)
    assert (flow.tau_to_sigma(tau.clamp(max=1 - 1e-7)) >= 199).double().mean() > 0.05 - 3 * math.sqrt(0.05 * 0.95 / N_DRAWS)


def test_video_tau_sampler_is_seeded():
    a = flow.sample_tau_video(100, 16, torch.Generator().manual_seed(3))
    b = flow.sample_tau_video(100, 16, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    # the median of the logit-normal part: logit(tau) = ln sqrt(16) = ln 4, tau = 0.8
    tau = flow.sample_tau_video(20000, 16, torch.Generator().manual_seed(0))
    assert tau.median().item() == pytest.approx(0.8, abs=0.01)


def beta_cdf(alpha, beta):
    if beta == 1:
        return lambda u: u ** alpha
    if alpha == 1:
        return lambda u: 1 - (1 - u) ** beta
    assert (alpha, beta) == (2, 2)
    return lambda u: 3 * u ** 2 - 2 * u ** 3


@settings(derandomize=True, max_examples=12, deadline=None)
@given(seeds, st.sampled_from(["alpha", "beta", "both"]), st.floats(0.3, 5.0))
def test_action_tau_sampler_matches_its_cdf(seed, which, p):
    alpha, beta = {"alpha": (p, 1.0), "beta": (1.0, p), "both": (2, 2)}[which]
    tau = flow.sample_tau_action(N_DRAWS, alpha, beta, torch.Generator().manual_seed(seed)).double()
    assert ((tau >= 0.001 - 1e-7) & (tau <= 1)).all()
    u = lambda t: np.clip((t - 0.001) / 0.999, 0, 1)   # noqa: E731
    assert ks_statistic(tau.numpy(), lambda t: beta_cdf(alpha, beta)(u(t))) < KS_BOUND


def test_action_tau_paper_default_density_is_sqrt():
    # Beta(1.5, 1): density proportional to sqrt(tau - 0.001), so P(tau <= 0.001 + 0.999 q) = q^1.5
    tau = flow.sample_tau_action(20000, generator=torch.Generator().manual_seed(1))
    for q in (0.25, 0.5, 0.75):
        assert (tau <= 0.001 + 0.999 * q).float().mean().item() == pytest.approx(q ** 1.5, abs=0.012)

# ----------------------------------------------------------------------------- time embedding

@given(st.lists(taus, min_size=1, max_size=8), st.sampled_from([4, 16, 64, 256]))
def test_sinusoidal_embedding_values(ts, dim):
    tau = torch.tensor(ts)
    e = flow.sinusoidal_embedding(tau, dim)
    half = dim // 2
    period = 4e-3 * (4.0 / 4e-3) ** (np.arange(half) / (half - 1))
    angle = np.asarray(ts, dtype=np.float64)[:, None] * 2 * np.pi / period
    np.testing.assert_allclose(e[:, :half].numpy(), np.sin(angle), atol=2e-4)
    np.testing.assert_allclose(e[:, half:].numpy(), np.cos(angle), atol=2e-4)
    torch.testing.assert_close(e[:, :half] ** 2 + e[:, half:] ** 2, torch.ones(len(ts), half))


@given(taus, taus)
def test_sinusoidal_embedding_is_bi_lipschitz_on_the_unit_interval(t1, t2):
    # Below: the slowest pair (period 4) alone gives a chord of 2 sin(pi |dt| / 4) >= sqrt(2) |dt| for |dt| <= 1,
    # so distinct times never collide. Above: |d phi / d tau| = 2 pi sqrt(sum_j period_j^-2).
    dt = abs(t1 - t2)
    d = (flow.sinusoidal_embedding(torch.tensor(t1), 64) - flow.sinusoidal_embedding(torch.tensor(t2), 64)).norm()
    period = 4e-3 * 1000.0 ** (np.arange(32) / 31)
    lipschitz = 2 * np.pi * np.sqrt(np.sum(period ** -2.0))
    assert math.sqrt(2) * dt - 2e-3 <= d.item() <= lipschitz * dt + 2e-3   # 2e-3: fp32 angles up to ~1600 rad

# ----------------------------------------------------------------------------- bad arguments

@pytest.mark.parametrize("call, message", [
    (lambda: flow.interpolate(torch.zeros(2), torch.zeros(2), 1.5), "tau must lie in"),
    (lambda: flow.interpolate(torch.zeros(2), torch.zeros(2), torch.tensor([-0.1, 0.5])), "tau must lie in"),
    (lambda: flow.x0_from_velocity(torch.zeros(2), float("nan"), torch.zeros(2)), "tau must lie in"),
    (lambda: flow.euler(lambda x, t: x, torch.zeros(2), 1.0, 0.0, -1), "non-negative integer"),
    (lambda: flow.euler(lambda x, t: x, torch.zeros(2), 1.0, 0.0, 2.5), "non-negative integer"),
    (lambda: flow.euler(lambda x, t: x, torch.zeros(2), 1.0, 0.5, 0), "tau_start must equal tau_end"),
    (lambda: flow.euler(lambda x, t: x, torch.zeros(2), 1.2, 0.0, 3), "tau must lie in"),
    (lambda: flow.sigma_to_tau(-1.0), "sigma must be >= 0"),
    (lambda: flow.tau_to_sigma(2.0), "tau must lie in"),
    (lambda: flow.karras_sigmas(1), "steps >= 2"),
    (lambda: flow.karras_sigmas(10, 1.0, 0.5), "sigma_min < sigma_max"),
    (lambda: flow.tau_v_at_step(35), "stop-after step"),
    (lambda: flow.karras_taus(35, stop_after_step=35), "stop-after step"),
    (lambda: flow.euler_on(lambda x, t: x, torch.zeros(2), []), "at least one time"),
    (lambda: flow.euler_on(lambda x, t: x, torch.zeros(2), [1.0, -0.5]), "tau must lie in"),
    (lambda: flow.sample_tau_video(10, 0), "T_latent"),
    (lambda: flow.sample_tau_action(10, alpha=0.0), "Beta parameters must be > 0"),
    (lambda: flow.sample_tau_action(10, beta=-1.0), "Beta parameters must be > 0"),
    (lambda: flow.sinusoidal_embedding(torch.zeros(1), 7), "even"),
])
def test_invalid_arguments_raise_value_errors_that_say_what(call, message):
    with pytest.raises(ValueError, match=message):
        call()
