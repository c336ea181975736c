"""The paper's findings, reproduced in the built-in world: one command per finding. Each trains what it needs on top
of a finished `python train.py` run (its stage-1 video model and its dataset), evaluates in closed loop on held-out
scenes, writes a JSON of every number and a PNG plot to --out, and prints a table.

    python experiments.py oracle --base out/world --out out/experiments

A point of an experiment is a train.py run folder of its own under --out (the base's video checkpoint copied in,
stage 2 trained with `train.py --resume`), so a killed experiment resumes where it stopped and a finished point is
never trained again.

  oracle  The paper: decoding actions from the ground-truth future's latents is near perfect. Here: one decoder,
          trained at a fixed tau_v on the base's video model (its states cached, feature_cache.py), evaluated twice:
          reading the video model's states on its own prediction (video flow integrated 1 -> tau_v) and on the
          ground-truth future noised to tau_v, the future the scripted expert makes from a copy of the world at every
          replan (OraclePolicy). Beside them, the base run's own result (its decoder at tau_v = 1).

Not here: training (train.py), the policy and its inference (sample.py), the evaluation harness (evaluation.py).
"""
import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

import expert
import flow
import train
import world
from sample import VAMPolicy

# ----------------------------------------------------------------------------- the oracle's policy


class OraclePolicy(VAMPolicy):
    """A VAMPolicy whose decoder reads the video model's layer-k states on the ground-truth future instead of its
    prediction: at each replan the scripted expert plays on a copy of each world (expert.ExpertPolicy, bound to the
    worlds by the rollout), and the frames it renders at t + s, t + 2s, ... (s the window's future stride) are
    encoded with the history, their latents noised to tau_v and run through blocks 0..k. Privileged: it needs the
    worlds themselves, so it runs only in the built-in world."""

    def bind(self, worlds):
        self.expert = expert.ExpertPolicy(horizon=self.spec.future_stride * self.spec.future)
        self.expert.bind(worlds)

    def future_frames(self, frames, instructions, proprio):
        """(N, F, H, W, C) uint8: the frames the expert's next actions (kept in expert_chunks) produce at the
        window's future steps."""
        self.expert_chunks = self.expert.act_batch(frames, instructions, proprio)
        return self.expert.ahead[:, self.spec.future_stride - 1::self.spec.future_stride]

    @torch.no_grad()
    def act_batch(self, frames, instructions, proprio):
        proprio = self._check_proprio(proprio, len(frames))
        clip = np.concatenate([np.asarray(frames), self.future_frames(frames, instructions, proprio)], axis=1)
        x0 = self.tokenizer.encode(torch.as_tensor(clip)).to(self.device)             # (N, C, T_lat, h, w)
        text = self.text_encoder(list(instructions)).to(self.device)
        eps = torch.randn(x0.shape, generator=self.generator).to(self.device)
        tau_v = torch.full((len(x0),), self.tau_v, device=self.device)
        states = self.video.video2world_hidden_states(flow.interpolate(x0, eps, tau_v), tau_v, text, x0, self.n_cond,
                                                      self.k)
        actions = self.decoder.sample(states, self.tau_v, self.proprio_norm(proprio).to(self.device),
                                      self.action_steps, self.generator)
        return self.action_norm.inverse(actions.float().cpu()).numpy()

# ----------------------------------------------------------------------------- points: train.py runs on the base


def base_config(base):
    """The finished train.py run's configuration (its results.json)."""
    path = Path(base) / "results.json"
    if not path.is_file() or not (Path(base) / "video.safetensors").is_file():
        raise SystemExit(f"--base {base}: not a finished train.py run (needs its results.json and video.safetensors)")
    cfg = json.loads(path.read_text())["config"]
    if cfg["data"]:
        raise SystemExit(f"--base {base} was trained on --data {cfg['data']}: the experiments need the built-in world")
    return cfg


def as_args(cfg, prefix=""):
    """A configuration dict (dataclasses.asdict of config.Config) as train.py flags."""
    args = []
    for name, value in cfg.items():
        if isinstance(value, dict):
            args += as_args(value, f"{prefix}{name}.")
        else:
            args += [f"--{prefix}{name}", str(value)]
    return args


def train_point(base, out, name, **overrides):
    """The point `name`: stage 2 (and evaluation) of train.py on a copy of the base's video model, with the base's
    configuration and `overrides` ({"action.tau_v": "0.4", ...}); returns its folder. Resumes an unfinished point."""
    cfg, point = base_config(base), Path(out) / name
    if not (point / "results.json").is_file():
        point.mkdir(parents=True, exist_ok=True)
        if not (point / "video.safetensors").is_file():
            shutil.copyfile(Path(base) / "video.safetensors", point / "video.safetensors")
        flags = {**dict(zip(as_args(cfg)[::2], as_args(cfg)[1::2])), "--out": str(point), "--eval.gif": "false",
                 **{f"--{k}": str(v) for k, v in overrides.items()}}
        print(f"[{name}] train.py {' '.join(f'{k} {v}' for k, v in flags.items() if k[2:] in overrides)}", flush=True)
        train.main([*sum(flags.items(), ()), "--resume"])
    return point


def evaluated(point, name, policy_class, episodes):
    """Closed-loop success of the point's models under policy_class, kept in point/{name}.json once measured."""
    path = Path(point) / f"{name}.json"
    if not path.is_file():
        policy, meta = policy_class.load(point)
        run = meta["run"]
        result = world.evaluate(policy, run["tasks"], episodes, world.WorldConfig(**run["world_config"]),
                                replan_every=run["replan"], history=policy.spec.history,
                                history_stride=policy.spec.history_stride)
        print(f"[{Path(point).name}: {name}]\n{result.summary()}", flush=True)
        path.write_text(json.dumps(result.to_json(), indent=1))
    return json.loads(path.read_text())

# ----------------------------------------------------------------------------- the experiments


def oracle(args):
    point = train_point(args.base, args.out, f"tau_v{args.tau_v:g}", **{"action.tau_v": args.tau_v,
                                                                       "action.cache": args.cache,
                                                                       "eval.tau_v": args.tau_v})
    episodes = base_config(args.base)["eval"]["episodes"]
    rows = {"base run: its decoder at tau_v = 1, the video model's prediction": json.loads(
                (Path(args.base) / "results.json").read_text()),
            f"decoder at tau_v = {args.tau_v:g}, the video model's prediction (1 -> {args.tau_v:g})": json.loads(
                (point / "results.json").read_text()),
            f"decoder at tau_v = {args.tau_v:g}, the ground-truth future (oracle)": evaluated(
                point, "oracle", OraclePolicy, episodes)}
    return rows, "the paper: decoding from the ground-truth future's latents is near perfect"


EXPERIMENTS = {"oracle": oracle}


def report(out, name, rows, claim):
    """Print the table, write {out}/{name}.json and {out}/{name}.png."""
    out = Path(out)
    print(f"\n{name}: {claim}\n" + "\n".join(
        f"  {r['mean']:6.1%} [{r['interval'][0]:.1%}, {r['interval'][1]:.1%}] over {r['episodes']:3d} episodes  {label}"
        for label, r in rows.items()))
    (out / f"{name}.json").write_text(json.dumps({"claim": claim, "rows": rows}, indent=1))
    plot(out / f"{name}.png", f"{name}: {claim}", list(rows), [(r["mean"], *r["interval"]) for r in rows.values()])
    print(f"written: {out / name}.json, {out / name}.png")


def plot(path, title, labels, points, width=720, row=28):
    """A horizontal chart of success rates: one row per label, a dot at the mean and a bar over its 95% interval,
    on a 0-100% axis."""
    left, right, top = 12, 150, 34
    image = Image.new("RGB", (width, top + row * len(labels) + 30), "white")
    draw = ImageDraw.Draw(image)
    draw.text((left, 8), title[:110], fill="black")
    x = lambda p: right + p * (width - right - 20)   # noqa: E731
    for tick in np.linspace(0, 1, 6):
        draw.line([x(tick), top, x(tick), top + row * len(labels)], fill=(220, 220, 220))
        draw.text((x(tick) - 10, top + row * len(labels) + 6), f"{tick:.0%}", fill="black")
    for i, (label, (mean, lo, hi)) in enumerate(zip(labels, points)):
        y = top + row * i + row / 2
        draw.text((left, y - 6), label[:22], fill="black")
        draw.line([x(lo), y, x(hi), y], fill=(60, 90, 200), width=3)
        draw.ellipse([x(mean) - 4, y - 4, x(mean) + 4, y + 4], fill=(200, 40, 40))
    image.save(path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", choices=sorted(EXPERIMENTS))
    p.add_argument("--base", default="out/world", help="a finished `python train.py` run in the built-in world")
    p.add_argument("--out", default="out/experiments", help="folder of the experiments' points, JSONs and plots")
    p.add_argument("--tau_v", type=float, default=0.4, help="oracle: the tau_v its decoder is trained and run at "
                   "(the paper: action reconstruction from noisy ground-truth latents is best near 0.4)")
    p.add_argument("--cache", type=int, default=2, help="noise draws of the decoder's cached video states "
                   "(--action.cache)")
    args = p.parse_args(argv)
    if not 0 < args.tau_v <= 1:
        raise SystemExit(f"--tau_v must lie in (0, 1], got {args.tau_v}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    rows, claim = EXPERIMENTS[args.experiment](args)
    report(args.out, args.experiment, rows, claim)


if __name__ == "__main__":
    main()
