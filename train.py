"""Train a Video-Action Model in the paper's two stages, then evaluate it in closed loop.

    python train.py                                   # built-in world: data, stage 1, stage 2, evaluation (CPU)
    python train.py --preset world-long               # longer training (~36 min), higher success
    python train.py --data DIR --out OUT              # any dataset in data.py's format
    python train.py --video.steps 2000 --action.lr 3e-4 ...   # any config field; see --help
    python train.py --resume                          # continue a killed run from its last checkpoint
    torchrun --nproc_per_node 2 train.py ...          # data parallel (gloo on CPU, NCCL on GPUs)

Stage 1 (video): the video DiT learns the flow of the future latent frames given the clean history frames and the
instruction (Video2World), tau_v logit-normal. On the built-in world the tiny DiT is trained from scratch, the
stand-in for pretraining; with --video.pretrained a Cosmos checkpoint is adapted with LoRA (the paper's recipe).
Stage 2 (action): the video model is frozen; the action decoder learns the action flow from its layer-k states,
taken on ground-truth future latents noised to a sampled tau_v.

Every step's batch and noise are drawn from a generator seeded by (seed, stage, step), so a resumed run sees the
same data as an uninterrupted one, and N data-parallel processes (each taking every N-th row of the batch)
compute the same averaged gradient as one process.
"""
import argparse
import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

import data
import flow
import video_model
import world
from action_decoder import ActionDecoder, preset as decoder_preset
from sample import Normalizer, VAMPolicy, load_model

# ----------------------------------------------------------------------------- configuration


def arg(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class VideoStage:
    model: str = arg("tiny", "video model preset (video_model.PRESETS)")
    pretrained: str = arg("", "Cosmos checkpoint (folder, safetensors file or Hub id) to LoRA-adapt; "
                              "empty: train the preset from scratch")
    lora_rank: int = arg(256, "LoRA rank (with --video.pretrained)")
    lora_alpha: float = arg(32.0, "LoRA alpha (with --video.pretrained)")
    patch: int = arg(2, "spatial patch size of the video model (scratch training only)")
    heads: int = arg(0, "attention heads, i.e. width / head_dim (scratch training only; 0: the preset's)")
    layers: int = arg(0, "blocks (scratch training only; 0: the preset's)")
    steps: int = arg(1000, "optimiser steps")
    batch_size: int = arg(32, "global batch size (all processes together)")
    lr: float = arg(1e-3, "peak learning rate")
    warmup: int = arg(50, "linear warm-up steps")
    schedule: str = arg("cosine", "after warm-up: constant | linear (to 0) | cosine (to 0)")
    weight_decay: float = arg(0.0, "AdamW weight decay (matrices only)")
    grad_clip: float = arg(1.0, "gradient norm clip")


@dataclass
class ActionStage:
    model: str = arg("tiny", "action decoder preset (action_decoder.PRESETS)")
    k: int = arg(3, "video block whose hidden states the decoder reads (0-based; the paper: 19 of 28)")
    tau_v: str = arg("uniform", "tau_v of the training examples: 'uniform' on (0, 1], or a fixed value")
    positions: bool = arg(True, "learned positions of the video tokens in the decoder's cross-attention (not in "
                                "the release; without them a plain table leaves the decoder unable to tell where "
                                "a token is)")
    tau_a_alpha: float = arg(1.5, "tau_a ~ Beta(alpha, beta): the paper's 1.5, the release's 1")
    tau_a_beta: float = arg(1.0, "tau_a ~ Beta(alpha, beta)")
    steps: int = arg(2000, "optimiser steps")
    batch_size: int = arg(64, "global batch size (all processes together)")
    lr: float = arg(1e-3, "peak learning rate")
    warmup: int = arg(100, "linear warm-up steps")
    schedule: str = arg("linear", "after warm-up: constant | linear (to 0) | cosine (to 0)")
    weight_decay: float = arg(0.1, "AdamW weight decay (matrices only)")
    grad_clip: float = arg(10.0, "gradient norm clip")


@dataclass
class EvalStage:
    episodes: int = arg(30, "held-out episodes per task (built-in world)")
    replan: int = arg(4, "actions executed from each chunk before replanning")
    tau_v: float = arg(1.0, "video flow time to stop at (1: a single pass on noise, no video steps)")
    video_steps: int = arg(10, "Euler steps from 1 to tau_v when tau_v < 1")
    action_steps: int = arg(10, "Euler steps of the action flow")
    gif: bool = arg(True, "write rollouts.gif next to the checkpoints")


@dataclass
class Config:
    data: str = arg("", "dataset folder (data.py format); empty: the built-in world's, kept in --world_data")
    world_data: str = arg("data/world", "the built-in world's dataset folder; generated there if absent")
    out: str = arg("out/world", "run folder: checkpoints, results.json, GIF")
    seed: int = arg(0, "seed of initialisation, batches and noise")
    device: str = arg("auto", "auto | cpu | cuda")
    threads: int = arg(0, "torch CPU threads (0: torch's default)")
    world_episodes: int = arg(100, "demonstrations per task when generating the built-in world's dataset")
    history: int = arg(2, "H_o: history frames (context latent frames)")
    history_stride: int = arg(1, "control steps between history frames")
    horizon: int = arg(16, "H_a: actions per chunk")
    future_stride: int = arg(4, "control steps between predicted future frames")
    future_frames: int = arg(0, "predicted future frames (0: enough to cover the action chunk, ceil(H_a / stride))")
    tokenizer_factor: int = arg(4, "space-to-depth factor of the latent stand-in (latent channels 3 f^2)")
    text_length: int = arg(16, "words the text-encoder stand-in holds")
    holdout: float = arg(0.1, "share of episodes held out for the action error (datasets without a world)")
    log_every: int = arg(100, "steps between log lines")
    ckpt_every: int = arg(500, "steps between resumable checkpoints")
    video: VideoStage = field(default_factory=VideoStage)
    action: ActionStage = field(default_factory=ActionStage)
    eval: EvalStage = field(default_factory=EvalStage)


def world_preset(video_steps, action_steps):
    """The built-in world: a 256-wide, 4-block video DiT predicting frames t+8 and t+16; the decoder reads block 2
    at tau_v = 1, the only tau_v the policy uses."""
    return Config(horizon=8, future_stride=8, future_frames=2, video=VideoStage(heads=8, layers=4, steps=video_steps),
                  action=ActionStage(k=2, tau_v="1.0", steps=action_steps), eval=EvalStage(episodes=50))


PRESETS = {
    # python train.py: the built-in world on a 2-core CPU in about 15 minutes
    "world": world_preset(video_steps=1000, action_steps=1200),
    # the same, trained longer (about 36 minutes)
    "world-long": world_preset(video_steps=2000, action_steps=3000),
    # seconds: checks that everything runs (tests)
    "smoke": Config(world_episodes=4, log_every=2, ckpt_every=2, video=VideoStage(steps=4, batch_size=8),
                    action=ActionStage(k=1, steps=4, batch_size=8), eval=EvalStage(episodes=2, gif=False)),
    # the paper's recipe (GPUs): Cosmos-Predict2 2B + LoRA, the release's decoder and optimiser settings.
    # Needs datasets whose latents match the 2B's 16 channels, i.e. the Wan2.1 VAE, which is not part of this project.
    "cosmos-2b": Config(
        out="out/cosmos-2b", history=5, horizon=15, tokenizer_factor=8, text_length=512,
        video=VideoStage(model="cosmos-predict2-2b", pretrained="nvidia/Cosmos-Predict2-2B-Video2World",
                         steps=10000, batch_size=32, lr=1.778e-4, warmup=0, schedule="constant", grad_clip=1.0),
        action=ActionStage(model="mimic-video", k=19, positions=False, tau_a_alpha=1.5, steps=14112, batch_size=256,
                           lr=1e-4, warmup=1000, schedule="linear", weight_decay=0.1, grad_clip=10.0)),
}


def parse_args(argv=None):
    """(Config, resume): a preset, then any field overridden as --field or --section.field, typed."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="world", choices=sorted(PRESETS), help="named configuration (default world)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoints")
    defaults = PRESETS["world"]
    for name, f, default in _leaves(defaults):
        p.add_argument(f"--{name}", type=_parser(f.type, name), default=None, metavar=f.type.__name__.upper(),
                       help=f"{f.metadata['help']} (world: {default})")
    args = p.parse_args(argv)
    cfg = copy.deepcopy(PRESETS[args.preset])
    for name, _, _ in _leaves(defaults):
        value = getattr(args, name)
        if value is not None:
            *path, leaf = name.split(".")
            section = cfg
            for part in path:
                section = getattr(section, part)
            setattr(section, leaf, value)
    check_config(cfg)
    return cfg, args.resume


def _leaves(cfg, prefix=""):
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if hasattr(value, "__dataclass_fields__"):
            yield from _leaves(value, f"{prefix}{f.name}.")
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


def check_config(cfg):
    problems = []
    for name, f, value in _leaves(cfg):
        if f.type in (int, float) and name not in ("seed", "action.k") and value < 0:
            problems.append(f"--{name} must be >= 0, got {value}")
    for stage in ("video", "action"):
        s = getattr(cfg, stage)
        if s.schedule not in ("constant", "linear", "cosine"):
            problems.append(f"--{stage}.schedule must be constant, linear or cosine, got {s.schedule!r}")
        if s.batch_size < 1:
            problems.append(f"--{stage}.batch_size must be >= 1")
    if cfg.action.tau_v != "uniform":
        try:
            ok = 0 < float(cfg.action.tau_v) <= 1
        except ValueError:
            ok = False
        if not ok:
            problems.append(f"--action.tau_v must be 'uniform' or a number in (0, 1], got {cfg.action.tau_v!r}")
    if not 0 < cfg.eval.tau_v <= 1:
        problems.append(f"--eval.tau_v must lie in (0, 1], got {cfg.eval.tau_v}")
    if cfg.device not in ("auto", "cpu", "cuda"):
        problems.append(f"--device must be auto, cpu or cuda, got {cfg.device!r}")
    if problems:
        raise SystemExit("bad configuration:\n  " + "\n  ".join(problems))

# ----------------------------------------------------------------------------- processes and devices


def setup(cfg):
    """(rank, world_size, device). Under torchrun: one process group, every process a slice of each batch."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          "cpu" if cfg.device == "auto" else cfg.device)
    if "RANK" not in os.environ:
        return 0, 1, device
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def log(rank, *msg):
    if rank == 0:
        print(*msg, flush=True)

# ----------------------------------------------------------------------------- checkpoints


def save_atomic(path, tensors, meta):
    """Write a safetensors file with JSON metadata so that a crash at any moment leaves either the old file or the
    new one: write a temporary file, flush it to disk, then rename it over the old one (atomic on POSIX)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
              metadata={"mimic_video": json.dumps(meta)})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)   # safetensors writes 0600; give it the permissions of any new file
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)   # the rename itself reaches the disk
    finally:
        os.close(fd)


def read_checkpoint(path):
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {})["mimic_video"])
            return {k: f.get_tensor(k).clone() for k in f.keys()}, meta
    except (SafetensorError, KeyError, json.JSONDecodeError) as e:
        raise SystemExit(f"{path}: not a readable train.py checkpoint ({type(e).__name__}: {e}); "
                         f"delete it to restart that stage") from None


def save_state(path, module, opt, step, cfg):
    """A resumable point: the trainable parameters, AdamW's moments and the step."""
    tensors = {f"model.{n}": p for n, p in module.named_parameters() if p.requires_grad}
    for i, p in enumerate(q for g in opt.param_groups for q in g["params"]):
        for key, value in opt.state.get(p, {}).items():
            tensors[f"optim.{i}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    save_atomic(path, tensors, {"step": step, "config": asdict(cfg)})


def load_state(path, module, opt, cfg):
    tensors, meta = read_checkpoint(path)
    if meta["config"] != asdict(cfg):
        diff = [n for n, _, v in _leaves(cfg) if _get(meta["config"], n) != v]
        raise SystemExit(f"{path} was written by a run with another configuration (differs in: {', '.join(diff)}); "
                         f"resume with the same flags, or use another --out")
    params = dict(module.named_parameters())
    with torch.no_grad():
        for name, p in params.items():
            if p.requires_grad:
                p.copy_(tensors[f"model.{name}"])
    for i, p in enumerate(q for g in opt.param_groups for q in g["params"]):
        keys = [k for k in tensors if k.startswith(f"optim.{i}.")]
        if keys:
            opt.state[p] = {k.rsplit(".", 1)[1]: tensors[k].to(p.device) for k in keys}
    return meta["step"]


def _get(d, dotted):
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d

# ----------------------------------------------------------------------------- optimisation


def lr_at(step, s):
    """Linear warm-up to s.lr over s.warmup steps, then constant, linear decay to 0, or cosine decay to 0."""
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    progress = (step - s.warmup) / max(1, s.steps - s.warmup)
    if s.schedule == "linear":
        return s.lr * (1 - progress)
    if s.schedule == "cosine":
        return s.lr * 0.5 * (1 + math.cos(math.pi * progress))
    return s.lr


def step_generator(seed, stage, step):
    """The generator of one step's batch and noise: a function of (seed, stage, step) alone."""
    return torch.Generator().manual_seed(seed * 1_000_003 + {"video": 1, "action": 2}[stage] * 100_000_007 + step)


def average_gradients(params, world_size):
    """Data parallelism: each process holds the gradient of the mean loss over its rows; averaging over processes
    gives the gradient of the mean over the whole batch (equal row counts)."""
    for p in params:
        dist.all_reduce(p.grad)
        p.grad /= world_size


TAU_BINS = (0.0, 0.25, 0.5, 0.75, 1.0)


def train_stage(stage, module, loss_fn, s, cfg, ctx):
    """Optimise module's trainable parameters with AdamW for s.steps steps of loss_fn(generator) ->
    (mean loss, per-sample losses, per-sample tau). Resumable from {stage}.state.safetensors; logs the loss binned
    by tau (the flow-matching diagnostic: the loss is highest near tau = 1 and lowest near 0)."""
    rank, world_size, out = ctx["rank"], ctx["world_size"], Path(cfg.out)
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": s.weight_decay},
                             {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}], lr=s.lr)
    state_path = out / f"{stage}.state.safetensors"
    step = load_state(state_path, module, opt, cfg) if ctx["resume"] and state_path.exists() else 0
    if step:
        log(rank, f"{stage}: resuming at step {step} from {state_path}")
    n_params = sum(p.numel() for p in params)
    log(rank, f"{stage}: {s.steps} steps, batch {s.batch_size}, {n_params:,} trainable parameters")
    bins, t0, done_at_t0 = np.zeros((2, len(TAU_BINS) - 1)), time.perf_counter(), step
    last_good = step
    while step < s.steps:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, s)
        loss, per_sample, tau = loss_fn(step_generator(cfg.seed, stage, step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if world_size > 1:   # every process saw its rows of the global batch: average over processes
            average_gradients(params, world_size)
            loss = loss.detach().clone()
            dist.all_reduce(loss)
            loss /= world_size
        if not torch.isfinite(loss):
            where = f"{state_path} (step {last_good})" if last_good else "none (no checkpoint yet)"
            raise SystemExit(f"{stage} stage: the loss is {loss.item()} at step {step}; stopping. The last good "
                             f"checkpoint is {where}; lower --{stage}.lr or check the data")
        torch.nn.utils.clip_grad_norm_(params, s.grad_clip)
        opt.step()
        step += 1
        which = np.clip(np.digitize(tau.detach().cpu().numpy(), TAU_BINS) - 1, 0, len(TAU_BINS) - 2)
        np.add.at(bins[0], which, per_sample.detach().float().cpu().numpy())
        np.add.at(bins[1], which, 1)
        if step % cfg.log_every == 0 or step == s.steps:
            elapsed = time.perf_counter() - t0
            rate = (step - done_at_t0) / elapsed
            binned = " ".join(f"{b:.3f}" if n else "-" for b, n in zip(bins[0] / np.maximum(bins[1], 1), bins[1]))
            log(rank, f"{stage} {step:6d}/{s.steps} | loss {loss.item():.4f} | by tau [0,.25,.5,.75,1]: {binned} | "
                      f"lr {lr_at(step - 1, s):.2e} | {rate * s.batch_size:.0f} samples/s | "
                      f"{elapsed:.0f}s, eta {(s.steps - step) / rate:.0f}s")
            bins[:] = 0
        if step % cfg.ckpt_every == 0 or step == s.steps:
            if rank == 0:
                save_state(state_path, module, opt, step, cfg)
            last_good = step
    return step

# ----------------------------------------------------------------------------- the two stages


def rows(batch, ctx):
    """This process's rows of a global batch: every world_size-th, starting at its rank."""
    return {k: v[ctx["rank"]::ctx["world_size"]].to(ctx["device"]) for k, v in batch.items()}


def video_batch(g, windows, tokenizer, batch_size, ctx):
    """A global batch of windows as latents x0 (B, C, H_o + F, h, w), with its tau_v and noise, for stage 1."""
    b = windows.sample(batch_size, g)
    x0 = tokenizer.encode(b["frames"])
    tau_v = flow.sample_tau_video(batch_size, x0.shape[2], g)
    eps = torch.randn(x0.shape, generator=g)
    return rows({"x0": x0, "text": b["text"], "tau_v": tau_v, "eps": eps}, ctx)


def video_loss(video, batch, n_cond):
    """Flow matching on the future latent frames:  || v_theta(x_tau, tau | context, text) - (eps - x0) ||^2,
    x_tau = (1 - tau_v) x0 + tau_v eps; the n_cond context frames are given clean and carry no loss."""
    x0, eps, tau_v = batch["x0"], batch["eps"], batch["tau_v"]
    x_tau = flow.interpolate(x0, eps, tau_v)
    v = video.video2world_velocity(x_tau, tau_v, batch["text"], x0, n_cond)
    err = (v - flow.velocity_target(x0, eps))[:, :, n_cond:].float().pow(2)
    per_sample = err.mean(dim=(1, 2, 3, 4))
    return per_sample.mean(), per_sample, tau_v


def action_batch(g, windows, tokenizer, norms, s, decoder_cfg, ctx):
    """A global batch for stage 2: latents, tau_v and video noise, normalised proprio and actions, and the action
    flow's tau_a, noise and proprio dropout."""
    b = windows.sample(s.batch_size, g)
    x0 = tokenizer.encode(b["frames"])
    B = s.batch_size
    tau_v = 1 - torch.rand(B, generator=g) if s.tau_v == "uniform" else torch.full((B,), float(s.tau_v))
    return rows({"x0": x0, "text": b["text"], "tau_v": tau_v, "eps_v": torch.randn(x0.shape, generator=g),
                 "proprio": norms[0](b["proprio"]), "actions": norms[1](b["actions"]),
                 "tau_a": flow.sample_tau_action(B, s.tau_a_alpha, s.tau_a_beta, g),
                 "eps_a": torch.randn(b["actions"].shape, generator=g),
                 "drop": torch.rand(B, generator=g) < decoder_cfg.proprio_dropout}, ctx)


def action_loss(video, decoder, batch, n_cond, k):
    """The decoder's flow loss on the frozen video model's layer-k states, which it reads from ground-truth future
    latents noised to tau_v (the states the video model would give mid-way through denoising)."""
    with torch.no_grad():
        x_tau = flow.interpolate(batch["x0"], batch["eps_v"], batch["tau_v"])
        states = video.video2world_hidden_states(x_tau, batch["tau_v"], batch["text"], batch["x0"], n_cond, k)
    per_sample = decoder.loss(states, batch["tau_v"], batch["proprio"], batch["actions"], tau_a=batch["tau_a"],
                              eps=batch["eps_a"], drop_proprio=batch["drop"], reduce=False)
    return per_sample.mean(), per_sample, batch["tau_a"]

# ----------------------------------------------------------------------------- data and models


def load_data(cfg, rank, world_size):
    """The dataset (generating the built-in world's default one if it is absent) and its training windows."""
    root = Path(cfg.data or cfg.world_data)
    if not cfg.data and not (root / data.MANIFEST).exists():
        if rank == 0:
            start = time.perf_counter()
            world.generate_dataset(root, episodes_per_task=cfg.world_episodes, seed=cfg.seed)
            print(f"data: generated {root} in {time.perf_counter() - start:.1f}s", flush=True)
        if world_size > 1:
            dist.barrier()
    try:
        dataset = data.Dataset(root)
    except (OSError, ValueError) as e:   # missing, truncated or inconsistent files: data.py names the file
        raise SystemExit(f"data: {e}") from None
    source = dataset.manifest.get("source", {})
    has_world = source.get("generator") == "world.generate_dataset"
    episodes = np.arange(len(dataset))
    held_out = np.array([], dtype=np.int64)
    if not has_world:   # no environment to evaluate in: keep some episodes back for the action error
        n = max(1, round(cfg.holdout * len(dataset)))
        held_out, episodes = episodes[-n:], episodes[:-n]
    spec = window_spec(cfg)
    text = data.TextEncoder(cfg.text_length, video_config(cfg, dataset).text_dim)
    return dataset, spec, data.Windows(dataset, spec, text, episodes), held_out, (source if has_world else None)


def video_config(cfg, dataset):
    vc = video_model.preset(cfg.video.model)
    if cfg.video.pretrained:
        return vc
    channels = data.SpaceToDepth(cfg.tokenizer_factor).channels(dataset.manifest["frame_shape"][2])
    return replace(vc, in_channels=channels, patch=cfg.video.patch, num_heads=cfg.video.heads or vc.num_heads,
                   num_layers=cfg.video.layers or vc.num_layers)


def build_video(cfg, dataset, device):
    if cfg.video.pretrained:
        video = video_model.VideoDiT.from_pretrained(cfg.video.pretrained)
        channels = data.SpaceToDepth(cfg.tokenizer_factor).channels(dataset.manifest["frame_shape"][2])
        if video.cfg.in_channels != channels:
            raise SystemExit(f"{cfg.video.pretrained} takes {video.cfg.in_channels}-channel VAE latents, but the "
                             f"latent stand-in makes {channels} channels from these frames; a real video tokenizer "
                             f"(the Wan2.1 VAE) is not part of this project yet")
        video.add_lora(cfg.video.lora_rank, cfg.video.lora_alpha)
    else:
        video = video_model.VideoDiT(video_config(cfg, dataset))
    return video.to(device)


def build_decoder(cfg, dataset, video):
    dc = decoder_preset(cfg.action.model, H_a=cfg.horizon, action_dim=dataset.manifest["action_dim"],
                        proprio_dim=dataset.manifest["proprio_dim"], video_dim=video.cfg.width,
                        tau_a_alpha=cfg.action.tau_a_alpha, tau_a_beta=cfg.action.tau_a_beta,
                        context_tokens=video_tokens(cfg, dataset, video) if cfg.action.positions else 0)
    return ActionDecoder(dc)


def window_spec(cfg):
    return data.WindowSpec(cfg.history, cfg.horizon, cfg.history_stride, cfg.future_stride, cfg.future_frames)


def video_tokens(cfg, dataset, video):
    """Tokens of one window in the video model: (H_o + F) latent frames of (H / f / p) x (W / f / p) patches."""
    height, width, _ = dataset.manifest["frame_shape"]
    frames = cfg.history + window_spec(cfg).future
    per_side = cfg.tokenizer_factor * video.cfg.patch
    return frames * (height // per_side) * (width // per_side)


def run_meta(cfg, dataset, source):
    """What sample.py needs to rebuild the policy of this run."""
    return {"k": cfg.action.k, "window": asdict(window_spec(cfg)),
            "tokenizer_factor": cfg.tokenizer_factor, "text_length": cfg.text_length, "tau_v": cfg.eval.tau_v,
            "action_steps": cfg.eval.action_steps, "replan": cfg.eval.replan,
            "tasks": source["tasks"] if source else None, "world_config": source["config"] if source else None}


def save_model(path, model, cfg, dataset, source):
    save_atomic(path, model.state_dict(), {"model_config": asdict(model.cfg), "run": run_meta(cfg, dataset, source),
                                           "stats": {"proprio_range": dataset.manifest["proprio_range"],
                                                     "action_range": dataset.manifest["action_range"]},
                                           "config": asdict(cfg)})

# ----------------------------------------------------------------------------- evaluation


def held_out_error(policy, dataset, spec, episodes, max_windows=512):
    """Mean squared error of sampled chunks against the recorded ones on held-out episodes, in normalised units."""
    windows = data.Windows(dataset, spec, policy.text_encoder, episodes)
    ids = np.linspace(0, len(windows) - 1, min(max_windows, len(windows))).astype(int)
    errs = []
    for chunk in np.array_split(ids, max(1, len(ids) // 64)):
        b = windows.batch(chunk)
        pred = policy.act_batch(b["frames"][:, :spec.history].numpy(), [dataset.instructions[e] for e in b["episode"]],
                                b["proprio"].numpy())
        errs.append(((policy.action_norm(torch.as_tensor(pred)) - policy.action_norm(b["actions"])) ** 2)
                    .mean(dim=(1, 2)).numpy())
    return float(np.concatenate(errs).mean())


def evaluate(cfg, video, decoder, dataset, spec, held_out, source):
    stats = {"proprio_range": dataset.manifest["proprio_range"], "action_range": dataset.manifest["action_range"]}
    policy = VAMPolicy(video, decoder, spec, stats, k=cfg.action.k, tau_v=cfg.eval.tau_v,
                       video_steps=cfg.eval.video_steps, action_steps=cfg.eval.action_steps,
                       tokenizer_factor=cfg.tokenizer_factor, text_length=cfg.text_length, seed=cfg.seed)
    if source is None:
        mse = held_out_error(policy, dataset, spec, held_out)
        return {"held_out_action_mse": mse, "held_out_episodes": len(held_out)}, \
            f"held-out action MSE {mse:.4f} (normalised units, {len(held_out)} episodes)"
    gif = Path(cfg.out) / "rollouts.gif" if cfg.eval.gif else None
    result = world.evaluate(policy, source["tasks"], cfg.eval.episodes, replan_every=cfg.eval.replan,
                            history=spec.history, history_stride=spec.history_stride,
                            config=world.WorldConfig(**source["config"]), gif_path=gif,
                            imagine=policy.imagine if gif else None)
    lo, hi = result.interval
    n = sum(result.episodes.values())
    return result.to_json(), (f"{result.summary()}\nsuccess {result.mean:.1%} (95% CI [{lo:.1%}, {hi:.1%}]) over "
                              f"{n} held-out episodes")

# ----------------------------------------------------------------------------- main


def main(argv=None):
    cfg, resume = parse_args(argv)
    rank, world_size, device = setup(cfg)
    ctx = {"rank": rank, "world_size": world_size, "device": device, "resume": resume}
    for stage in ("video", "action"):
        if getattr(cfg, stage).batch_size % world_size:
            raise SystemExit(f"--{stage}.batch_size {getattr(cfg, stage).batch_size} does not split over "
                             f"{world_size} processes")
    out = Path(cfg.out)
    if not resume and any(out.glob("*.safetensors")):
        raise SystemExit(f"{out} already holds a run; pass --resume to continue it, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    dataset, spec, windows, held_out, source = load_data(cfg, rank, world_size)
    tokenizer = data.SpaceToDepth(cfg.tokenizer_factor)
    m = dataset.manifest
    log(rank, f"data: {len(dataset)} episodes, {len(windows)} training windows; frames {m['frame_shape']}, "
              f"proprio {m['proprio_dim']}, actions {m['action_dim']}; world size {world_size}, {device}")
    times = {}

    # stage 1: the video model
    t = time.perf_counter()
    video = build_video(cfg, dataset, device)
    video_path = out / "video.safetensors"
    if resume and video_path.exists():
        video, _ = load_model(video_path, video_model.VideoDiT, video_model.VideoDiTConfig, device)
        log(rank, f"video: stage 1 already finished, loaded {video_path}")
    else:
        video.train()
        train_stage("video", video, lambda g: video_loss(video, video_batch(g, windows, tokenizer,
                                                                             cfg.video.batch_size, ctx),
                                                          spec.history), cfg.video, cfg, ctx)
        if cfg.video.pretrained:
            video.fuse_lora()
        if rank == 0:
            save_model(video_path, video, cfg, dataset, source)
    video.requires_grad_(False).eval()
    times["video"] = time.perf_counter() - t

    # stage 2: the action decoder on the frozen video model's layer-k states
    t = time.perf_counter()
    decoder = build_decoder(cfg, dataset, video).to(device)
    norms = (Normalizer(dataset.manifest["proprio_range"]), Normalizer(dataset.manifest["action_range"]))
    action_path = out / "action.safetensors"
    if resume and action_path.exists():
        decoder, _ = load_model(action_path, ActionDecoder, type(decoder.cfg), device)
        log(rank, f"action: stage 2 already finished, loaded {action_path}")
    else:
        decoder.train()
        train_stage("action", decoder, lambda g: action_loss(
            video, decoder, action_batch(g, windows, tokenizer, norms, cfg.action, decoder.cfg, ctx),
            spec.history, cfg.action.k), cfg.action, cfg, ctx)
        if rank == 0:
            save_model(action_path, decoder, cfg, dataset, source)
    decoder.eval()
    times["action"] = time.perf_counter() - t

    # closed-loop evaluation (or the held-out action error)
    if rank == 0:
        t = time.perf_counter()
        results, summary = evaluate(cfg, video, decoder, dataset, spec, held_out, source)
        times["eval"] = time.perf_counter() - t
        times["total"] = time.perf_counter() - start
        results.update({"seconds": times, "config": asdict(cfg), "world_size": world_size, "device": str(device)})
        (out / "results.json").write_text(json.dumps(results, indent=1))
        print(summary)
        print(f"time: stage 1 {times['video']:.0f}s, stage 2 {times['action']:.0f}s, evaluation {times['eval']:.0f}s, "
              f"total {times['total']:.0f}s; results in {out / 'results.json'}", flush=True)
    if world_size > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
