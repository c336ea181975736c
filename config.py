"""The configuration of a train.py run: small dataclasses, named presets, and their command line.

Every field can be set as --field or --section.field (typed, listed by `python train.py --help`), on top of a
preset. check() refuses what can be known to fail before anything is trained; what needs the dataset or a
pretrained checkpoint is checked by train.py as soon as those are loaded, still before stage 1.

Not here: what the fields do (train.py, sample.py), the models' own configs (video_model.py, action_decoder.py).
"""
import argparse
import copy
import re
from dataclasses import dataclass, field, fields

import action_decoder
import video_model


def arg(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Optim:
    """One stage's AdamW settings."""
    steps: int = arg(1000, "optimiser steps")
    batch_size: int = arg(32, "global batch size (all processes together)")
    lr: float = arg(1e-3, "peak learning rate")
    warmup: int = arg(50, "linear warm-up steps")
    schedule: str = arg("cosine", "after warm-up: constant | linear (to 0) | cosine (to 0)")
    weight_decay: float = arg(0.0, "AdamW weight decay (matrices only)")
    grad_clip: float = arg(1.0, "gradient norm clip")
    ema: float = arg(0.0, "decay of an exponential moving average of the weights, saved in their place at the end "
                          "(0: none; warmed up as min(ema, (1 + step) / (10 + step)))")


@dataclass
class VideoStage(Optim):
    model: str = arg("tiny", "video model preset (video_model.PRESETS)")
    pretrained: str = arg("", "Cosmos checkpoint (folder, safetensors file or Hub id) to LoRA-adapt; "
                              "empty: train the preset from scratch")
    lora_rank: int = arg(256, "LoRA rank (with --video.pretrained)")
    lora_alpha: float = arg(32.0, "LoRA alpha (with --video.pretrained)")
    checkpointing: bool = arg(False, "activation checkpointing: keep each DiT block's input, recompute the rest in "
                                     "the backward (less memory, one more forward; the 2B at 480x640 needs it)")
    static: bool = arg(False, "the static-image control (experiments.py data; not the method): the video model "
                              "learns to denoise the H_o history frames from the instruction alone, no context and no "
                              "future, and the decoder reads its states on the observed frames noised to a fixed "
                              "--action.tau_v < 1 (the stand-in for the paper's VLM-conditioned baseline)")
    patch: int = arg(2, "spatial patch size of the video model (scratch training only)")
    heads: int = arg(0, "attention heads, i.e. width / head_dim (scratch training only; 0: the preset's)")
    layers: int = arg(0, "blocks (scratch training only; 0: the preset's)")


@dataclass
class ActionStage(Optim):
    model: str = arg("tiny", "action decoder preset (action_decoder.PRESETS)")
    k: int = arg(3, "video block whose hidden states the decoder reads (0-based; the paper: 19 of 28)")
    tau_v: str = arg("uniform", "tau_v of the training examples: 'uniform' on (0, 1], or a fixed value")
    positions: bool = arg(True, "learned positions of the video tokens in the decoder's cross-attention (not in "
                                "the release; without them a plain table leaves the decoder unable to tell where "
                                "a token is)")
    tau_a_alpha: float = arg(1.5, "tau_a ~ 0.001 + 0.999 Beta(alpha, beta): the paper's 1.5, the release's 1")
    tau_a_beta: float = arg(1.0, "tau_a ~ 0.001 + 0.999 Beta(alpha, beta)")
    proprio_dropout: float = arg(0.2, "share of training examples whose proprio token is the learned mask token")
    repeats: int = arg(1, "action draws (tau_a, noise) per video example in a batch: the frozen video model runs on "
                          "batch_size / repeats examples per step (an efficiency choice, not the paper's)")
    episodes: int = arg(0, "action-labelled episodes per task stage 2 trains on, the first of each task's (0: all); "
                           "stage 1 still learns from every training episode's video")
    cache: int = arg(0, "draws (noise, and with --action.tau_v uniform tau_v) per training window of the frozen "
                        "video model's states, computed once before stage 2 and looked up by every step "
                        "(feature_cache.py; 0: computed anew each step, the paper's way; an efficiency choice, not "
                        "the paper's)")


@dataclass
class EvalStage:
    episodes: int = arg(30, "held-out episodes per task (built-in world)")
    replan: int = arg(4, "actions executed from each chunk before replanning (at most H_a)")
    tau_v: float = arg(1.0, "video flow time to stop at (1: a single pass on noise, no video steps)")
    video_steps: int = arg(10, "Euler steps from 1 to tau_v when tau_v < 1")
    action_steps: int = arg(10, "Euler steps of the action flow")
    action_temperature: float = arg(1.0, "the action flow starts from eps ~ N(0, T^2 I): 1 the paper's; 0 one "
                                         "deterministic chunk per plan, from eps = 0 (a departure)")
    gif: bool = arg(True, "write rollouts.gif next to the checkpoints")


@dataclass
class Config:
    data: str = arg("", "dataset folder (data.py format); empty: the built-in world's, kept in --world_data")
    world_data: str = arg("data/world", "the built-in world's dataset folder; generated there if absent")
    out: str = arg("out/world", "run folder: checkpoints, results.json, GIF")
    seed: int = arg(0, "seed of initialisation, batches and noise")
    device: str = arg("auto", "auto | cpu | cuda")
    threads: int = arg(0, "torch CPU threads (0: torch's default)")
    precision: str = arg("fp32", "fp32 | bf16 | auto: bf16 runs the training forward passes (and the stage-2 "
                                 "feature cache) under bf16 autocast, CPU or CUDA, and keeps a pretrained video "
                                 "model's frozen weights in bf16; trainable weights and AdamW state stay fp32. auto: "
                                 "bf16 where the device multiplies bf16 natively (parallel.uses_bf16), else fp32")
    parallel: str = arg("ddp", "under torchrun: ddp (each process the whole model, gradients averaged) | fsdp "
                               "(FSDP2: stage 1's video model sharded per block over the processes)")
    world_episodes: int = arg(100, "demonstrations per task when generating the built-in world's dataset")
    history: int = arg(2, "H_o: history frames (context latent frames)")
    history_stride: int = arg(1, "control steps between history frames")
    horizon: int = arg(16, "H_a: actions per chunk")
    future_stride: int = arg(4, "control steps between predicted future frames")
    future_frames: int = arg(0, "predicted future frames (0: enough to cover the action chunk, ceil(H_a / stride))")
    encoders: str = arg("stand-in", "frozen encoders: stand-in (space-to-depth latents, hash text) | cosmos (the "
                                    "Wan2.1 VAE and T5 of --encoder_source); a pre-encoded dataset brings its own")
    encoder_source: str = arg("nvidia/Cosmos-Predict2-2B-Video2World", "folder or Hub id with vae/, text_encoder/, "
                              "tokenizer/ (with --encoders cosmos)")
    resolution: str = arg("", "HxW the Wan VAE sees, frames resized first (with --encoders cosmos; empty: the "
                              "frames' own)")
    tokenizer_factor: int = arg(4, "space-to-depth factor of the latent stand-in (latent channels 3 f^2); frames "
                                   "must divide by it times the patch size")
    text_length: int = arg(16, "words the text-encoder stand-in holds")
    holdout: float = arg(0.1, "share of each task's episodes held out for the action error (datasets without a "
                              "world; 0: none)")
    log_every: int = arg(100, "steps between log lines")
    ckpt_every: int = arg(500, "steps between resumable checkpoints")
    video: VideoStage = field(default_factory=VideoStage)
    action: ActionStage = field(default_factory=ActionStage)
    eval: EvalStage = field(default_factory=EvalStage)


def world_preset(video_steps, action_steps, video_lr, cache, history=2, action_lr=1e-3, ema=0.0, replan=4,
                 precision="fp32", episodes=100):
    """The built-in world (32x32 frames: 4x4 tokens per frame with the stand-in's factor 4 and patch 2): a
    256-wide, 4-block video DiT predicting frames t+8 and t+16 from H_o history frames; the decoder reads block 2 at
    tau_v = 1, the only tau_v the policy uses, and with cache > 0 from states computed once per window and noise
    draw."""
    return Config(world_episodes=episodes, history=history, horizon=8, future_stride=8, future_frames=2,
                  precision=precision,
                  video=VideoStage(heads=8, layers=4, steps=video_steps, batch_size=32, lr=video_lr, warmup=50,
                                   schedule="cosine", weight_decay=0.0, grad_clip=1.0),
                  action=ActionStage(k=2, tau_v="1.0", cache=cache, steps=action_steps, batch_size=64, lr=action_lr,
                                     warmup=100, schedule="linear", weight_decay=0.1, grad_clip=10.0, ema=ema),
                  eval=EvalStage(episodes=50, replan=replan))


PRESETS = {
    # python train.py: the built-in world on a 2-core CPU (README: measured results)
    # (bf16 autocast where the CPU multiplies bf16 natively: about twice the steps per second, spent on stage 1;
    # 600 demonstrations per task, generated in seconds, each window's states cached for one noise draw)
    "world": world_preset(video_steps=3000, action_steps=3000, video_lr=5e-4, cache=1, action_lr=2e-3, ema=0.999,
                          replan=2, precision="auto", episodes=600),
    # H_o = 4 in about the same time: fewer steps of both stages (measured 2026-12-06: no better on three seeds)
    "world-h4": world_preset(video_steps=800, action_steps=2500, video_lr=5e-4, cache=2, history=4, action_lr=2e-3,
                             ema=0.999, replan=2),
    # the former default trained longer, as measured on 2026-11-30 (the video lr 1e-3, stage 2 uncached)
    "world-long": world_preset(video_steps=2000, action_steps=3000, video_lr=1e-3, cache=0),
    # seconds: checks that everything runs (tests)
    "smoke": Config(world_episodes=4, log_every=2, ckpt_every=2,
                    video=VideoStage(layers=2, steps=4, batch_size=8, warmup=1),
                    action=ActionStage(k=1, steps=4, batch_size=8, warmup=1, schedule="linear", weight_decay=0.1,
                                       grad_clip=10.0),
                    eval=EvalStage(episodes=2, gif=False)),
    # the paper's recipe's code path at toy sizes, on the CPU in seconds: a tiny pretrained Cosmos DiT given by
    # --video.pretrained (tests/tiny_models.py writes one with a tiny VAE, T5 and LeRobot dataset), LoRA, k = 1
    "cosmos-tiny": Config(
        out="out/cosmos-tiny", history=5, horizon=4, future_stride=1, future_frames=4, encoders="cosmos",
        text_length=512, holdout=0.4, log_every=2, ckpt_every=2,
        video=VideoStage(lora_rank=4, lora_alpha=8.0, steps=6, batch_size=4, lr=1e-3, warmup=0, schedule="constant"),
        action=ActionStage(k=1, positions=False, steps=6, batch_size=4, warmup=0, schedule="linear",
                           weight_decay=0.1, grad_clip=10.0)),
    # the paper's recipe (GPUs): Cosmos-Predict2 2B + LoRA, the release's decoder and optimiser settings, its
    # Wan2.1 VAE and T5 (or a dataset pre-encoded by them, preencode.py)
    "cosmos-2b": Config(
        out="out/cosmos-2b", history=5, horizon=15, encoders="cosmos", text_length=512, precision="bf16",
        video=VideoStage(model="cosmos-predict2-2b", pretrained="nvidia/Cosmos-Predict2-2B-Video2World",
                         checkpointing=True, steps=10000, batch_size=32, lr=1.778e-4, warmup=0, schedule="constant",
                         grad_clip=1.0),
        action=ActionStage(model="mimic-video", k=19, positions=False, tau_a_alpha=1.5, steps=14112, batch_size=256,
                           lr=1e-4, warmup=1000, schedule="linear", weight_decay=0.1, grad_clip=10.0)),
}

# ----------------------------------------------------------------------------- the command line


def parse_args(argv=None, description=None):
    """(Config, resume): a preset, then any field overridden as --field or --section.field, typed."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="world", choices=sorted(PRESETS), help="named configuration (default world)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoints")
    defaults = PRESETS["world"]
    for name, f, default in leaves(defaults):
        p.add_argument(f"--{name}", type=_parser(f.type, name), default=None, metavar=f.type.__name__.upper(),
                       help=f"{f.metadata['help']} (world: {default})")
    args = p.parse_args(argv)
    cfg = copy.deepcopy(PRESETS[args.preset])
    for name, _, _ in leaves(defaults):
        value = getattr(args, name)
        if value is not None:
            *path, leaf = name.split(".")
            section = cfg
            for part in path:
                section = getattr(section, part)
            setattr(section, leaf, value)
    problems = check(cfg)
    if problems:
        raise SystemExit("bad configuration:\n  " + "\n  ".join(problems))
    return cfg, args.resume


def leaves(cfg, prefix=""):
    """(dotted name, dataclass field, value) of every setting."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if hasattr(value, "__dataclass_fields__"):
            yield from leaves(value, f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, f, value


def _parser(kind, name):
    if kind is bool:
        def parse_bool(s):
            if s.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise argparse.ArgumentTypeError(f"--{name} takes true or false, got {s!r}")
            return s.lower() in ("true", "1", "yes")
        return parse_bool
    return kind

# ----------------------------------------------------------------------------- checks


POSITIVE = ("history", "history_stride", "horizon", "future_stride", "tokenizer_factor", "text_length", "log_every",
            "ckpt_every", "world_episodes", "video.batch_size", "video.patch", "video.lora_rank", "action.batch_size",
            "eval.episodes", "eval.replan", "eval.video_steps", "eval.action_steps")


def check(cfg):
    """Every problem with a configuration that can be known before any data or checkpoint is read."""
    values = {name: value for name, _, value in leaves(cfg)}
    problems = [f"--{name} must be >= 0, got {value}" for name, f, value in leaves(cfg)
                if f.type in (int, float) and name != "seed" and value < 0]
    problems += [f"--{name} must be >= 1, got {values[name]}" for name in POSITIVE if 0 <= values[name] < 1]
    for stage in ("video", "action"):
        s = getattr(cfg, stage)
        if s.schedule not in ("constant", "linear", "cosine"):
            problems.append(f"--{stage}.schedule must be constant, linear or cosine, got {s.schedule!r}")
    if cfg.video.model not in video_model.PRESETS:
        problems.append(f"--video.model must be one of {sorted(video_model.PRESETS)}, got {cfg.video.model!r}")
    if cfg.action.model not in action_decoder.PRESETS:
        problems.append(f"--action.model must be one of {sorted(action_decoder.PRESETS)}, got {cfg.action.model!r}")
    elif not cfg.video.pretrained and cfg.video.model in video_model.PRESETS:   # a pretrained model's depth: later
        layers = cfg.video.layers or video_model.PRESETS[cfg.video.model].num_layers
        if not 0 <= cfg.action.k < layers:
            problems.append(f"--action.k must name one of the video model's blocks, 0 .. {layers - 1} "
                            f"(--video.layers {layers}), got {cfg.action.k}")
    fixed = None   # the decoder's fixed tau_v, if it has one
    if cfg.action.tau_v != "uniform":
        try:
            fixed = float(cfg.action.tau_v)
        except ValueError:
            pass
        if fixed is None or not 0 < fixed <= 1:
            problems.append(f"--action.tau_v must be 'uniform' or a number in (0, 1], got {cfg.action.tau_v!r}")
    if cfg.video.static and (fixed is None or not 0 < fixed < 1 or cfg.eval.tau_v != fixed):
        problems.append(f"--video.static reads the observed frames noised to one tau_v < 1 (at 1 they are pure "
                        f"noise): give --action.tau_v and --eval.tau_v the same value in (0, 1), got "
                        f"{cfg.action.tau_v!r} and {cfg.eval.tau_v}")
    if cfg.action.repeats < 1 or cfg.action.batch_size % cfg.action.repeats:
        problems.append(f"--action.repeats must be >= 1 and divide --action.batch_size {cfg.action.batch_size}, "
                        f"got {cfg.action.repeats}")
    problems += [f"--{stage}.ema must lie in [0, 1) (a decay; 0: none), got {getattr(cfg, stage).ema}"
                 for stage in ("video", "action") if not 0 <= getattr(cfg, stage).ema < 1]
    if not 0 <= cfg.action.proprio_dropout <= 1:
        problems.append(f"--action.proprio_dropout must lie in [0, 1], got {cfg.action.proprio_dropout}")
    if not 0 <= cfg.holdout < 1:
        problems.append(f"--holdout must lie in [0, 1), got {cfg.holdout}")
    if cfg.action.tau_a_alpha <= 0 or cfg.action.tau_a_beta <= 0:
        problems.append("--action.tau_a_alpha and --action.tau_a_beta must be > 0")
    if not 0 < cfg.eval.tau_v <= 1:
        problems.append(f"--eval.tau_v must lie in (0, 1], got {cfg.eval.tau_v}")
    if cfg.eval.replan > cfg.horizon:
        problems.append(f"--eval.replan {cfg.eval.replan} is longer than the chunk it executes (--horizon "
                        f"{cfg.horizon})")
    if cfg.encoders not in ("stand-in", "cosmos"):
        problems.append(f"--encoders must be stand-in or cosmos, got {cfg.encoders!r}")
    elif cfg.encoders == "cosmos":   # the Wan VAE's frame rule: the first frame alone, then groups of 4
        future = cfg.future_frames or -(-cfg.horizon // cfg.future_stride)
        if (cfg.history - 1) % 4 or (cfg.history + future - 1) % 4:
            problems.append(f"--encoders cosmos encodes clips of 1 + 4n frames: --history {cfg.history} and history "
                            f"+ future frames {cfg.history + future} must both be 1 + 4n")
    if cfg.resolution and not re.fullmatch(r"\d+x\d+", cfg.resolution):
        problems.append(f"--resolution takes HxW, e.g. 256x256, got {cfg.resolution!r}")
    if cfg.precision not in ("fp32", "bf16", "auto"):
        problems.append(f"--precision must be fp32, bf16 or auto, got {cfg.precision!r}")
    if cfg.parallel not in ("ddp", "fsdp"):
        problems.append(f"--parallel must be ddp or fsdp, got {cfg.parallel!r}")
    if cfg.device not in ("auto", "cpu", "cuda"):
        problems.append(f"--device must be auto, cpu or cuda, got {cfg.device!r}")
    return problems
