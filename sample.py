"""Inference: a trained Video-Action Model as a policy, and a CLI that rolls it out in the built-in world.

One replan (the paper's inference, Sec. "Inference" of ../shared/reference/mimic-video-method.md):
  1. encode the H_o history frames into clean context latents, the instruction into text states;
  2. put noise on the F future latent frames and integrate the video flow from tau = 1 to tau_v
     (Euler, `video_steps` steps; tau_v = 1, the default, is zero steps), or as the release does, stop after step
     s of the 35-step Karras schedule (`stop_after_step`: flow.karras_taus, tau_v = flow.tau_v_at_step(s));
  3. run blocks 0..k of the video model once on that partially denoised video: the layer-k states are the plan;
  4. integrate the action flow from tau_a = 1 to 0 (10 Euler steps), the decoder cross-attending to the plan
     (its keys and values computed once per replan).

    python sample.py --out out/world                      # evaluate the run in out/world, 25 episodes per task
    python sample.py --out out/world --gif plan.gif       # rollouts with the planned actions and the visual plan
    python sample.py --out out/world --bench              # latency of one replan: video pass vs action integration

Not here: training (train.py), the evaluation harness (evaluation.py, which drives any environment with this policy).
"""
import argparse
import functools
import time
from pathlib import Path

import numpy as np
import torch

import checkpoints
import data
import encoders
import flow
from action_decoder import ActionDecoder, ActionDecoderConfig
from video_model import VideoDiT, VideoDiTConfig


class VAMPolicy:
    """act_batch(frames (N, H_o, H, W, C) uint8, instructions [N], proprio (N, P)) -> action chunks (N, H_a, A),
    in the dataset's units; act(frames (H_o, H, W, C), instruction, proprio (P,)) -> (H_a, A) for one episode.

    `run` describes what the models were trained on (train.run_meta, stored with the checkpoints): the window (H_o,
    H_a, strides), the frame shape, the proprio and action ranges, the encoders, and the default inference settings
    (k, tau_v, steps), which keyword arguments override. Inputs are checked against it at the door.
    stop_after_step = s replaces tau_v and video_steps by the release's grid: s Euler steps on the Karras schedule
    from tau_0 = 80/81, ending at tau_v = flow.tau_v_at_step(s), as diffusers' Cosmos2VideoToWorldPipeline steps.
    """

    def __init__(self, video, decoder, run, *, k=None, tau_v=None, video_steps=None, action_steps=None,
                 action_temperature=None, stop_after_step=None, seed=0):
        self.video, self.decoder, self.run = video.eval(), decoder.eval(), run
        self.spec = data.WindowSpec(**run["window"])
        self.k = run["k"] if k is None else k
        self.tau_v = run["tau_v"] if tau_v is None else tau_v
        if not 0 < self.tau_v <= 1:
            raise ValueError(f"tau_v must lie in (0, 1], got {self.tau_v}")
        self.video_steps = 0 if self.tau_v == 1 else video_steps or run["video_steps"]   # 1 -> 1 integrates nothing
        self.video_taus = None   # None: the uniform grid 1 -> tau_v; else the release's grid (flow.karras_taus)
        if stop_after_step is not None:
            if tau_v is not None or video_steps is not None:
                raise ValueError("stop_after_step sets both tau_v and the video steps: give it alone")
            self.video_taus = flow.karras_taus(stop_after_step=stop_after_step)
            self.tau_v, self.video_steps = self.video_taus[-1].item(), stop_after_step
        self.action_steps = action_steps or run["action_steps"]
        # runs written before it was recorded sampled at the paper's temperature 1
        self.action_temperature = (run.get("action_temperature", 1.0) if action_temperature is None
                                   else action_temperature)
        if self.action_temperature < 0:
            raise ValueError(f"action_temperature must be >= 0, got {self.action_temperature}")
        self.frame_shape = tuple(run["frame_shape"])
        self.proprio_norm, self.action_norm = data.Normalizer(run["proprio_range"]), data.Normalizer(run["action_range"])
        # latent frames of a window and of its context; runs written before the encoders were recorded: the stand-ins
        self.latent_frames = run.get("latent_frames", self.spec.history + self.spec.future)
        self.n_cond = run.get("context_frames", self.spec.history)
        self.encoder_spec = run.get("encoders") or encoders.stand_in_spec(run["tokenizer_factor"], run["text_length"],
                                                                          video.cfg.text_dim)
        self.static = run.get("static", False)
        self._encoders = None   # built on first use: a policy given latents (act_encoded) never loads them
        self.generator = torch.Generator().manual_seed(seed)
        self.device = next(decoder.parameters()).device

    @property
    def tokenizer(self):
        """The frozen video encoder the run was trained with (encoders.py)."""
        return self._frozen()[0]

    @property
    def text_encoder(self):
        return self._frozen()[1]

    def _frozen(self):
        if self._encoders is None:
            self._encoders = encoders.build(self.encoder_spec, self.device)
        return self._encoders

    def encode(self, frames, instructions):
        """Step 1: (context latents (N, C, n_cond, h, w), text states (N, L, D)). The H_o history frames alone give
        the context latent frames (one each for the stand-in; (H_o - 1) / 4 + 1 for the causal Wan VAE)."""
        frames = np.asarray(frames)
        H_o = self.spec.history
        if frames.ndim != 5 or frames.shape[1:] != (H_o, *self.frame_shape) or frames.dtype != np.uint8:
            raise ValueError(f"frames must be (N, H_o, H, W, C) = (N, {H_o}, {', '.join(map(str, self.frame_shape))}) "
                             f"uint8: this run was trained on the last H_o = {H_o} frames of "
                             f"{'x'.join(map(str, self.frame_shape))}; got {frames.shape} {frames.dtype}")
        if len(instructions) != len(frames):
            raise ValueError(f"{len(frames)} frame histories but {len(instructions)} instructions")
        context = self.tokenizer.encode(torch.as_tensor(frames)).to(self.device)   # (N, C, n_cond, h, w)
        return context, self.text_encoder(list(instructions)).to(self.device)

    def _start(self, context, text):
        """The video velocity given this context and text, and the noise on all T_lat latent frames."""
        N, C, _, h, w = context.shape
        noise = torch.randn((N, C, self.latent_frames, h, w), generator=self.generator).to(self.device)
        velocity = functools.partial(self.video.video2world_velocity, text=text, context=context, n_cond=self.n_cond)
        return velocity, noise

    @torch.no_grad()
    def plan(self, frames, instructions):
        """Steps 1-3: the layer-k video states (N, T*h*w, width) and the partially denoised latents x_tau_v."""
        return self.plan_encoded(*self.encode(frames, instructions))

    @torch.no_grad()
    def plan_encoded(self, context, text):
        """Steps 2-3 on encoded inputs: context latents (N, C, >= n_cond, h, w), text states (N, L, D)."""
        velocity, noise = self._start(context, text)
        if self.static:   # the static-image control (train.py --video.static): the observed frames noised to tau_v
            x = flow.interpolate(context, noise, torch.full((len(noise),), self.tau_v, device=self.device))
        elif self.video_taus is None:
            x = flow.euler(velocity, noise, 1.0, self.tau_v, self.video_steps)
        else:   # the release's sampler starts at tau_0 < 1 on x = tau_0 eps (see flow.karras_taus)
            x = flow.euler_on(velocity, self.video_taus[0].item() * noise, self.video_taus)
        return self.video.video2world_hidden_states(x, self.tau_v, text, context, self.n_cond, self.k), x

    @torch.no_grad()
    def act_batch(self, frames, instructions, proprio):
        proprio = self._check_proprio(proprio, len(frames))
        return self.act_encoded(*self.encode(frames, instructions), proprio)

    @torch.no_grad()
    def act_encoded(self, context, text, proprio):
        """act_batch on encoded inputs (see plan_encoded), e.g. a pre-encoded dataset's windows."""
        states, _ = self.plan_encoded(context.to(self.device), text.to(self.device))
        actions = self.decoder.sample(states, self.tau_v, self.proprio_norm(self._check_proprio(proprio, len(context)))
                                      .to(self.device), self.action_steps, self.generator, self.action_temperature)
        return self.action_norm.inverse(actions.float().cpu()).numpy()

    def _check_proprio(self, proprio, n):
        proprio = torch.as_tensor(np.asarray(proprio), dtype=torch.float32)
        if proprio.shape != (n, self.decoder.cfg.proprio_dim):
            raise ValueError(f"proprio must be (N, P) = ({n}, {self.decoder.cfg.proprio_dim}): this run was "
                             f"trained on {self.decoder.cfg.proprio_dim}-D proprioception; got {tuple(proprio.shape)}")
        return proprio

    def act(self, frames, instruction, proprio):
        return self.act_batch(np.asarray(frames)[None], [instruction], np.asarray(proprio)[None])[0]

    @torch.no_grad()
    def imagine(self, frames, instructions, steps=20):
        """The video model's fully denoised future (1 -> 0), decoded to frames (N, F, H, W, C) uint8: what the
        visual plan would look like if the flow were integrated all the way."""
        context, text = self.encode(frames, instructions)
        velocity, noise = self._start(context, text)
        x0 = flow.euler(velocity, noise, 1.0, 0.0, steps)
        return self.tokenizer.decode(x0.cpu())[:, self.spec.history:].numpy()   # the whole clip, then its future

    @classmethod
    def load(cls, out_dir, device="cpu", **overrides):
        """(policy, metadata) of a finished train.py run: its video and action checkpoints in out_dir."""
        out_dir = Path(out_dir)
        for name in ("video", "action"):
            if not (out_dir / f"{name}.safetensors").is_file():
                raise FileNotFoundError(f"{out_dir / name}.safetensors: no such checkpoint (has train.py finished "
                                        f"that stage?)")
        video, _ = checkpoints.load_model(out_dir / "video.safetensors", VideoDiT, VideoDiTConfig, device)
        decoder, meta = checkpoints.load_model(out_dir / "action.safetensors", ActionDecoder, ActionDecoderConfig,
                                               device)
        return cls(video, decoder, meta["run"], **overrides), meta


def bench(policy, frames, instructions, proprio, repeats=5):
    """Median latency of one replan, split into the video pass (steps 1-3) and the action integration (step 4)."""
    video_s, action_s = [], []
    for _ in range(repeats + 1):   # the first call warms caches
        t0 = time.perf_counter()
        states, _ = policy.plan(frames, instructions)
        t1 = time.perf_counter()
        p = policy.proprio_norm(torch.as_tensor(np.asarray(proprio), dtype=torch.float32)).to(policy.device)
        policy.decoder.sample(states, policy.tau_v, p, policy.action_steps, policy.generator, policy.action_temperature)
        t2 = time.perf_counter()
        video_s.append(t1 - t0), action_s.append(t2 - t1)
    return float(np.median(video_s[1:])), float(np.median(action_s[1:]))


def main(argv=None):
    import world
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/world", help="the train.py run directory (video and action checkpoints)")
    p.add_argument("--episodes", type=int, default=25, help="held-out episodes per task")
    p.add_argument("--tau-v", type=float, default=None, help="video flow time to stop at (1: no video steps)")
    p.add_argument("--video-steps", type=int, default=None, help="Euler steps from 1 to tau_v when tau_v < 1")
    p.add_argument("--stop-after-step", type=int, default=None, help="instead of --tau-v / --video-steps, the "
                   "release's: stop after step s of the 35-step Karras schedule (0: one pass at sigma = 80)")
    p.add_argument("--k", type=int, default=None, help="video block whose states the decoder reads (default: "
                   "the one it was trained on; another k is only meaningful for a decoder trained on it)")
    p.add_argument("--action-steps", type=int, default=None, help="Euler steps of the action flow")
    p.add_argument("--action-temperature", type=float, default=None, help="the action flow starts from eps ~ "
                   "N(0, T^2 I) (default: the run's; 1 the paper's, 0 from eps = 0)")
    p.add_argument("--replan", type=int, default=None, help="actions executed per chunk before replanning")
    p.add_argument("--seed", type=int, default=0, help="seed of the policy's noise (train.py's own evaluation uses "
                   "the run's --seed)")
    p.add_argument("--gif", default=None, help="write a GIF of one rollout per task, with the visual plan")
    p.add_argument("--bench", action="store_true", help="print the latency of one replan and exit")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    try:
        policy, meta = VAMPolicy.load(args.out, args.device, tau_v=args.tau_v, k=args.k, video_steps=args.video_steps,
                                      action_steps=args.action_steps, action_temperature=args.action_temperature,
                                      stop_after_step=args.stop_after_step, seed=args.seed)
    except (OSError, ValueError) as e:
        raise SystemExit(str(e)) from None
    run = meta["run"]
    if policy.k != run["k"]:
        print(f"note: the decoder was trained on layer {run['k']}; reading layer {policy.k} instead")
    replan = run["replan"] if args.replan is None else args.replan
    if not 1 <= replan <= policy.decoder.cfg.H_a:
        raise SystemExit(f"--replan must lie in 1 .. {policy.decoder.cfg.H_a} (the chunk), got {replan}")
    if not run.get("tasks"):
        raise SystemExit(f"{args.out} was trained on a dataset without a built-in world environment: evaluate it in "
                         f"its own environment with evaluation.evaluate (its docstring gives the interface)")
    cfg = world.WorldConfig(**run["world_config"])
    if args.bench:
        env = world.World(run["tasks"][0], cfg)
        obs, _ = env.reset(world.EVAL_SEED_BASE)
        frames = np.stack([obs["frame"]] * policy.spec.history)[None]
        video_s, action_s = bench(policy, frames, [obs["instruction"]], obs["proprio"][None])
        print(f"one replan (batch 1, {args.device}, {torch.get_num_threads()} threads): video pass "
              f"{video_s * 1e3:.1f} ms (tau_v = {policy.tau_v}, {policy.video_steps} video steps, blocks 0..{policy.k})"
              f" + action integration {action_s * 1e3:.1f} ms ({policy.action_steps} steps) = "
              f"{(video_s + action_s) * 1e3:.1f} ms")
        return
    start = time.perf_counter()
    result = world.evaluate(policy, run["tasks"], args.episodes, cfg, gif_path=args.gif,
                            imagine=policy.imagine if args.gif else None, replan_every=replan,
                            history=policy.spec.history, history_stride=policy.spec.history_stride)
    print(result.summary())
    print(f"({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
