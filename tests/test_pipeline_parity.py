"""The whole video denoising path against diffusers' Cosmos2VideoToWorldPipeline (0.42.1), the public reference.

The same tiny random DiT (conftest's `reference`, saved by diffusers and loaded by cosmos_weights.from_pretrained),
the same tiny Wan VAE and T5 (tests/tiny_models.py), the same history frames, prompt and noise eps. The pipeline
runs as the Hub's Cosmos-Predict2 pipeline is configured: FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True),
guidance_scale 1.0 (no classifier-free guidance, one transformer pass per step), fps 24 (no RoPE time scaling, as
NVIDIA's configs), output_type "latent", the VAE posterior mean (NVIDIA's; the pipeline would draw a sample).

What the pipeline does, written in flow time tau = sigma / (1 + sigma) (read from its source, and pinned below):
  - grid: the N Karras sigmas 80 -> 0.002 (rho 7), i.e. flow.karras_taus(N); the transformer sees tau_i;
  - start: latents = 80 eps in EDM units, i.e. x = tau_0 eps at tau_0 = 80/81;
  - conditioning: the first n_cond latent frames enter clean at sigma_c = 1e-4, their x0 prediction replaced by the
    clean latents (video2world_velocity's v = (x - context) / tau on them gives the same x0);
  - step: EDM Euler in sigma on (x - x0_hat) / sigma. This is the same map as the flow's Euler step in tau: both
    give x' = x0_hat + (sigma' / sigma)(x - x0_hat) in EDM units, (1 - tau') x0_hat + tau' eps_hat in flow units.
    Its latents are EDM's x_sigma = (1 + sigma) x_tau.
One scheduler detail departs from "1 -> 0", named here and pinned: the pipeline's default final_sigmas_type
"sigma_min" replaces the scheduler's final sigma 0 by sigma_min, so its last of N steps goes from 0.002 to 0.002
(zero length, one wasted transformer pass) and it returns the latents at sigma_min = 0.002, not at 0. That is
karras_taus(N, stop_after_step=N - 1); with final_sigmas_type "zero" the pipeline integrates to 0, karras_taus(N).
Not compared here: NVIDIA's own sampler, a 2nd-order solver on the same grid (cosmos-predict2-dit.md); diffusers'
pipeline, and so this project, take first-order Euler steps.
"""
import functools
from dataclasses import replace

import pytest
import torch

import flow
import tiny_models

PROMPT = "pick up the green block and put it on the yellow pad"
STEPS = 35                       # the release's schedule
HEIGHT, WIDTH, NUM_FRAMES = 32, 48, 13   # 4 latent frames of 4 x 6
HISTORY = 5                      # 5 history frames -> 2 context latent frames
SIGMA_MIN = 0.002


@pytest.fixture(scope="module")
def cosmos_folder(tmp_path_factory):
    from tiny_models import save_cosmos_encoders
    return save_cosmos_encoders(tmp_path_factory.mktemp("cosmos-encoders"), d_model=32)   # REF_CONFIG's text dim


@pytest.fixture(scope="module")
def frames():
    """HISTORY smooth random frames (H, W, 3) uint8 at the VAE's size."""
    g = torch.Generator().manual_seed(0)
    coarse = torch.rand(HISTORY, 3, 5, 7, generator=g)
    x = torch.nn.functional.interpolate(coarse, size=(HEIGHT, WIDTH), mode="bilinear", align_corners=False)
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


@pytest.fixture(scope="module")
def eps():
    return torch.randn(1, 16, 4, HEIGHT // 8, WIDTH // 8, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def project(folders, cosmos_folder, frames):
    """The project's DiT (QK-norm eps 1e-5, diffusers'), and its encoders' context latents and text states."""
    import cosmos_weights
    import encoders
    cfg = replace(cosmos_weights.from_pretrained(folders / "single").cfg, qk_norm_eps=1e-5)
    model = cosmos_weights.from_pretrained(folders / "single", cfg).eval()
    vae, t5 = encoders.build(encoders.cosmos_spec(str(cosmos_folder), size=(HEIGHT, WIDTH)))
    return model, vae.encode(frames[None]), t5([PROMPT]), vae.latent_frames(HISTORY)


@pytest.fixture(scope="module")
def ours(project):
    """The project's velocity for this history and prompt."""
    model, context, text, n_cond = project
    return functools.partial(model.video2world_velocity, text=text, context=context, n_cond=n_cond)


def run_pipeline(reference, cosmos_folder, frames, eps, final_sigmas_type):
    """The pipeline's output latents, its latents after each step, and the transformer's time input per step."""
    import diffusers.pipelines.cosmos.pipeline_cosmos2_video2world as cosmos_pipeline
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler
    from PIL import Image
    from transformers import AutoTokenizer, T5EncoderModel
    pipe = cosmos_pipeline.Cosmos2VideoToWorldPipeline(
        text_encoder=T5EncoderModel.from_pretrained(cosmos_folder, subfolder="text_encoder"),
        tokenizer=AutoTokenizer.from_pretrained(cosmos_folder, subfolder="tokenizer"), transformer=reference,
        vae=AutoencoderKLWan.from_pretrained(cosmos_folder, subfolder="vae"),
        scheduler=FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True), safety_checker=tiny_models.NoSafetyChecker())
    pipe.scheduler.register_to_config(final_sigmas_type=final_sigmas_type)   # the pipeline set "sigma_min"
    pipe.set_progress_bar_config(disable=True)
    after_step, fed = [], []

    def record(pipe, i, t, kw):
        after_step.append(kw["latents"].clone())
        return kw

    hook = reference.register_forward_pre_hook(lambda m, a, kw: fed.append(kw), with_kwargs=True)
    mean = lambda output, generator=None, sample_mode=None: output.latent_dist.mode()   # noqa: E731
    try:
        with pytest.MonkeyPatch.context() as mp, torch.no_grad():
            mp.setattr(cosmos_pipeline, "retrieve_latents", mean)
            out = pipe(video=[Image.fromarray(f) for f in frames.numpy()], prompt=PROMPT, height=HEIGHT, width=WIDTH,
                       num_frames=NUM_FRAMES, num_inference_steps=STEPS, guidance_scale=1.0, fps=24,
                       latents=eps.clone(), output_type="latent", return_dict=False,
                       callback_on_step_end=record)[0]
    finally:
        hook.remove()
    return out, after_step, fed, pipe.scheduler.sigmas


@pytest.fixture(scope="module")
def shipped(reference, cosmos_folder, frames, eps):
    return run_pipeline(reference, cosmos_folder, frames, eps, "sigma_min")


def integrate(velocity, eps, taus):
    """The project's video denoising on a given grid, from the sampler's start x = tau_0 eps."""
    with torch.no_grad():
        return flow.euler_on(velocity, taus[0].float() * eps, taus)


def errors(ours, theirs):
    err = (ours - theirs).abs().max().item()
    return err, err / theirs.abs().max().item()


def test_the_pipeline_runs_on_the_release_grid_from_the_scaled_noise(shipped, ours, eps):
    """What the comparisons below assume, pinned: the pipeline's sigmas, its transformer's time input at every step
    (karras_taus, the context frames at 1e-4 / (1 + 1e-4)) and its first input, tau_0 eps on the noisy frames."""
    _, _, fed, sigmas = shipped
    karras = flow.karras_sigmas(STEPS)
    torch.testing.assert_close(sigmas, torch.cat([karras, karras[-1:]]).float(), rtol=1e-6, atol=0)
    taus = flow.karras_taus(STEPS, stop_after_step=STEPS - 1)
    n_cond = ours.keywords["n_cond"]
    assert len(fed) == STEPS
    for tau, kw in zip(taus, fed):
        t = kw["timestep"][0, 0, :, 0, 0]
        torch.testing.assert_close(t[n_cond:], tau.float().expand(4 - n_cond), rtol=1e-6, atol=0)
        torch.testing.assert_close(t[:n_cond], torch.full((n_cond,), 1e-4 / (1 + 1e-4)), rtol=1e-6, atol=0)
    torch.testing.assert_close(fed[0]["hidden_states"][:, :, n_cond:], (80 / 81 * eps)[:, :, n_cond:],
                               rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fed[0]["hidden_states"][:, :, :n_cond], ours.keywords["context"][:, :, :n_cond],
                               rtol=0, atol=1e-5)   # the context latents, through the two VAE front ends


def test_full_denoising_equals_the_pipeline_output(shipped, ours, eps, reference, cosmos_folder, frames):
    """(a) The pipeline as shipped returns the latents at sigma_min: ours on karras_taus(N, stop_after_step=N - 1),
    in EDM units (1 + sigma_min) x. With final_sigmas_type "zero" it integrates to 0: ours on karras_taus(N)."""
    out, after_step, _, _ = shipped
    x = integrate(ours, eps, flow.karras_taus(STEPS, stop_after_step=STEPS - 1))
    err, rel = errors((1 + SIGMA_MIN) * x, out)
    print(f"full denoising (pipeline as shipped, to sigma_min): max abs err {err:.2e}, relative {rel:.2e}")
    assert rel <= 1e-4
    assert torch.equal(after_step[-1], after_step[-2])   # its last step has zero length
    out_zero = run_pipeline(reference, cosmos_folder, frames, eps, "zero")[0]
    x0 = integrate(ours, eps, flow.karras_taus(STEPS))
    err, rel = errors(x0, out_zero)
    print(f"full denoising to 0 (final_sigmas_type 'zero'): max abs err {err:.2e}, relative {rel:.2e}")
    assert rel <= 1e-4
    assert (out_zero - out).abs().max() > 1e-3   # the two endings differ: the comparison tells them apart


@pytest.mark.parametrize("s", [1, 5, 23])
def test_partial_integration_to_the_release_stop_step_equals_the_pipeline_after_s_steps(shipped, ours, eps, s):
    """(b) The release's "stop after step s": s Euler steps on karras_taus(N, stop_after_step=s), ending at
    tau_v_at_step(s), equal the pipeline's latents after its first s steps (EDM units, (1 + sigma_s) x)."""
    _, after_step, _, sigmas = shipped
    taus = flow.karras_taus(STEPS, stop_after_step=s)
    assert taus[-1].item() == pytest.approx(flow.tau_v_at_step(s), rel=1e-12) and len(taus) == s + 1
    x = integrate(ours, eps, taus)
    theirs = after_step[s - 1]
    err, rel = errors((1 + flow.tau_to_sigma(taus[-1]).float()) * x, theirs)
    print(f"stop after step {s} (tau_v = {taus[-1].item():.4f}): max abs err {err:.2e}, relative {rel:.2e}")
    assert rel <= 1e-4
    assert (x - taus[0].float() * eps).abs().max() > 100 * err / (1 + flow.tau_to_sigma(taus[-1]).item())   # it moved


def test_the_policy_stopped_after_step_s_plans_on_the_pipeline_latents(shipped, project, cosmos_folder):
    """VAMPolicy(stop_after_step=s) integrates the same way: its x_tau_v (its noise from seed 1, as eps) equals
    the pipeline's latents after s steps, and its tau_v is the release's."""
    import encoders
    from action_decoder import ActionDecoder, ActionDecoderConfig
    from sample import VAMPolicy
    model, context, text, n_cond = project
    decoder = ActionDecoder(ActionDecoderConfig(H_a=4, action_dim=1, proprio_dim=1, video_dim=model.cfg.width,
                                                width=32, depth=1, heads=2, rank=8, adaln_lora=8))
    run = {"k": 1, "window": {"history": HISTORY, "horizon": 4}, "tau_v": 1.0, "video_steps": 10,
           "action_steps": 10, "frame_shape": [HEIGHT, WIDTH, 3], "proprio_range": [[-1, 1]],
           "action_range": [[-1, 1]], "latent_frames": 4, "context_frames": n_cond,
           "encoders": encoders.cosmos_spec(str(cosmos_folder), size=(HEIGHT, WIDTH))}
    s = 5
    policy = VAMPolicy(model, decoder, run, stop_after_step=s, seed=1)
    assert policy.tau_v == pytest.approx(flow.tau_v_at_step(s), rel=1e-12) and policy.video_steps == s
    _, x = policy.plan_encoded(context, text)
    err, rel = errors((1 + flow.tau_to_sigma(policy.tau_v)).float() * x, shipped[1][s - 1])
    print(f"VAMPolicy stopped after step {s}: max abs err {err:.2e}, relative {rel:.2e}")
    assert rel <= 1e-4
    with pytest.raises(ValueError, match="give it alone"):
        VAMPolicy(model, decoder, run, stop_after_step=s, tau_v=0.5)
