"""Train a Video-Action Model in the paper's two stages, then evaluate it in closed loop.

    python train.py                                   # built-in world: data, stage 1, stage 2, evaluation (CPU)
    python train.py --preset world-long               # the former default trained longer (36 min, 75% in Nov.)
    python train.py --data DIR --out OUT              # any dataset in data.py's format
    python train.py --video.steps 2000 --action.lr 3e-4 ...   # any config field; see --help
    python train.py --resume                          # continue a killed run from its last checkpoint
    torchrun --nproc_per_node 2 train.py ...          # data parallel (gloo on CPU, NCCL on GPUs)

Stage 1 (video): the video DiT learns the flow of the future latent frames given the clean history frames and the
instruction (Video2World), tau_v logit-normal. On the built-in world the tiny DiT is trained from scratch, the
stand-in for pretraining; with --video.pretrained a Cosmos checkpoint is adapted with LoRA (the paper's recipe).
Stage 2 (action): the video model is frozen; the action decoder learns the action flow from its layer-k states,
taken on ground-truth future latents noised to a sampled tau_v (with --action.cache, as the built-in world's
default does, looked up in states computed once before stage 2: feature_cache.py).

One optimiser step (train_stage): a generator seeded by (seed, stage, step) draws the global batch of training
windows and every random number of the step (draw_video_batch, draw_action_batch: tau, noise, proprio dropout);
each process takes its rows; the loss (video_loss, action_loss); gradients averaged over processes; AdamW. So a
resumed run sees the same data as an uninterrupted one, and N data-parallel processes compute the same averaged
gradient as one process.

Not here: the configuration and its presets (config.py), the checkpoint files (checkpoints.py), processes, data
parallelism and FSDP2 (parallel.py), the policy and its inference (sample.py).
"""
import json
import math
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import checkpoints
import config
import cosmos_weights
import data
import encoders
import evaluation
import expert
import flow
import latent_data
import parallel
import video_model
import world
from action_decoder import ActionDecoder, ActionDecoderConfig, preset as decoder_preset
from feature_cache import FeatureCache
from sample import VAMPolicy

# ----------------------------------------------------------------------------- one step of each stage


@dataclass
class VideoBatch:
    x0: torch.Tensor      # (B, C, H_o + F, h, w) clean latents: history frames, then the future
    text: torch.Tensor    # (B, L, D) text states
    tau_v: torch.Tensor   # (B,) video flow time
    eps: torch.Tensor     # like x0: the noise


@dataclass
class ActionBatch:
    x0: torch.Tensor | None     # (B, C, H_o + F, h, w) clean latents (None with a FeatureCache)
    text: torch.Tensor          # (B, L, D)
    tau_v: torch.Tensor         # (B,) the video flow time the decoder reads the states at
    eps_v: torch.Tensor | None  # like x0: the video noise (None with a FeatureCache)
    window: torch.Tensor        # (B,) the training windows' indices
    draw: torch.Tensor | None   # (B,) with a FeatureCache: which of its noise draws
    proprio: torch.Tensor       # (B, P) normalised to [-1, 1]
    actions: torch.Tensor       # (B, H_a, A) normalised to [-1, 1]
    tau_a: torch.Tensor         # (B,) action flow time
    eps_a: torch.Tensor         # like actions: the action noise
    drop_proprio: torch.Tensor  # (B,) bool: the proprio token is the mask token


def draw_video_batch(g, windows, tokenizer, batch_size):
    """A global batch for stage 1 and all its random draws: windows, tau_v (Cosmos' logit-normal), noise."""
    b = windows.sample(batch_size, g)
    x0 = latent_data.clean_latents(b, tokenizer)
    tau_v = flow.sample_tau_video(batch_size, x0.shape[2], g)
    return VideoBatch(x0, b["text"], tau_v, torch.randn(x0.shape, generator=g))


def draw_action_batch(g, windows, tokenizer, norms, s, cache=None):
    """A global batch for stage 2 and all its random draws: windows; tau_v (uniform on (0, 1] or fixed) and the
    video noise, or with a FeatureCache which of its draws (and that draw's tau_v); tau_a ~ 0.001 + 0.999 Beta(alpha, beta) and the
    action noise; which proprio tokens are dropped.
    With s.repeats = R > 1 it draws B / R video examples (window, tau_v, video noise) and tiles them R times, each
    copy with its own action draws (tau_a, action noise, proprio dropout): rows j and j + B / R share a video
    example, so action_loss runs the frozen video model on the first B / R rows of each process's slice only."""
    B, R = s.batch_size, s.repeats
    window = torch.randint(len(windows), (B // R,), generator=g)
    b = windows.batch(window.numpy())
    if cache is None:
        x0 = latent_data.clean_latents(b, tokenizer)
        tau_v = 1 - torch.rand(B // R, generator=g) if s.tau_v == "uniform" else torch.full((B // R,), float(s.tau_v))
        eps_v, draw = torch.randn(x0.shape, generator=g), None
    else:
        x0, eps_v, draw = None, None, torch.randint(cache.draws, (B // R,), generator=g)
        tau_v = cache.tau_vs[draw, window]
    tau_a = flow.sample_tau_action(B, s.tau_a_alpha, s.tau_a_beta, g)
    eps_a = torch.randn((B, *b["actions"].shape[1:]), generator=g)
    drop = torch.rand(B, generator=g) < s.proprio_dropout
    tile = lambda t: None if t is None else t.repeat(R, *(1,) * (t.ndim - 1))   # noqa: E731
    return ActionBatch(tile(x0), tile(b["text"]), tile(tau_v), tile(eps_v), tile(window), tile(draw),
                       tile(norms[0](b["proprio"])), tile(norms[1](b["actions"])), tau_a, eps_a, drop)


def video_loss(video, batch, n_cond):
    """Flow matching on the future latent frames:  || v_theta(x_tau, tau | context, text) - (eps - x0) ||^2,
    x_tau = (1 - tau_v) x0 + tau_v eps; the n_cond context frames are given clean and carry no loss.
    Returns (mean loss, per-sample losses, per-sample tau)."""
    x_tau = flow.interpolate(batch.x0, batch.eps, batch.tau_v)
    v = video.video2world_velocity(x_tau, batch.tau_v, batch.text, batch.x0, n_cond)
    err = (v - flow.velocity_target(batch.x0, batch.eps))[:, :, n_cond:].float().pow(2)
    per_sample = err.mean(dim=(1, 2, 3, 4))
    return per_sample.mean(), per_sample, batch.tau_v


def action_loss(video, decoder, batch, n_cond, k, repeats=1, cache=None):
    """The decoder's flow loss on the frozen video model's layer-k states, which it reads from ground-truth future
    latents noised to tau_v (the states the video model would give mid-way through denoising), or looks up in a
    FeatureCache. repeats: the batch is its first len / repeats rows tiled (draw_action_batch), so the states of
    those rows serve every copy."""
    n = len(batch.tau_v) // repeats
    if cache is not None:
        states = cache.lookup(batch.draw[:n], batch.window[:n])
    else:
        with torch.no_grad():
            x_tau = flow.interpolate(batch.x0[:n], batch.eps_v[:n], batch.tau_v[:n])
            states = video.video2world_hidden_states(x_tau, batch.tau_v[:n], batch.text[:n], batch.x0[:n], n_cond, k)
    states = states.repeat(repeats, 1, 1)
    per_sample = decoder.loss(states, batch.tau_v, batch.proprio, batch.actions, batch.tau_a, batch.eps_a,
                              batch.drop_proprio)
    return per_sample.mean(), per_sample, batch.tau_a

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


class TauBinnedLoss:
    """The loss averaged per bin of the flow time since the last log line: the flow-matching diagnostic. Near
    tau = 0 the input is almost clean and the noise it must predict almost invisible, so the loss is highest there."""
    BINS = (0.0, 0.25, 0.5, 0.75, 1.0)

    def __init__(self):
        self.sums, self.counts = np.zeros(len(self.BINS) - 1), np.zeros(len(self.BINS) - 1)

    def add(self, per_sample, tau):
        which = np.clip(np.digitize(tau.detach().cpu().numpy(), self.BINS) - 1, 0, len(self.BINS) - 2)
        np.add.at(self.sums, which, per_sample.detach().float().cpu().numpy())
        np.add.at(self.counts, which, 1)

    def pop(self):
        text = " ".join(f"{s / n:.3f}" if n else "-" for s, n in zip(self.sums, self.counts))
        self.sums[:], self.counts[:] = 0, 0
        return f"by tau [0,.25,.5,.75,1]: {text}"


def train_stage(stage, module, step_loss, s, cfg, rt, resume, sharded=False):
    """Optimise module's trainable parameters with AdamW for s.steps steps of step_loss(generator) ->
    (mean loss, per-sample losses, per-sample tau). Resumable from {stage}.state.safetensors in cfg.out.
    sharded: module is FSDP2-sharded (shard()), which averages the gradients itself.
    With s.ema > 0 the weights' exponential moving average is kept beside them and copied into them at the end."""
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": s.weight_decay},
                             {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}], lr=s.lr)
    ema = [p.detach().clone() for p in params] if s.ema else None
    state_path = Path(cfg.out) / f"{stage}.state.safetensors"
    step = _resume_state(state_path, module, opt, ema, cfg, sharded) if resume and state_path.exists() else 0
    rt.log(f"{stage}: {s.steps} steps, batch {s.batch_size}, {sum(p.numel() for p in params):,} trainable parameters"
           + (f"; resuming at step {step} from {state_path}" if step else ""))
    binned, t0, first, last_good = TauBinnedLoss(), time.perf_counter(), step, step
    while step < s.steps:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, s)
        with rt.autocast():
            loss, per_sample, tau = step_loss(step_generator(cfg.seed, stage, step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if rt.world_size > 1:   # every process saw its rows of the global batch: average over processes
            if not sharded:     # (FSDP2 has reduce-scattered the averaged gradients in the backward)
                parallel.average_gradients(params, rt.world_size)
            loss = loss.detach().clone()
            dist.all_reduce(loss)
            loss /= rt.world_size
        if not torch.isfinite(loss):
            where = f"{state_path} (step {last_good})" if last_good else "none (no checkpoint yet)"
            raise SystemExit(f"{stage} stage: the loss is {loss.item()} at step {step}; stopping. The last good "
                             f"checkpoint is {where}; lower --{stage}.lr or check the data")
        torch.nn.utils.clip_grad_norm_(params, s.grad_clip)
        opt.step()
        if ema:   # ema <- ema + (1 - d) (theta - ema), d = min(s.ema, (1 + step) / (10 + step))
            with torch.no_grad():
                torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - min(s.ema, (1 + step) / (10 + step)))
        step += 1
        binned.add(per_sample, tau)
        if step % cfg.log_every == 0 or step == s.steps:
            elapsed = time.perf_counter() - t0
            rate = (step - first) / elapsed
            rt.log(f"{stage} {step:6d}/{s.steps} | loss {loss.item():.4f} | {binned.pop()} | "
                   f"lr {lr_at(step - 1, s):.2e} | {rate * s.batch_size:.0f} samples/s | "
                   f"{elapsed:.0f}s, eta {(s.steps - step) / rate:.0f}s")
        if step % cfg.ckpt_every == 0 or step == s.steps:
            tensors = checkpoints.state_tensors(module, opt, ema)
            if sharded:   # every process gathers; one writes
                tensors = parallel.whole(tensors)
            if rt.rank == 0:
                checkpoints.save_state(state_path, tensors, step, asdict(cfg))
            last_good = step
    if ema:
        with torch.no_grad():
            torch._foreach_copy_(params, ema)
    return step


def _resume_state(path, module, opt, ema, cfg, sharded):
    try:
        return checkpoints.load_state(path, module, opt, asdict(cfg), parallel.shard_like if sharded else None, ema)
    except ValueError as e:
        raise SystemExit(f"{e}; delete it to restart that stage") from None


# ----------------------------------------------------------------------------- data and models


@dataclass
class RunData:
    """What both stages train on: the dataset, its training windows, the frozen encoders, and what the run is
    evaluated on."""
    dataset: data.Dataset    # or a latent_data.LatentDataset (windows pre-encoded by the real encoders)
    spec: data.WindowSpec
    windows: data.Windows    # or latent_data.LatentWindows: stage 1's
    action_windows: object   # stage 2's: the same, or those of --action.episodes per task
    held_out: np.ndarray     # episodes kept back for the action error (datasets without an environment)
    source: dict             # how the built-in world made the dataset (its tasks, config); None for other datasets
    encoders: dict           # the frozen encoders' description (encoders.build), recorded for the policy
    tokenizer: object        # the video encoder (encoders.py); None for pre-encoded latents, which need none
    latent_shape: tuple      # (C, T_lat, h, w): one window's latents
    n_cond: int              # its context latent frames, those of the H_o history frames (Video2World)
    text_dim: int            # width of the text states


def load_data(cfg, rt):
    """The dataset (generating the built-in world's default one if it is absent) and its training windows."""
    root = Path(cfg.data or cfg.world_data)
    if not cfg.data and not (root / data.MANIFEST).exists():
        if rt.rank == 0:
            start = time.perf_counter()
            expert.generate_dataset(root, episodes_per_task=cfg.world_episodes, seed=cfg.seed)
            print(f"data: generated {root} in {time.perf_counter() - start:.1f}s", flush=True)
        if rt.world_size > 1:
            dist.barrier()
    latent = latent_data.is_latent_dataset(root)
    try:
        dataset = latent_data.LatentDataset(root) if latent else data.Dataset(root)
    except (OSError, ValueError) as e:   # missing, truncated or inconsistent files: data.py names the file
        raise SystemExit(f"data: {e}") from None
    source = dataset.manifest.get("source", {})
    has_world = source.get("generator") in (expert.GENERATOR, *expert.FORMER_GENERATORS)
    episodes, held_out = np.arange(len(dataset)), np.array([], dtype=np.int64)
    if not has_world:   # no environment to evaluate in: keep some episodes of each task back for the action error
        episodes, held_out = data.split_by_task(dataset.tasks, cfg.holdout)
        rt.log(f"data: held out {len(held_out)} episodes ({cfg.holdout:.0%} of each task's, its last ones): "
               f"{held_out.tolist()}")
    made = {"seed": cfg.seed, "episodes_per_task": cfg.world_episodes}
    if not cfg.data and has_world and any(source.get(k, v) != v for k, v in made.items()):
        # the built-in world's dataset is reused where it exists, even if another --seed or --world_episodes made it
        rt.log(f"data: note: {root} was generated with seed {source.get('seed')} and {source.get('episodes_per_task')}"
               f" demonstrations per task, not this run's {cfg.seed} and {cfg.world_episodes}; it is used as it is "
               f"(another --world_data generates this run's own)")
    source = source if has_world else None
    labelled = data.first_per_task(dataset.tasks, episodes, cfg.action.episodes) if cfg.action.episodes else episodes
    if cfg.action.episodes:
        rt.log(f"data: stage 2 on the first {cfg.action.episodes} training episodes of each task ({len(labelled)} "
               f"of {len(episodes)}); stage 1 on all")
    if latent:
        if cfg.video.static:
            raise SystemExit(f"--video.static needs the frames: {root} holds pre-encoded windows with their future")
        return latent_run(cfg, rt, dataset, episodes, labelled, held_out)
    spec, encoder_spec, static = window_spec(cfg), encoders_of(cfg), cfg.video.static
    try:
        tokenizer, text = encoders.build(encoder_spec, rt.device)
        windows = data.Windows(dataset, spec, text, episodes, future=not static)
        action_windows = windows if cfg.action.episodes == 0 else \
            data.Windows(dataset, spec, text, labelled, future=not static)
        height, width, channels = dataset.manifest["frame_shape"]
        latent_shape = (tokenizer.channels(channels), tokenizer.latent_frames(spec.history + (0 if static else
                                                                                              spec.future)),
                        *tokenizer.latent_size(height, width))
    except ValueError as e:   # e.g. an instruction longer than the text encoder holds, or no VAE in a folder
        raise SystemExit(f"data: {e}") from None
    # the static-image control denoises its history frames from the text alone: no context frame
    n_cond = 0 if static else tokenizer.latent_frames(spec.history)
    return RunData(dataset, spec, windows, action_windows, held_out, source, encoder_spec, tokenizer, latent_shape,
                   n_cond, text.dim)


def latent_run(cfg, rt, dataset, episodes, labelled, held_out):
    """A pre-encoded dataset's RunData: its window, latents and text states as they were encoded (no encoder is
    built). The window flags must be the ones it was encoded with."""
    asked, m = window_spec(cfg), dataset.manifest
    differ = [f"--{f.name} {getattr(asked, f.name)} (encoded: {getattr(dataset.spec, f.name)})"
              for f in fields(asked) if getattr(asked, f.name) != getattr(dataset.spec, f.name)]
    if differ:
        raise SystemExit(f"data: {dataset.root} was pre-encoded with another window; train with its settings: "
                         + ", ".join(differ))
    rt.log(f"data: pre-encoded latents {m['latent_shape']} ({m['dtype']}), {m['context_frames']} context frames; "
           f"encoders {m['encoders']['video']['kind']} + {m['encoders']['text']['kind']} (not run in training)")
    return RunData(dataset, dataset.spec, latent_data.LatentWindows(dataset, episodes),
                   latent_data.LatentWindows(dataset, labelled), held_out, None,
                   m["encoders"], None, tuple(m["latent_shape"]), m["context_frames"], m["text"]["dim"])


def encoders_of(cfg):
    """The frozen encoders the configuration asks for (--encoders), as encoders.build's description."""
    if cfg.encoders == "cosmos":
        size = tuple(int(v) for v in cfg.resolution.split("x")) if cfg.resolution else None
        return encoders.cosmos_spec(cfg.encoder_source, size)
    return encoders.stand_in_spec(cfg.tokenizer_factor, cfg.text_length,
                                  video_model.preset(cfg.video.model).text_dim)


def video_config(cfg, run):
    vc = video_model.preset(cfg.video.model)
    if cfg.video.pretrained:
        return vc
    return replace(vc, in_channels=run.latent_shape[0], text_dim=run.text_dim, patch=cfg.video.patch,
                   num_heads=cfg.video.heads or vc.num_heads, num_layers=cfg.video.layers or vc.num_layers)


def build_video(cfg, run, device):
    """The video model: the preset from scratch, or a pretrained Cosmos checkpoint with LoRA adapters (its frozen
    weights in bf16 where --precision resolves to bf16, the adapters fp32)."""
    if not cfg.video.pretrained:
        video = video_model.VideoDiT(video_config(cfg, run))
        video.checkpoint_blocks = cfg.video.checkpointing
        return video.to(device)
    try:
        bf16 = parallel.uses_bf16(cfg.precision, torch.device(device))
        video = cosmos_weights.from_pretrained(cfg.video.pretrained, dtype=torch.bfloat16 if bf16 else torch.float32)
    except (OSError, ValueError) as e:
        raise SystemExit(f"--video.pretrained: {e}") from None
    found = (run.latent_shape[0], run.text_dim)
    if (video.cfg.in_channels, video.cfg.text_dim) != found:   # a mismatch refused before any training
        raise SystemExit(f"{cfg.video.pretrained} takes {video.cfg.in_channels}-channel latents and "
                         f"{video.cfg.text_dim}-wide text states, but the encoders ({run.encoders['video']['kind']}, "
                         f"{run.encoders['text']['kind']}) give {found[0]} and {found[1]} (Cosmos reads the Wan2.1 "
                         f"VAE's and T5's: --encoders cosmos)")
    video.add_lora(cfg.video.lora_rank, cfg.video.lora_alpha)
    video.checkpoint_blocks = cfg.video.checkpointing
    return video.to(device)


def build_decoder(cfg, run, video):
    m = run.dataset.manifest
    dc = decoder_preset(cfg.action.model, H_a=cfg.horizon, action_dim=m["action_dim"], proprio_dim=m["proprio_dim"],
                        video_dim=video.cfg.width,
                        context_tokens=video_tokens(run, video.cfg) if cfg.action.positions else 0)
    return ActionDecoder(dc)


def check_against(cfg, run, video_cfg):
    """What the configuration asks of this dataset and video model, refused before stage 1 with the reason."""
    height, width, _ = run.dataset.manifest["frame_shape"]
    per_side = cfg.tokenizer_factor * video_cfg.patch
    _, _, h, w = run.latent_shape
    if run.encoders["video"]["kind"] == "space-to-depth" and (height % per_side or width % per_side):
        raise SystemExit(f"the frames of {run.dataset.root} are {height}x{width}, which the video tokens do not "
                         f"tile: they need multiples of --tokenizer_factor x patch = {cfg.tokenizer_factor} x "
                         f"{video_cfg.patch} = {per_side}")
    if h % video_cfg.patch or w % video_cfg.patch:
        raise SystemExit(f"the latents of {run.dataset.root} are {h}x{w}, which the video model's patch "
                         f"{video_cfg.patch} does not tile (frames: multiples of 16 for the Wan VAE, --resolution)")
    if not 0 <= cfg.action.k < video_cfg.num_layers:
        raise SystemExit(f"--action.k must name one of the video model's blocks, 0 .. {video_cfg.num_layers - 1}, "
                         f"got {cfg.action.k}")


def window_spec(cfg):
    return data.WindowSpec(cfg.history, cfg.horizon, cfg.history_stride, cfg.future_stride, cfg.future_frames)


def video_tokens(run, video_cfg):
    """Tokens of one window in the video model: T_lat latent frames of (h / p) x (w / p) patches."""
    _, T, h, w = run.latent_shape
    return T * (h // video_cfg.patch) * (w // video_cfg.patch)


def run_meta(cfg, run_data):
    """What sample.VAMPolicy needs to rebuild this run's policy, stored with both checkpoints."""
    m, source = run_data.dataset.manifest, run_data.source
    return {"k": cfg.action.k, "window": asdict(run_data.spec), "tokenizer_factor": cfg.tokenizer_factor,
            "text_length": cfg.text_length, "encoders": run_data.encoders, "context_frames": run_data.n_cond,
            "latent_frames": run_data.latent_shape[1], "frame_shape": m["frame_shape"],
            "proprio_range": m["proprio_range"], "action_range": m["action_range"], "tau_v": cfg.eval.tau_v,
            "video_steps": cfg.eval.video_steps, "action_steps": cfg.eval.action_steps, "replan": cfg.eval.replan,
            "action_temperature": cfg.eval.action_temperature,
            "tasks": source["tasks"] if source else None, "world_config": source["config"] if source else None,
            "static": cfg.video.static}

# ----------------------------------------------------------------------------- the two stages


def load_finished(path, model_class, config_class, rt):
    try:
        model, _ = checkpoints.load_model(path, model_class, config_class, rt.device)
    except ValueError as e:
        raise SystemExit(f"{e}; delete it to retrain that stage") from None
    rt.log(f"{path.stem}: stage already finished, loaded {path}")
    return model


def video_stage(cfg, rt, run, video, resume):
    """Stage 1: the video model learns the Video2World flow of the future frames. Returns it frozen."""
    path = Path(cfg.out) / "video.safetensors"
    if resume and path.exists():
        video = load_finished(path, video_model.VideoDiT, video_model.VideoDiTConfig, rt)
    else:
        def step_loss(g):
            return video_loss(video, rt.rows(draw_video_batch(g, run.windows, run.tokenizer, cfg.video.batch_size)),
                              run.n_cond)

        sharded = cfg.parallel == "fsdp" and rt.world_size > 1
        if sharded:
            video = parallel.shard(video)
        video.train()
        train_stage("video", video, step_loss, cfg.video, cfg, rt, resume, sharded)
        if sharded:
            video = parallel.gathered(video)
        if cfg.video.pretrained:
            video.fuse_lora()   # in fp32, then one cast to the base's dtype
        if rt.rank == 0:
            checkpoints.save_model(path, video, {"run": run_meta(cfg, run), "config": asdict(cfg)})
    return video.requires_grad_(False).eval()


def action_stage(cfg, rt, run, video, resume):
    """Stage 2: the action decoder learns the action flow from the frozen video model's layer-k states."""
    decoder = build_decoder(cfg, run, video).to(rt.device)
    path = Path(cfg.out) / "action.safetensors"
    if resume and path.exists():
        return load_finished(path, ActionDecoder, ActionDecoderConfig, rt).eval()
    norms = (data.Normalizer(run.dataset.manifest["proprio_range"]),
             data.Normalizer(run.dataset.manifest["action_range"]))

    cache = None
    if cfg.action.cache:
        cache = FeatureCache(video, run.action_windows, run.tokenizer, run.n_cond, cfg.action.k, cfg.action.tau_v,
                             cfg.action.cache, cfg.seed, rt)

    def step_loss(g):
        batch = rt.rows(draw_action_batch(g, run.action_windows, run.tokenizer, norms, cfg.action, cache))
        return action_loss(video, decoder, batch, run.n_cond, cfg.action.k, cfg.action.repeats, cache)

    decoder.train()
    train_stage("action", decoder, step_loss, cfg.action, cfg, rt, resume)
    if rt.rank == 0:
        checkpoints.save_model(path, decoder, {"run": run_meta(cfg, run), "config": asdict(cfg)})
    return decoder.eval()

# ----------------------------------------------------------------------------- evaluation


def evaluate(cfg, policy, run):
    """(results for results.json, summary lines): closed-loop success in the built-in world, or else the held-out
    action error."""
    if run.source is None:
        if not len(run.held_out):
            return {"held_out_episodes": 0}, "no held-out episodes (--holdout 0): nothing to evaluate"
        mse = evaluation.held_out_error(policy, run.dataset, run.spec, run.held_out)
        return {"held_out_action_mse": mse, "held_out_episodes": len(run.held_out)}, \
            f"held-out action MSE {mse:.4f} (normalised units, {len(run.held_out)} episodes)"
    gif = Path(cfg.out) / "rollouts.gif" if cfg.eval.gif else None
    imagine = policy.imagine if gif and not cfg.video.static else None
    result = world.evaluate(policy, run.source["tasks"], cfg.eval.episodes, world.WorldConfig(**run.source["config"]),
                            gif_path=gif, imagine=imagine, replan_every=cfg.eval.replan,
                            history=run.spec.history, history_stride=run.spec.history_stride)
    lo, hi = result.interval
    return result.to_json(), (f"{result.summary()}\nsuccess {result.mean:.1%} (95% CI [{lo:.1%}, {hi:.1%}]) over "
                              f"{sum(result.episodes.values())} held-out episodes")

# ----------------------------------------------------------------------------- main


def main(argv=None):
    cfg, resume = config.parse_args(argv, __doc__)
    rt = parallel.setup(cfg)
    for stage in ("video", "action"):
        if getattr(cfg, stage).batch_size % rt.world_size:
            raise SystemExit(f"--{stage}.batch_size {getattr(cfg, stage).batch_size} does not split over "
                             f"{rt.world_size} processes")
    if cfg.action.batch_size // cfg.action.repeats % rt.world_size:
        raise SystemExit(f"--action.batch_size / --action.repeats = {cfg.action.batch_size // cfg.action.repeats} "
                         f"video examples do not split over {rt.world_size} processes")
    out = Path(cfg.out)
    if not resume and any(out.glob("*.safetensors")):
        raise SystemExit(f"{out} already holds a run; pass --resume to continue it, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    start, times = time.perf_counter(), {}
    torch.manual_seed(cfg.seed)
    run = load_data(cfg, rt)
    m = run.dataset.manifest
    rt.log(f"data: {len(run.dataset)} episodes, {len(run.windows)} training windows; frames {m['frame_shape']}, "
           f"proprio {m['proprio_dim']}, actions {m['action_dim']}; world size {rt.world_size}, {rt.device}, "
           f"{'bf16 autocast' if rt.bf16 else 'fp32'} (--precision {cfg.precision})")
    video = build_video(cfg, run, rt.device)
    check_against(cfg, run, video.cfg)
    t = time.perf_counter()
    video = video_stage(cfg, rt, run, video, resume)
    times["video"] = time.perf_counter() - t
    prediction = None   # the static-image control has no future to predict
    if not cfg.video.static:
        prediction = evaluation.video_prediction_error(video, run.windows, run.tokenizer, run.n_cond, rt.device)
        rt.log(f"video: one-step prediction of the future latents from noise, MSE {prediction['one_step_mse']:.4f} "
               f"(predicting that nothing moves: {prediction['nothing_moves_mse']:.4f}; {prediction['windows']} "
               f"training windows)")
    t = time.perf_counter()
    decoder = action_stage(cfg, rt, run, video, resume)
    times["action"] = time.perf_counter() - t
    if rt.rank == 0:
        t = time.perf_counter()
        policy = VAMPolicy(video, decoder, run_meta(cfg, run), seed=cfg.seed)
        results, summary = evaluate(cfg, policy, run)
        times.update(eval=time.perf_counter() - t, total=time.perf_counter() - start)
        results.update({"video_prediction": prediction, "seconds": times, "config": asdict(cfg),
                        "world_size": rt.world_size, "device": str(rt.device), "bf16_autocast": rt.bf16})
        (out / "results.json").write_text(json.dumps(results, indent=1))
        print(summary)
        print(f"time: stage 1 {times['video']:.0f}s, stage 2 {times['action']:.0f}s, evaluation {times['eval']:.0f}s, "
              f"total {times['total']:.0f}s; results in {out / 'results.json'}", flush=True)
    if rt.world_size > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
