"""Evaluation of a chunking policy: in closed loop in any environment (lockstep rollouts, per-task success with Wilson
intervals, a GIF of chosen episodes beside the policy's plans), or, without one, by its action error on held-out
episodes of a dataset; and a video model by its one-step prediction of the future.

The environment interface (world.World follows it; another simulator needs a thin wrapper):
    env.reset(seed) -> (obs, info)                  a new episode, its scene drawn from `seed` alone
    env.step(action) -> (obs, reward, terminated, truncated, info)      Gymnasium's order; info["success"]: bool
    obs = {"frame": (H, W, C) uint8, "proprio": (P,) float, "instruction": str}
The policy interface (sample.VAMPolicy follows it):
    policy.act_batch(frames (N, H_o, H, W, C) uint8, instructions [N], proprio (N, P)) -> chunks (N, >= r, A),
    or else policy.act(frames (H_o, H, W, C), instruction, proprio (P,)) -> (>= r, A). A privileged policy, one that
    reads the simulator's state (world.ExpertPolicy), is first handed the environments: policy.bind(envs).
The H_o frames a policy sees are the last ones, history_stride steps apart, the first frame repeated before the
episode's start: data.history_indices, the same rule data.Windows trains with.

Not here: any environment (world.py), any model (sample.py turns a trained run into a policy).
"""
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

import data
import latent_data

# ----------------------------------------------------------------------------- rollouts


def rollout(policy, envs, seeds, replan_every=4, history=1, history_stride=1, record=()):
    """One episode in each environment, all in lockstep: every `replan_every` steps the policy plans a chunk for
    all unfinished episodes at once, and each executes its chunk's first `replan_every` actions.

    Returns per environment {"success", "steps"}, plus, for the environments listed in `record`, "frames",
    "instruction", "plans" (for each step, the proprio and the rest of the chunk in force) and "contexts" (the
    history frames of each replan).
    """
    if hasattr(policy, "bind"):
        policy.bind(envs)
    episodes = [_Episode(env, seed, i in record) for i, (env, seed) in enumerate(zip(envs, seeds))]
    while not all(ep.done for ep in episodes):
        active = [ep for ep in episodes if not ep.done]
        frames = np.stack([ep.history(history, history_stride) for ep in active])
        proprio = np.stack([ep.proprio for ep in active])
        chunks = _plan(policy, frames, [ep.instruction for ep in active], proprio)
        if chunks.ndim != 3 or chunks.shape[0] != len(active) or chunks.shape[1] < replan_every:
            raise ValueError(f"the policy returned chunks of shape {chunks.shape}; expected ({len(active)}, "
                             f">= {replan_every} (replan_every), action_dim)")
        for ep, context, chunk in zip(active, frames, chunks):
            ep.execute(chunk, replan_every, context)
    return [ep.result() for ep in episodes]


class _Episode:
    """One environment's episode in a rollout: its frames so far, and what happened."""

    def __init__(self, env, seed, recorded):
        self.env, self.recorded = env, recorded
        obs, _ = env.reset(seed)
        self.frames, self.proprio, self.instruction = [obs["frame"]], obs["proprio"], obs["instruction"]
        self.success, self.done, self.plans, self.contexts = False, False, [], []

    def history(self, history, stride):
        return np.stack([self.frames[j] for j in data.history_indices(len(self.frames) - 1, history, stride)])

    def execute(self, chunk, replan_every, context):
        """Run the chunk's first replan_every actions (a recorded episode keeps its context frames and plans)."""
        if self.recorded:
            self.contexts.append(context)
        for k, action in enumerate(chunk[:replan_every]):
            if self.recorded:
                self.plans.append((self.proprio, chunk[k:]))
            obs, _, terminated, truncated, info = self.env.step(action)
            self.frames.append(obs["frame"])
            self.proprio, self.success = obs["proprio"], bool(info["success"])
            if terminated or truncated:
                self.done = True
                return

    def result(self):
        r = {"success": self.success, "steps": len(self.frames) - 1}
        if self.recorded:
            r.update(frames=self.frames, instruction=self.instruction, plans=self.plans, contexts=self.contexts)
        return r


def _plan(policy, frames, instructions, proprio):
    if hasattr(policy, "act_batch"):
        return np.asarray(policy.act_batch(frames, instructions, proprio), dtype=np.float64)
    return np.stack([np.asarray(policy.act(f, s, p), dtype=np.float64)
                     for f, s, p in zip(frames, instructions, proprio)])

# ----------------------------------------------------------------------------- success rates


def wilson_interval(successes, n, z=1.96):
    """The Wilson score interval of a success rate (95% for z = 1.96): unlike p +- z sqrt(p (1 - p) / n) it stays
    inside [0, 1] and is not empty at 0 or n successes.

        center = (p + z^2 / 2n) / (1 + z^2 / n),   half = z sqrt(p (1 - p) / n + z^2 / 4n^2) / (1 + z^2 / n)
    """
    if n == 0:
        return 0.0, 1.0
    p, zz = successes / n, z * z
    center = (p + zz / (2 * n)) / (1 + zz / n)
    half = z * math.sqrt(p * (1 - p) / n + zz / (4 * n * n)) / (1 + zz / n)
    return max(0.0, center - half), min(1.0, center + half)


@dataclass
class EvalResult:
    successes: dict    # task -> successful episodes
    episodes: dict     # task -> episodes run
    mean_steps: dict   # task -> mean episode length (control steps)

    @property
    def mean(self):
        """Success over all episodes; with equal episodes per task, the mean of the per-task rates."""
        return sum(self.successes.values()) / sum(self.episodes.values())

    @property
    def interval(self):
        return wilson_interval(sum(self.successes.values()), sum(self.episodes.values()))

    def summary(self):
        lines = []
        for task, n in self.episodes.items():
            k = self.successes[task]
            lo, hi = wilson_interval(k, n)
            lines.append(f"{task:22s} {k:4d}/{n:<4d} = {k / n:6.1%}  95% CI [{lo:.1%}, {hi:.1%}]  "
                         f"mean length {self.mean_steps[task]:.1f}")
        lo, hi = self.interval
        lines.append(f"{'mean':22s} {sum(self.successes.values()):4d}/{sum(self.episodes.values()):<4d} = "
                     f"{self.mean:6.1%}  95% CI [{lo:.1%}, {hi:.1%}]")
        return "\n".join(lines)

    def to_json(self):
        return {"mean": self.mean, "interval": list(self.interval), "episodes": sum(self.episodes.values()),
                "tasks": {t: {"successes": self.successes[t], "episodes": n, "rate": self.successes[t] / n,
                              "interval": list(wilson_interval(self.successes[t], n)),
                              "mean_steps": self.mean_steps[t]} for t, n in self.episodes.items()}}


def evaluate(policy, make_env, tasks, episodes_per_task, *, seed_base, replan_every=4, history=1, history_stride=1,
             gif_path=None, gif_tasks=4, imagine=None, overlay=None):
    """Closed-loop success of `policy` on `episodes_per_task` scenes of each task (seeds seed_base, seed_base + 1,
    ...), every episode of every task in one lockstep batch; make_env(task) -> a new environment.

    Optionally writes a GIF of the first episode of each of the first `gif_tasks` tasks (see save_gif); with
    imagine(frames (N, H_o, H, W, C), instructions) -> future frames (N, F, H, W, C), each replan's imagined future
    is shown under its episode (a video model's "visual plan")."""
    names = [t for t in tasks for _ in range(episodes_per_task)]
    seeds = [seed_base + j for _ in tasks for j in range(episodes_per_task)]
    record = [k * episodes_per_task for k in range(min(gif_tasks, len(tasks)))] if gif_path else []
    results = rollout(policy, [make_env(t) for t in names], seeds, replan_every, history, history_stride, record)
    if gif_path:
        episodes = [results[i] for i in record]
        if imagine is not None:
            for ep in episodes:
                ep["imagined"] = imagine(np.stack(ep["contexts"]), [ep["instruction"]] * len(ep["contexts"]))
        save_gif(gif_path, episodes, replan_every=replan_every, overlay=overlay)
    by_task = {t: [r for n, r in zip(names, results) if n == t] for t in tasks}
    return EvalResult({t: int(sum(r["success"] for r in rs)) for t, rs in by_task.items()},
                      {t: len(rs) for t, rs in by_task.items()},
                      {t: float(np.mean([r["steps"] for r in rs])) for t, rs in by_task.items()})

# ----------------------------------------------------------------------------- without an environment


def held_out_error(policy, dataset, spec, episodes, max_windows=512, with_future=False):
    """Mean squared error of sampled chunks against the recorded ones on held-out episodes, in normalised units.
    A pre-encoded dataset (latent_data.py) is read as encoded: the policy gets its context latents and text states.
    with_future: the policy reads each window's recorded future as well (experiments.OraclePolicy.act_on_future)."""
    latent = isinstance(dataset, latent_data.LatentDataset)
    windows = latent_data.LatentWindows(dataset, episodes) if latent else \
        data.Windows(dataset, spec, policy.text_encoder, episodes)
    ids = np.linspace(0, len(windows) - 1, min(max_windows, len(windows))).astype(int)
    errs = []
    for chunk in np.array_split(ids, max(1, len(ids) // 64)):
        b = windows.batch(chunk)
        instructions = [dataset.instructions[e] for e in b["episode"]]
        if with_future:
            pred = policy.act_on_future(b["frames"].numpy(), instructions, b["proprio"].numpy())
        elif latent:
            pred = policy.act_encoded(b["latents"][:, :, :policy.n_cond], b["text"], b["proprio"])
        else:
            pred = policy.act_batch(b["frames"][:, :spec.history].numpy(), instructions, b["proprio"].numpy())
        errs.append(((policy.action_norm(torch.as_tensor(pred)) - policy.action_norm(b["actions"])) ** 2)
                    .mean(dim=(1, 2)).numpy())
    return float(np.concatenate(errs).mean())


@torch.no_grad()
def video_prediction_error(video, windows, tokenizer, n_cond, device="cpu", max_windows=256, batch_size=32, seed=0):
    """How well a video model predicts the future, on up to max_windows evenly spaced windows (data.Windows, or
    latent_data.LatentWindows with tokenizer None): the mean squared error of its one-step prediction from pure
    noise, x0_hat = eps - v(eps, tau = 1) (the mean future given the context and the instruction), against the true
    future latents; beside it, for scale, the error of predicting that nothing moves (every future latent frame =
    the last context one)."""
    g = torch.Generator().manual_seed(seed)
    ids = np.linspace(0, len(windows) - 1, min(max_windows, len(windows))).astype(int)
    model_err, still_err = [], []
    for chunk in np.array_split(ids, max(1, len(ids) // batch_size)):
        b = windows.batch(chunk)
        x0 = latent_data.clean_latents(b, tokenizer).to(device)
        eps = torch.randn(x0.shape, generator=g).to(device, x0.dtype)
        x0_hat = eps - video.video2world_velocity(eps, torch.ones(len(x0), device=device), b["text"].to(device), x0,
                                                  n_cond)
        future = x0[:, :, n_cond:].float()
        model_err.append((x0_hat[:, :, n_cond:].float() - future).pow(2).mean(dim=(1, 2, 3, 4)))
        still_err.append((x0[:, :, n_cond - 1:n_cond].float() - future).pow(2).mean(dim=(1, 2, 3, 4)))
    return {"windows": len(ids), "one_step_mse": torch.cat(model_err).mean().item(),
            "nothing_moves_mse": torch.cat(still_err).mean().item()}

# ----------------------------------------------------------------------------- GIFs


def save_gif(path, episodes, replan_every=4, overlay=None, scale=8, ms_per_step=120):
    """Recorded episodes side by side, frames scaled up, a green or red border once an episode has succeeded or
    failed. Optionally, under each episode, the imagined future of the plan in force ("imagined": per replan
    (F, H, W, C) frames), and over it the plan itself: overlay(draw, proprio, chunk, width, top) draws the rest of
    the chunk on the frame drawn at (0, top) with that width (world.draw_plan draws the gripper's path). Frames may
    be wider than high (LIBERO's two cameras side by side)."""
    height, width = (n * scale for n in episodes[0]["frames"][0].shape[:2])
    caption = 14
    strip = width // len(episodes[0]["imagined"][0]) if "imagined" in episodes[0] else 0   # F future frames
    length = max(len(ep["frames"]) for ep in episodes) + 5      # hold the end a moment
    images = []
    for t in range(length):
        canvas = Image.new("RGB", (width * len(episodes), height + caption + strip))
        for n, ep in enumerate(episodes):
            canvas.paste(_tile(ep, t, (width, height), caption, strip, replan_every, overlay), (n * width, 0))
        images.append(canvas)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    images[0].save(path, save_all=True, append_images=images[1:], duration=ms_per_step, loop=0)


def _tile(ep, t, size, caption, strip, replan_every, overlay):
    """One episode at step t, drawn `size` = (width, height): its instruction, its frame (with the plan over it),
    the imagined future below."""
    width, height = size
    tile = Image.new("RGB", (width, height + caption + strip))
    planning = t < len(ep["plans"])
    if strip and planning:
        for j, future in enumerate(ep["imagined"][t // replan_every]):
            tile.paste(_image(future).resize((strip, strip), Image.NEAREST), (j * strip, height + caption))
    frame = ep["frames"][min(t, len(ep["frames"]) - 1)]
    tile.paste(_image(frame).resize(size, Image.NEAREST), (0, caption))
    draw = ImageDraw.Draw(tile)
    draw.text((2, 1), ep["instruction"], fill=(255, 255, 255))
    if planning and overlay is not None:
        overlay(draw, *ep["plans"][t], width, caption)
    elif not planning and t >= len(ep["frames"]) - 1:
        draw.rectangle([0, caption, width - 1, height + caption - 1], outline=(0, 255, 0) if ep["success"]
                       else (255, 0, 0), width=3)
    return tile


def _image(frame):
    """An (H, W, C) uint8 frame as an RGB image (C = 1: grey)."""
    return Image.fromarray(frame[..., 0] if frame.shape[-1] == 1 else frame).convert("RGB")
