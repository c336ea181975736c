"""Pre-encoding: a dataset turned, once, into training data for the real models (latent_data.py's format), so that
training never runs the VAE or T5. Every training window's H_o + F frames go through the Wan2.1 VAE as one clip,
every distinct instruction through T5; proprio and action chunks go along.

    python preencode.py ~/data/libero data/libero-latents --camera observation.images.image --rotation axis-angle
    python train.py --preset cosmos-2b --data data/libero-latents

The window defaults to the cosmos-2b preset's (H_o 5, H_a 15, future frames every 4 steps: 5 + 4 frames, 3 latent
frames); another one (e.g. --future_stride 1 --future_frames 56: 16 latent frames) is trained with the same flags.

The source is a LeRobot folder (v3.0 or v2.1; the reader's flags as in lerobot.py) or a dataset in the frame format
(data.py). The encoders come from --encoder_source, a folder or Hub id in the diffusers layout (vae/, text_encoder/,
tokenizer/; default NVIDIA's Cosmos-Predict2 2B repo). A killed run resumes: run the same command again, and the
shards already finished (listed in progress.json, checked by size and sha256) are kept and the rest written, the
same bytes as an uninterrupted run; other settings over a started folder are refused.

Not here: the format (latent_data.py), the encoders (encoders.py), reading LeRobot (lerobot.py).
"""
import argparse
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

import checkpoints
import config
import data
import encoders
import latent_data
import lerobot

PROGRESS = "progress.json"


def open_source(path, args):
    """A LeRobot reader or a frame-format Dataset: both give len(), episode(e) and a manifest with the same keys."""
    if (Path(path) / "meta" / "info.json").is_file():
        return lerobot.reader_from_args(path, args)
    try:
        return data.Dataset(path)
    except (OSError, ValueError) as e:
        raise SystemExit(f"{path}: neither a LeRobot folder (no meta/info.json) nor a dataset: {e}") from None


def plan(lengths, every):
    """(episode, t) of every window: steps 0, every, 2 every, ... of each episode."""
    starts = [np.arange(0, T, every) for T in lengths]
    return np.repeat(np.arange(len(lengths)), [len(s) for s in starts]), np.concatenate(starts)


def write_atomic(path, tensors, metadata):
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    checkpoints.publish(tmp, path)
    return latent_data.file_entry(path)


def write_json(path, value):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)


class Encoded:
    """The windows of one source under one window spec and video encoder, encoded a batch at a time; keeps the
    episode being read, since consecutive windows share it."""

    def __init__(self, source, spec, video):
        self.source, self.spec, self.video = source, spec, video
        self.hold = np.array([rule == "hold" for rule in source.manifest["action_pad"]])
        self.cached = (None, None)

    def _episode(self, e):
        if self.cached[0] != e:
            self.cached = (e, self.source.episode(e))
        return self.cached[1]

    def windows(self, episodes, ts):
        """(latents (B, C, T_lat, h, w), proprio (B, P), actions (B, H_a, A)) of the windows (episodes[i], ts[i])."""
        frames, proprio, actions = [], [], []
        for e, t in zip(episodes, ts):
            ep = self._episode(e)
            T, t = np.array([len(ep.actions)]), np.array([t])
            frames.append(ep.frames[data.window_frames(self.spec, t, T)[0]])
            proprio.append(ep.proprio[t[0]])
            actions.append(data.action_chunks(self.spec, ep.actions, np.zeros(1, np.int64), t, T, self.hold)[0])
        return self.video.encode(torch.from_numpy(np.stack(frames))), np.stack(proprio), np.stack(actions)


def preencode(source, out, spec, encoder_spec, *, every=1, windows_per_shard=256, batch=8, dtype="bfloat16",
              device="cpu", settings=None, log=print):
    """Write the latent dataset of `source` (see open_source) to `out`; returns its manifest. `settings` (JSON)
    names how the source was read; with the arguments, they must match a started folder's to resume it."""
    out = Path(out)
    if (out / latent_data.MANIFEST).exists():
        raise FileExistsError(f"{out / latent_data.MANIFEST} exists: this pre-encoding is complete")
    m = source.manifest
    config = {"format": latent_data.FORMAT, "version": latent_data.VERSION, "settings": settings or {},
              "window": asdict(spec), "encoders": encoder_spec, "every": every,
              "windows_per_shard": windows_per_shard, "batch": batch, "dtype": dtype}
    video, text = encoders.build(encoder_spec, device)
    try:
        n_cond, T_lat = video.latent_frames(spec.history), video.latent_frames(spec.history + spec.future)
    except ValueError as e:
        raise ValueError(f"a window of H_o = {spec.history} history and F = {spec.future} future frames: {e} "
                         f"(H_o and H_o + F must both be 1 + 4n)") from None
    stored = latent_data.DTYPES[dtype]
    progress = _resume(out, config)   # only once the settings are known to work: a failed start leaves nothing
    if progress["text"] is None:
        progress["text"] = _encode_text(out, text, list(dict.fromkeys(source.instructions)), stored)
        write_json(out / PROGRESS, progress)
    episodes, ts = plan(source.lengths, every)
    log(f"preencode: {len(source)} episodes, {len(ts)} windows of {spec.history} + {spec.future} frames -> "
        f"{T_lat} latent frames" + (f"; resuming after shard {len(progress['shards'])}" if progress["shards"] else ""))
    _write_shards(out, progress, Encoded(source, spec, video), episodes, ts, windows_per_shard, batch, stored)
    counts = np.bincount(episodes, minlength=len(source)).tolist()
    manifest = {"format": latent_data.FORMAT, "version": latent_data.VERSION,
                "latent_shape": progress["shards"][0]["latent_shape"], "dtype": dtype, "context_frames": n_cond,
                "window": asdict(spec), "every": every, "encoders": encoder_spec,
                **{k: m[k] for k in ("frame_shape", "proprio_dim", "action_dim", "control_hz", "proprio_range",
                                     "action_range", "action_pad")},
                "description": m.get("description", ""), "source": {**m.get("source", {}), "preencode": settings},
                "text": progress["text"],
                "shards": [{k: s[k] for k in ("file", "bytes", "sha256", "windows")} for s in progress["shards"]],
                "episodes": [{**{k: ep[k] for k in ("length", "instruction", "task", "info")}, "windows": n}
                             for ep, n in zip(m["episodes"], counts)]}
    write_json(out / latent_data.MANIFEST, manifest)   # the manifest appears last and whole
    (out / PROGRESS).unlink()
    return manifest


def _write_shards(out, progress, encoded, episodes, ts, windows_per_shard, batch, dtype):
    """Encode and write the shards not yet in progress["shards"], each listed there once it is on disk."""
    from tqdm import tqdm
    starts = range(0, len(ts), windows_per_shard)
    done = len(progress["shards"])
    bar = tqdm(total=len(ts), initial=min(done * windows_per_shard, len(ts)), unit="window", desc="encoding")
    for k, start in list(enumerate(starts))[done:]:
        ids = np.arange(start, min(start + windows_per_shard, len(ts)))
        parts = []
        for chunk in np.array_split(ids, -(-len(ids) // batch)):   # batches start at the shard: the same bytes
            parts.append(encoded.windows(episodes[chunk], ts[chunk]))
            bar.update(len(chunk))
        latents = torch.cat([part[0] for part in parts])
        proprio, actions = (np.concatenate([part[i] for part in parts]) for i in (1, 2))
        entry = write_atomic(out / f"latents-{k:05d}.safetensors", {
            "latents": latents.to(dtype), "proprio": torch.from_numpy(proprio).float(),
            "actions": torch.from_numpy(actions).float(), "episode": torch.from_numpy(episodes[ids]),
            "t": torch.from_numpy(ts[ids])}, {"format": f"{latent_data.FORMAT} {latent_data.VERSION}"})
        progress["shards"].append({**entry, "windows": len(ids), "latent_shape": list(latents.shape[1:])})
        write_json(out / PROGRESS, progress)
    bar.close()


def _resume(out, config):
    """The progress of a started pre-encoding in `out` with the same config (its listed files checked), or a new one."""
    path = out / PROGRESS
    if not path.is_file():
        out.mkdir(parents=True, exist_ok=True)
        progress = {"config": config, "text": None, "shards": []}
        write_json(path, progress)
        return progress
    progress = json.loads(path.read_text())
    if progress["config"] != config:
        diff = ", ".join(checkpoints._differences(progress["config"], config))
        raise ValueError(f"{out} holds a pre-encoding started with other settings (differs in: {diff}); run the "
                         f"same command, or use another folder")
    for entry in ([progress["text"]] if progress["text"] else []) + progress["shards"]:
        latent_data.check_file(out / entry["file"], entry)
    return progress


def _encode_text(out, text, instructions, dtype):
    """text.safetensors: the states of every distinct instruction, cut after the longest prompt."""
    states = text(instructions)                                              # (N, L, D), zero past each prompt
    lengths = (states.abs().sum(-1) > 0).sum(-1)
    used = max(int(lengths.max()), 1)
    entry = write_atomic(out / "text.safetensors", {"states": states[:, :used].to(dtype), "lengths": lengths},
                         {"format": f"{latent_data.FORMAT} {latent_data.VERSION}"})
    return {**entry, "length": text.length, "dim": text.dim, "instructions": instructions}


def parse_size(text):
    try:
        h, w = (int(v) for v in text.lower().split("x"))
        return h, w
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size takes HxW, e.g. 256x256, got {text!r}") from None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="a LeRobot folder (v3.0 or v2.1) or a dataset in the frame format (data.py)")
    p.add_argument("out", help="the latent dataset folder to write (resumed where a run was killed)")
    p.add_argument("--encoder_source", default=encoders.COSMOS_SOURCE, help="folder or Hub id with vae/, "
                   "text_encoder/ and tokenizer/ (the Cosmos-Predict2 diffusers layout)")
    p.add_argument("--size", type=parse_size, default=None, help="HxW the VAE sees, frames resized first (Lanczos); "
                   "default: the frames' own; multiples of 16")
    recipe = config.PRESETS["cosmos-2b"]   # its window by default, so train.py --preset cosmos-2b needs no flags
    for name, default, help in (("history", recipe.history, "H_o: history frames, 1 + 4m (the VAE's rule)"),
                                ("horizon", recipe.horizon, "H_a: actions per chunk"),
                                ("history_stride", recipe.history_stride, "steps between history frames"),
                                ("future_stride", recipe.future_stride, "steps between future frames"),
                                ("future_frames", recipe.future_frames, "F (0: ceil(H_a / stride)); H_o + F must "
                                                                        "be 1 + 4n"),
                                ("every", 1, "encode the windows at every k-th step of each episode"),
                                ("windows_per_shard", 256, "windows per shard file"),
                                ("batch", 8, "windows per VAE call")):
        p.add_argument(f"--{name}", type=int, default=default, help=f"{help} (default {default})")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(latent_data.DTYPES), help="of the stored latents")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    lerobot.add_arguments(p)
    args = p.parse_args(argv)
    source = open_source(args.src, args)
    try:
        spec = data.WindowSpec(args.history, args.horizon, args.history_stride, args.future_stride,
                               args.future_frames)
        settings = {"src": str(Path(args.src).resolve()),
                    **{k: getattr(args, k) for k in ("camera", "state", "action", "fps", "rotation", "relative",
                                                     "state_rotation", "gripper", "gripper_threshold",
                                                     "action_pad")}}
        start = time.perf_counter()
        manifest = preencode(source, args.out, spec, encoders.cosmos_spec(args.encoder_source, args.size),
                             every=args.every, windows_per_shard=args.windows_per_shard, batch=args.batch,
                             dtype=args.dtype, device=args.device, settings=settings)
    except (OSError, ValueError) as e:
        raise SystemExit(str(e)) from None
    total = sum(s["bytes"] for s in manifest["shards"]) + manifest["text"]["bytes"]
    windows = sum(s["windows"] for s in manifest["shards"])
    print(f"wrote {args.out}: {windows} windows of latents {manifest['latent_shape']} {manifest['dtype']}, "
          f"{total / 1e6:.1f} MB ({total / len(manifest['episodes']) / 1e3:.1f} kB per episode), in "
          f"{time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
