"""Inference: a trained Video-Action Model as a policy, and a CLI that rolls it out in the built-in world.

One replan (the paper's inference, Sec. "Inference" of ../shared/reference/mimic-video-method.md):
  1. encode the H_o history frames into clean context latents, the instruction into text states;
  2. put noise on the F future latent frames and integrate the video flow from tau = 1 to tau_v
     (Euler, `video_steps` steps; tau_v = 1, the default, is zero steps);
  3. run blocks 0..k of the video model once on that partially denoised video: the layer-k states are the plan;
  4. integrate the action flow from tau_a = 1 to 0 (10 Euler steps), the decoder cross-attending to the plan
     (its keys and values computed once per replan).

    python sample.py --out out/world                      # evaluate the run in out/world, 25 episodes per task
    python sample.py --out out/world --gif plan.gif       # rollouts with the planned actions and the visual plan
    python sample.py --out out/world --bench              # latency of one replan: video pass vs action integration
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import data
import flow
from action_decoder import ActionDecoder, ActionDecoderConfig
from video_model import VideoDiT, VideoDiTConfig


class Normalizer:
    """Maps each dimension's [low, high] range (from the dataset's manifest) onto [-1, 1] and back."""

    def __init__(self, ranges):
        r = torch.tensor(ranges, dtype=torch.float32)   # (dims, 2)
        self.low, self.span = r[:, 0], (r[:, 1] - r[:, 0]).clamp(min=1e-8)

    def __call__(self, x):
        return 2 * (x - self.low) / self.span - 1

    def inverse(self, y):
        return (y + 1) / 2 * self.span + self.low


class VAMPolicy:
    """act_batch(frames (N, H_o, H, W, C) uint8, instructions [N], proprio (N, P)) -> action chunks (N, H_a, A).

    Any harness that can hand over the last H_o camera frames, the instruction and the proprioception can call it
    (the built-in world's evaluator does, via act_batch; act() serves one episode at a time).
    """

    def __init__(self, video, decoder, spec, stats, *, k, tau_v=1.0, video_steps=10, action_steps=10,
                 tokenizer_factor=2, text_length=16, seed=0):
        if not 0 < tau_v <= 1:
            raise ValueError(f"tau_v must lie in (0, 1], got {tau_v}")
        self.video, self.decoder = video.eval(), decoder.eval()
        self.spec, self.k, self.tau_v = spec, k, tau_v
        self.video_steps = 0 if tau_v == 1 else video_steps   # 1 -> 1 integrates nothing
        self.action_steps = action_steps
        self.tokenizer = data.SpaceToDepth(tokenizer_factor)
        self.text_encoder = data.TextEncoder(text_length, video.cfg.text_dim)
        self.proprio_norm, self.action_norm = Normalizer(stats["proprio_range"]), Normalizer(stats["action_range"])
        self.generator = torch.Generator().manual_seed(seed)
        self.device = next(decoder.parameters()).device

    @torch.no_grad()
    def plan(self, frames, instructions):
        """Steps 1-3: the layer-k video states (N, T*h*w, width) and the partially denoised latents x_tau_v."""
        context = self.tokenizer.encode(torch.as_tensor(np.asarray(frames))).to(self.device)   # (N, C, H_o, h, w)
        text = self.text_encoder(list(instructions)).to(self.device)
        N, C, H_o, h, w = context.shape
        noise = torch.randn((N, C, H_o + self.spec.future, h, w), generator=self.generator).to(self.device)
        velocity = lambda x, tau: self.video.video2world_velocity(x, tau, text, context, H_o)   # noqa: E731
        x = flow.euler(velocity, noise, 1.0, self.tau_v, self.video_steps)
        return self.video.video2world_hidden_states(x, self.tau_v, text, context, H_o, self.k), x

    @torch.no_grad()
    def act_batch(self, frames, instructions, proprio):
        states, _ = self.plan(frames, instructions)
        proprio = self.proprio_norm(torch.as_tensor(np.asarray(proprio), dtype=torch.float32)).to(self.device)
        actions = self.decoder.sample(states, self.tau_v, proprio, self.action_steps, self.generator)
        return self.action_norm.inverse(actions.float().cpu()).numpy()

    def act(self, frames, instruction, proprio):
        return self.act_batch(np.asarray(frames)[None], [instruction], np.asarray(proprio)[None])[0]

    @torch.no_grad()
    def imagine(self, frames, instructions, steps=20):
        """The video model's fully denoised future (1 -> 0), decoded to frames (N, F, H, W, C) uint8: what the
        visual plan would look like if the flow were integrated all the way."""
        context = self.tokenizer.encode(torch.as_tensor(np.asarray(frames))).to(self.device)
        text = self.text_encoder(list(instructions)).to(self.device)
        N, C, H_o, h, w = context.shape
        noise = torch.randn((N, C, H_o + self.spec.future, h, w), generator=self.generator).to(self.device)
        velocity = lambda x, tau: self.video.video2world_velocity(x, tau, text, context, H_o)   # noqa: E731
        x0 = flow.euler(velocity, noise, 1.0, 0.0, steps)
        return self.tokenizer.decode(x0[:, :, H_o:].clamp(-1, 1).cpu()).numpy()

    @classmethod
    def load(cls, out_dir, device="cpu", **overrides):
        """The policy of a finished train.py run: its video model and action decoder checkpoints in out_dir."""
        out_dir = Path(out_dir)
        video, video_meta = load_model(out_dir / "video.safetensors", VideoDiT, VideoDiTConfig, device)
        decoder, meta = load_model(out_dir / "action.safetensors", ActionDecoder, ActionDecoderConfig, device)
        run = meta["run"]
        spec = data.WindowSpec(**run["window"])
        kwargs = dict(k=run["k"], tokenizer_factor=run["tokenizer_factor"], text_length=run["text_length"],
                      tau_v=run["tau_v"], action_steps=run["action_steps"])
        kwargs.update({key: v for key, v in overrides.items() if v is not None})
        return cls(video, decoder, spec, meta["stats"], **kwargs), meta


def load_model(path, model_class, config_class, device="cpu"):
    """A model written by train.py's save_model: weights plus, in the safetensors metadata, its config and the run's."""
    from safetensors import SafetensorError, safe_open
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint (has train.py finished this stage?)")
    try:
        with safe_open(path, "pt") as f:
            meta = json.loads((f.metadata() or {}).get("mimic_video", "null"))
            if meta is None:
                raise ValueError(f"{path}: not a train.py checkpoint (no 'mimic_video' metadata)")
            state = {name: f.get_tensor(name).clone() for name in f.keys()}
    except SafetensorError as e:
        raise ValueError(f"{path}: not a valid safetensors file (truncated, or another format): {e}") from None
    cfg = config_class(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["model_config"].items()})
    model = model_class(cfg)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not fit the config stored with them: {e}") from None
    return model.to(device), meta


def bench(policy, frames, instructions, proprio, repeats=5):
    """Median latency of one replan, split into the video pass (steps 1-3) and the action integration (step 4)."""
    video_s, action_s = [], []
    for _ in range(repeats + 1):   # the first call warms caches
        t0 = time.perf_counter()
        states, _ = policy.plan(frames, instructions)
        t1 = time.perf_counter()
        p = policy.proprio_norm(torch.as_tensor(np.asarray(proprio), dtype=torch.float32)).to(policy.device)
        policy.decoder.sample(states, policy.tau_v, p, policy.action_steps, policy.generator)
        t2 = time.perf_counter()
        video_s.append(t1 - t0), action_s.append(t2 - t1)
    return float(np.median(video_s[1:])), float(np.median(action_s[1:]))


def main(argv=None):
    import world
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/world", help="the train.py run directory (video and action checkpoints)")
    p.add_argument("--episodes", type=int, default=25, help="held-out episodes per task")
    p.add_argument("--tau-v", type=float, default=None, help="video flow time to stop at (1: no video steps)")
    p.add_argument("--video-steps", type=int, default=10, help="Euler steps from 1 to tau_v when tau_v < 1")
    p.add_argument("--k", type=int, default=None, help="video block whose states the decoder reads (default: "
                   "the one it was trained on; another k is only meaningful for a decoder trained on it)")
    p.add_argument("--action-steps", type=int, default=None, help="Euler steps of the action flow")
    p.add_argument("--replan", type=int, default=None, help="actions executed per chunk before replanning")
    p.add_argument("--gif", default=None, help="write a GIF of one rollout per task, with the visual plan")
    p.add_argument("--bench", action="store_true", help="print the latency of one replan and exit")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    policy, meta = VAMPolicy.load(args.out, args.device, tau_v=args.tau_v, k=args.k, action_steps=args.action_steps,
                                  video_steps=args.video_steps)
    run = meta["run"]
    if policy.k != run["k"]:
        print(f"note: the decoder was trained on layer {run['k']}; reading layer {policy.k} instead")
    replan = args.replan or run["replan"]
    tasks = run.get("tasks")
    if not tasks:
        raise SystemExit(f"{args.out} was trained on a dataset without a built-in world environment; "
                         f"train.py reported its held-out action error instead")
    cfg = world.WorldConfig(**run["world_config"])
    if args.bench:
        env = world.World(tasks[0], cfg)
        obs, _ = env.reset(world.EVAL_SEED_BASE)
        frames = np.stack([obs["frame"]] * policy.spec.history)[None]
        video_s, action_s = bench(policy, frames, [obs["instruction"]], obs["proprio"][None])
        print(f"one replan (batch 1, {args.device}, {torch.get_num_threads()} threads): video pass "
              f"{video_s * 1e3:.1f} ms (tau_v = {policy.tau_v}, {policy.video_steps} video steps, blocks 0..{policy.k})"
              f" + action integration {action_s * 1e3:.1f} ms ({policy.action_steps} steps) = "
              f"{(video_s + action_s) * 1e3:.1f} ms")
        return
    start = time.perf_counter()
    result = world.evaluate(policy, tasks, args.episodes, replan_every=replan, history=policy.spec.history,
                            history_stride=policy.spec.history_stride, config=cfg, gif_path=args.gif,
                            imagine=policy.imagine if args.gif else None)
    print(result.summary())
    print(f"({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
