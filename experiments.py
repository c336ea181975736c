"""The paper's findings, reproduced in the built-in world: one command per finding. Each trains what it needs on top
of a finished `python train.py` run (its stage-1 video model and its dataset), evaluates in closed loop on held-out
scenes, writes a JSON of every number and a PNG plot to --out, and prints a table.

    python experiments.py oracle --base out/world --out out/experiments
    python experiments.py tau_v --base out/world --out out/experiments
    python experiments.py data --base out/world --out out/experiments
    python experiments.py layer --base out/world --out out/experiments
    python experiments.py history --base out/world --out out/experiments

A point of an experiment is a train.py run folder of its own under --out: the base's video checkpoint copied in and
stage 2 trained by `train.py --resume`, or both stages where the finding needs another video model (layer,
history, the static-image control). So a killed experiment resumes where it stopped and a finished point is never
trained again.

  oracle  The paper: decoding actions from the ground-truth future's latents is near perfect. Here: one decoder,
          trained at a fixed tau_v on the base's video model (its states cached, feature_cache.py), evaluated twice:
          reading the video model's states on its own prediction (video flow integrated 1 -> tau_v) and on the
          ground-truth future noised to tau_v, the future the scripted expert makes from a copy of the world at every
          replan (OraclePolicy). Beside them, the base run's own result (its decoder at tau_v = 1).
  tau_v   The paper: the best policy is near tau_v = 1 (no video denoising), while the action error on noisy
          ground-truth latents is lowest near tau_v = 0.4. Here: one decoder trained on tau_v uniform in (0, 1] (the
          paper's way; the default trains at tau_v = 1 only; cached, one tau_v per window and draw), (a) its
          closed-loop success when the video flow is integrated 1 -> tau_v, for each tau_v of --tau_vs (0.02
          standing for 0, 0.2, ..., 1), and (b) its action error on fresh expert episodes when it reads the states
          of their recorded future noised to tau_v.
  data    The paper: the video-conditioned decoder needs a fraction of the action data. Here: decoders trained
          for the base's stage-2 steps on the first 1, 2, 5, 10, 25, 100 episodes of each task (--action.episodes;
          the video model saw every episode's video) and on all of them (with the base's --cache: the base run
          itself), their closed-loop success; against the same decoders, same steps, on the static-image control:
          the same DiT trained on the same videos to denoise the current (history) frames from the instruction
          alone, no future (train.py --video.static, a run of both stages with every episode labelled), its states
          read on the observed frames noised to --tau_v (the stand-in for the paper's VLM-conditioned baseline).
  layer   The paper: a middle layer k is best, the first and last clearly worse. Here: the base's own video model
          (--layers 0 or its depth), or one of --layers blocks trained anew with the base's other settings, and a
          decoder on each of its blocks with the same budget (the base's stage-2 steps; the base's own decoder for
          its k); success and the policy's action error on fresh expert episodes per k, as it acts.
  history The paper: 5 history frames beat 1. Here: H_o = 1, 2 and 4 history frames (--histories), both stages
          anew for each H_o but the base's own; success of each.

Not here: training (train.py), the policy and its inference (sample.py), the evaluation harness (evaluation.py).
"""
import argparse
import json
import os
import shutil
import textwrap
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

import config
import data
import evaluation
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

    def act_batch(self, frames, instructions, proprio):
        future = self.future_frames(frames, instructions, proprio)
        return self.act_on_future(np.concatenate([np.asarray(frames), future], axis=1), instructions, proprio)

    @torch.no_grad()
    def act_on_future(self, clip, instructions, proprio):
        """Action chunks from the video model's layer-k states on a whole window's frames (N, H_o + F, H, W, C),
        history and true future, their latents noised to tau_v."""
        proprio = self._check_proprio(proprio, len(clip))
        x0 = self.tokenizer.encode(torch.as_tensor(clip)).to(self.device)             # (N, C, T_lat, h, w)
        text = self.text_encoder(list(instructions)).to(self.device)
        eps = torch.randn(x0.shape, generator=self.generator).to(self.device)
        tau_v = torch.full((len(x0),), self.tau_v, device=self.device)
        states = self.video.video2world_hidden_states(flow.interpolate(x0, eps, tau_v), tau_v, text, x0, self.n_cond,
                                                      self.k)
        actions = self.decoder.sample(states, self.tau_v, self.proprio_norm(proprio).to(self.device),
                                      self.action_steps, self.generator, self.action_temperature)
        return self.action_norm.inverse(actions.float().cpu()).numpy()

# ----------------------------------------------------------------------------- points: train.py runs on the base


def base_config(base):
    """The finished train.py run's configuration (its results.json). A setting added to train.py after the run
    takes its plain default (config.Config's, e.g. --action.ema 0: none), not today's preset's."""
    path = Path(base) / "results.json"
    if not path.is_file() or not (Path(base) / "video.safetensors").is_file():
        raise SystemExit(f"--base {base}: not a finished train.py run (needs its results.json and video.safetensors)")
    cfg = json.loads(path.read_text())["config"]
    if cfg["data"]:
        raise SystemExit(f"--base {base} was trained on --data {cfg['data']}: the experiments need the built-in world")
    return with_defaults(cfg, asdict(config.Config()))


def with_defaults(cfg, defaults):
    """cfg (a nested dict) with the keys it lacks taken from defaults."""
    return {k: with_defaults(cfg.get(k, {}), v) if isinstance(v, dict) else cfg.get(k, v) for k, v in defaults.items()}


def as_flags(cfg, prefix=""):
    """A configuration dict (dataclasses.asdict of config.Config) as train.py flags: {"--section.field": value}."""
    flags = {}
    for name, value in cfg.items():
        if isinstance(value, dict):
            flags.update(as_flags(value, f"{prefix}{name}."))
        else:
            flags[f"--{prefix}{name}"] = str(value)
    return flags


def write_json(path, obj):
    """obj as JSON at path, atomically: a killed write leaves no half file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def kept(path, measure):
    """The JSON at path, measured by measure() and written the first time, read back afterwards."""
    path = Path(path)
    if not path.is_file():
        write_json(path, measure())
    return json.loads(path.read_text())


def train_point(base, out, name, stage_1=False, **overrides):
    """The point `name`: stage 2 (and evaluation) of train.py on a copy of the base's video model, or with stage_1
    both stages anew, with the base's configuration and `overrides` ({"action.tau_v": "0.4", ...}); returns its
    folder (named with the decoder budget where --steps set one). Resumes an unfinished point."""
    if "action.steps" in overrides:
        name = f"{name}-steps{overrides['action.steps']}"
    cfg, point = base_config(base), Path(out) / name
    if (point / "results.json").is_file():
        check_finished(point, overrides)
    else:
        point.mkdir(parents=True, exist_ok=True)
        if not stage_1 and not (point / "video.safetensors").is_file():
            shutil.copyfile(Path(base) / "video.safetensors", point / "video.safetensors")
        flags = {**as_flags(cfg), "--out": str(point), "--eval.gif": "false",
                 **{f"--{k}": str(v) for k, v in overrides.items()}}
        print(f"[{name}] train.py {' '.join(f'{k} {v}' for k, v in flags.items() if k[2:] in overrides)}", flush=True)
        train.main([*sum(flags.items(), ()), "--resume"])
    return point


def check_finished(point, overrides):
    """A finished point is reused only if it was trained with the overrides asked for now (a point is named by
    what varies across an experiment, not by every flag: the static control's --tau_v, say)."""
    done = base_config(point)   # a setting added after the point was trained takes its plain default
    for key, value in overrides.items():
        stored = done
        for part in key.split("."):
            stored = stored[part]
        try:
            same = float(value) == float(stored)
        except (TypeError, ValueError):
            same = str(value) == str(stored)
        if not same:
            raise SystemExit(f"{point} was trained with --{key} {stored}, this experiment asks for {value}: delete "
                             f"that folder to train it anew, or give another --out")


def evaluated(point, name, load, episodes):
    """Closed-loop success of the policy load() -> (policy, metadata) gives, kept in point/{name}.json once
    measured."""
    def measure():
        policy, meta = load()
        run = meta["run"]
        result = world.evaluate(policy, run["tasks"], episodes, world.WorldConfig(**run["world_config"]),
                                replan_every=run["replan"], history=policy.spec.history,
                                history_stride=policy.spec.history_stride)
        print(f"[{Path(point).name}: {name}]\n{result.summary()}", flush=True)
        return result.to_json()
    return kept(Path(point) / f"{name}.json", measure)


def fresh_episodes(out, per_task=25, seed=1000):
    """Expert episodes no run trained on (a seed no train.py run uses for its dataset), generated once in out."""
    root = Path(out) / f"fresh-episodes-{seed}"
    if not (root / data.MANIFEST).exists():
        expert.generate_dataset(root, episodes_per_task=per_task, seed=seed)
    return data.Dataset(root)


def policy_error(point, episodes, path, max_windows=256):
    """The point's policy's action error (normalised units) on fresh expert episodes, as it acts (its own video
    prediction); kept at path."""
    def measure():
        policy, _ = VAMPolicy.load(point, seed=0)
        return {"action_mse": evaluation.held_out_error(policy, episodes, policy.spec, np.arange(len(episodes)),
                                                        max_windows), "windows": max_windows}
    return kept(path, measure)["action_mse"]


def ground_truth_error(point, tau_v, episodes, max_windows=256):
    """The point's decoder's action error (normalised units) on fresh expert episodes, reading the video model's
    states on each window's recorded future noised to tau_v (no video prediction); kept in the point's folder."""
    def measure():
        policy, _ = OraclePolicy.load(point, tau_v=tau_v, seed=0)
        return {"tau_v": tau_v, "windows": max_windows,
                "action_mse": evaluation.held_out_error(policy, episodes, policy.spec, np.arange(len(episodes)),
                                                        max_windows, with_future=True)}
    return kept(Path(point) / f"ground_truth_error_tau_v{tau_v:g}.json", measure)["action_mse"]

# ----------------------------------------------------------------------------- the experiments


def budget(args):
    """The decoder budget of every point of an experiment: --steps where given, else the base's stage-2 steps."""
    return {"action.steps": args.steps} if args.steps else {}


def oracle(args):
    point = train_point(args.base, args.out, f"tau_v{args.tau_v:g}", **budget(args), **{"action.tau_v": args.tau_v,
                                                                       "action.cache": args.cache,
                                                                       "eval.tau_v": args.tau_v})
    episodes = base_config(args.base)["eval"]["episodes"]
    rows = {"base run (tau_v 1, predicted)": json.loads((Path(args.base) / "results.json").read_text()),
            f"tau_v {args.tau_v:g}, predicted future": json.loads((point / "results.json").read_text()),
            f"tau_v {args.tau_v:g}, true future (oracle)": evaluated(point, "oracle", lambda: OraclePolicy.load(point),
                                                                     episodes)}
    return rows, "the paper: decoding from the ground-truth future's latents is near perfect", None


TAU_VS = (0.02, 0.2, 0.4, 0.6, 0.8, 1.0)   # 0.02 stands for 0: the video model takes tau_v in (0, 1]


def tau_v(args):
    point = train_point(args.base, args.out, "tau_v-uniform", **budget(args),
                        **{"action.tau_v": "uniform", "action.cache": args.cache})
    episodes, fresh = base_config(args.base)["eval"]["episodes"], fresh_episodes(args.out)
    rows, errors = {}, {}
    for t in args.tau_vs:
        label = f"tau_v = {t:g}" + (" (~0)" if t == TAU_VS[0] else "")
        rows[label] = evaluated(point, f"tau_v{t:g}", lambda: VAMPolicy.load(point, tau_v=t), episodes)
        errors[label] = ground_truth_error(point, t, fresh, args.windows)
    return rows, ("the paper: the best policy is near tau_v = 1; the action error on noisy ground-truth latents is "
                  "lowest near 0.4"), ("action error on the ground-truth future", errors)


def data_efficiency(args):
    cfg = base_config(args.base)
    every = cfg["world_episodes"]   # demonstrations per task: all of them labelled is the curve's last point
    if not all(0 < n <= every for n in args.labelled):
        raise SystemExit(f"--labelled: each size must lie in 1..{every} (the base's demonstrations per task), got "
                         f"{args.labelled}")
    # the control's mirror of the base run: both stages, every episode labelled; its video model serves every size
    static = train_point(args.base, args.out, "static", stage_1=True, **budget(args),
                         **{"video.static": True, "action.tau_v": args.tau_v, "eval.tau_v": args.tau_v,
                            "action.cache": args.cache, "action.episodes": 0})
    rows = {}
    for n in sorted(set(args.labelled) | {every}):
        if (n == every and not cfg["action"]["episodes"] and not args.steps
                and cfg["action"]["cache"] == args.cache):
            video = Path(args.base)   # every episode labelled, the base's budget and cache: the base run itself
        else:
            video = train_point(args.base, args.out, f"episodes{n}", **budget(args),
                                **{"action.episodes": n, "action.cache": args.cache})
        control = static if n == every else train_point(static, args.out, f"static-episodes{n}",
                                                        **{"action.episodes": n})
        rows[f"{n} per task: video model"] = json.loads((video / "results.json").read_text())
        rows[f"{n} per task: static image"] = json.loads((control / "results.json").read_text())
    return rows, ("the paper: the video-conditioned decoder needs a fraction of the action data of an image-"
                  "conditioned one (77% on LIBERO with 1 episode per task)"), None


def layer(args):
    cfg = base_config(args.base)
    layers = args.layers or cfg["video"]["layers"]
    if layers == cfg["video"]["layers"]:   # the base's own video model: no stage 1 anew
        deep, mid, steps = Path(args.base), cfg["action"]["k"], budget(args)
    else:
        mid, steps = layers // 2, {}   # the budget is the other model's own configuration
        deep = train_point(args.base, args.out, f"layers{layers}", stage_1=True, **budget(args),
                           **{"video.layers": layers, "action.k": mid})
    rows, errors, fresh = {}, {}, fresh_episodes(args.out)
    for k in range(layers):
        name = f"layers{layers}-k{k}"
        point = deep if k == mid and not steps else train_point(deep, args.out, name, **steps, **{"action.k": k})
        rows[f"k = {k} of {layers} blocks"] = json.loads((point / "results.json").read_text())
        errors[f"k = {k} of {layers} blocks"] = policy_error(point, fresh, Path(args.out) / f"{name}-error.json",
                                                             args.windows)
    return (rows, f"the paper: a middle layer is best (k = 19 of 28); here {layers} blocks",
            ("action error on its own prediction", errors))


def history(args):
    cfg, rows = base_config(args.base), {}
    for h in args.histories:
        if h == cfg["history"]:   # the base run itself, or its video model with the experiment's decoder budget
            point = train_point(args.base, args.out, f"history{h}", **budget(args)) if args.steps else Path(args.base)
        else:
            point = train_point(args.base, args.out, f"history{h}", stage_1=True, history=h, **budget(args))
        rows[f"H_o = {h} history frames"] = json.loads((point / "results.json").read_text())
    return rows, "the paper: 5 history frames beat 1", None


EXPERIMENTS = {"oracle": oracle, "tau_v": tau_v, "data": data_efficiency, "layer": layer, "history": history}


def report(out, name, rows, claim, errors=None):
    """Print the table, write {out}/{name}.json and {out}/{name}.png. rows: label -> closed-loop result;
    errors, where measured: (what, label -> action error against the expert on fresh episodes), what saying which
    states the decoder read (the ground-truth future's, or the video model's own prediction's)."""
    what, errors = errors or (None, None)
    out = Path(out)
    print(f"\n{name}: {claim}")
    for label, r in rows.items():
        error = f"  {what} {errors[label]:.4f}" if errors else ""
        print(f"  {r['mean']:6.1%} [{r['interval'][0]:.1%}, {r['interval'][1]:.1%}] over {r['episodes']:3d} episodes"
              f"{error}  {label}")
    write_json(out / f"{name}.json", {"claim": claim, "rows": rows, "action_error": errors, "action_error_of": what})
    panels = [("closed-loop success, 95% interval", [(r["mean"], *r["interval"]) for r in rows.values()], 1.0)]
    if errors:
        panels.append((f"{what} (MSE)", [(e, e, e) for e in errors.values()], max(errors.values()) * 1.1))
    plot(out / f"{name}.png", f"{name}: {claim}", list(rows), panels)
    print(f"written: {out / name}.json, {out / name}.png")


def plot(path, title, labels, panels, width=760, row=26):
    """Horizontal charts, one panel per (caption, [(value, lo, hi)] per label, axis maximum): a dot at the value
    and a bar over [lo, hi] on each label's row."""
    left, right = 12, 190
    title = textwrap.wrap(title, 118)   # ~6 pixels a character in PIL's default font
    top = 14 + 14 * len(title)
    image = Image.new("RGB", (width, top + len(panels) * (row * len(labels) + 50)), "white")
    draw = ImageDraw.Draw(image)
    draw.multiline_text((left, 8), "\n".join(title), fill="black")
    for caption, points, axis in panels:
        draw.text((right, top), caption, fill="black")
        top += 16
        x = lambda v: right + v / axis * (width - right - 30)   # noqa: E731
        for tick in np.linspace(0, axis, 6):
            draw.line([x(tick), top, x(tick), top + row * len(labels)], fill=(220, 220, 220))
            draw.text((x(tick) - 10, top + row * len(labels) + 4), f"{tick:.0%}" if axis == 1 else f"{tick:.2g}",
                      fill="black")
        for i, (label, (value, lo, hi)) in enumerate(zip(labels, points)):
            y = top + row * i + row / 2
            draw.text((left, y - 6), label[:30], fill="black")
            draw.line([x(lo), y, x(hi), y], fill=(60, 90, 200), width=3)
            draw.ellipse([x(value) - 4, y - 4, x(value) + 4, y + 4], fill=(200, 40, 40))
        top += row * len(labels) + 34
    image.save(path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", choices=sorted(EXPERIMENTS))
    p.add_argument("--base", default="out/world", help="a finished `python train.py` run in the built-in world")
    p.add_argument("--out", default="out/experiments", help="folder of the experiments' points, JSONs and plots")
    p.add_argument("--tau_v", type=float, default=0.4, help="oracle, and data's static-image control: the tau_v its "
                   "decoder is trained and run at (the paper: action reconstruction from noisy ground-truth latents "
                   "is best near 0.4)")
    p.add_argument("--tau_vs", type=lambda v: [float(t) for t in v.split(",")], default=list(TAU_VS),
                   help="tau_v: the tau_v of each closed-loop point, comma-separated")
    p.add_argument("--windows", type=int, default=256,
                   help="tau_v, layer: windows of fresh expert episodes per action error")
    p.add_argument("--labelled", type=lambda v: [int(n) for n in v.split(",")], default=[1, 2, 5, 10, 25, 100],
                   help="data: action-labelled episodes per task of each point, comma-separated (the base's "
                   "own size, every episode labelled, is always added)")
    p.add_argument("--layers", type=int, default=0, help="layer: blocks of the video model (0 or the base's depth: the "
                   "base's own model; else one trained for it, e.g. 8 for a deeper model than the default's 4)")
    p.add_argument("--histories", type=lambda v: [int(n) for n in v.split(",")], default=[1, 2, 4],
                   help="history: H_o of each point, comma-separated (the base's own H_o is the base run)")
    p.add_argument("--steps", type=int, default=0, help="stage-2 (decoder) steps of every point of the experiment "
                   "(0: the base's); the points of one experiment always share one budget")
    p.add_argument("--cache", type=int, default=2, help="draws of the decoders' cached video states "
                   "(--action.cache; with tau_v's uniform tau_v each draw has a tau_v of its own; 0: uncached)")
    args = p.parse_args(argv)
    if args.layers < 0:
        raise SystemExit(f"--layers must be >= 0 (0: the base's), got {args.layers}")
    if args.steps < 0:
        raise SystemExit(f"--steps must be >= 0 (0: the base's), got {args.steps}")
    if not 0 < args.tau_v <= 1:
        raise SystemExit(f"--tau_v must lie in (0, 1], got {args.tau_v}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    report(args.out, args.experiment, *EXPERIMENTS[args.experiment](args))


if __name__ == "__main__":
    main()
