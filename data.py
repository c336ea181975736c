"""Robot data for training: the project's on-disk dataset format, the training-window loader, and the value ranges
that models normalise by. Not here: the frozen encoders that turn frames and instructions into the models' inputs
(encoders.py); the latent variant of this format, training windows pre-encoded for the real models (latent_data.py,
written by preencode.py); reading LeRobot datasets (lerobot.py).

The format is not tied to the built-in world: any source (another simulator, a robot's logs) converted into it can
be trained on. A dataset is a directory:

    manifest.json              what the episodes are and how to read them (below)
    shard-00000.safetensors    episodes, concatenated in manifest order (a few dozen episodes per shard)
    shard-00001.safetensors    ...

An episode of T control steps holds T + 1 observations (the one before each action, and the last one after) and T
actions. A shard holds, for its E episodes of lengths T_1..T_E (N = sum T_e):
    frames   (N + E, H, W, C) uint8     camera frames, rows top to bottom
    proprio  (N + E, P)       float32   proprioception with each frame
    actions  (N, A)           float32   the action taken after each frame but the last
    lengths  (E,)             int64     T_e
(Logs with one action per frame: drop the last action, or append one more observation.)

manifest.json:
    format "mimic-video-episodes", version 1
    frame_shape [H, W, C], proprio_dim P, action_dim A, control_hz
    proprio_range, action_range   [[low, high]] per dimension: the value ranges, for models that normalise
    action_pad                    per action dimension, how to fill a chunk past the episode's end:
                                  "zero" (e.g. a relative motion: stay) or "hold" (repeat the last action's value)
    description                   free text: what the dimensions mean
    source                        free JSON: how the data was made (generator, its config, seed)
    shards    [{file, bytes, sha256, episodes}]
    episodes  [{shard, length, instruction, task, info}]   (task groups episodes for reporting; info is free JSON)

Reading checks every shard's size and sha256 against the manifest and every tensor's shape against it, and
names the file at fault.

The latent variant, "mimic-video-latents" version 1 (training windows pre-encoded by the real encoders, so that
training runs neither), is specified in latent_data.py's docstring; preencode.py writes it from this format or from
a LeRobot folder.
"""
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

import checkpoints

FORMAT = "mimic-video-episodes"
VERSION = 1
REQUIRED = ("frame_shape", "proprio_dim", "action_dim", "control_hz", "proprio_range", "action_range",
            "action_pad", "shards", "episodes")   # the manifest's keys
MANIFEST = "manifest.json"
PAD_RULES = ("zero", "hold")

# ----------------------------------------------------------------------------- episodes on disk


@dataclass
class Episode:
    frames: np.ndarray       # (T + 1, H, W, C) uint8
    proprio: np.ndarray      # (T + 1, P) float32
    actions: np.ndarray      # (T, A) float32
    instruction: str
    task: str = ""           # defaults to the instruction
    info: dict = field(default_factory=dict)


def write_dataset(root, episodes, *, control_hz, proprio_range, action_range, action_pad, description="",
                  source=None, episodes_per_shard=64):
    """Write `episodes` (any iterable of Episode) as a dataset in the directory `root`; returns the manifest.
    The bytes depend only on the arguments: the same episodes give the same files. An interrupted write leaves no
    manifest, so it reads as no dataset, and writing again over it is allowed; over a complete one it is not."""
    root = Path(root)
    if (root / MANIFEST).exists():
        raise FileExistsError(f"{root / MANIFEST} exists: a dataset is already there")
    if any(rule not in PAD_RULES for rule in action_pad):
        raise ValueError(f"action_pad entries must be one of {PAD_RULES}, got {action_pad}")
    manifest = {"format": FORMAT, "version": VERSION, "frame_shape": None, "proprio_dim": None, "action_dim": None,
                "control_hz": float(control_hz), "proprio_range": _ranges(proprio_range, "proprio_range"),
                "action_range": _ranges(action_range, "action_range"), "action_pad": list(action_pad),
                "description": description, "source": source or {}, "shards": [], "episodes": []}
    root.mkdir(parents=True, exist_ok=True)
    pending = []
    for ep in episodes:
        _check_episode(ep, manifest)
        pending.append(ep)
        if len(pending) == episodes_per_shard:
            _write_shard(root, pending, manifest)
            pending = []
    if pending:
        _write_shard(root, pending, manifest)
    if not manifest["episodes"]:
        raise ValueError("no episodes to write")
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(root / MANIFEST)        # the manifest appears last and whole: its presence means a complete dataset
    return manifest


def _ranges(ranges, name):
    r = np.asarray(ranges, dtype=np.float64)
    if r.ndim != 2 or r.shape[1] != 2 or not (r[:, 0] <= r[:, 1]).all():
        raise ValueError(f"{name} must be [[low, high], ...] with low <= high, got {ranges}")
    return r.tolist()


def _check_episode(ep, manifest):
    T = len(ep.actions)
    if ep.frames.dtype != np.uint8 or ep.frames.ndim != 4:
        raise ValueError(f"episode frames must be (T + 1, H, W, C) uint8, got {ep.frames.shape} {ep.frames.dtype}")
    if ep.actions.ndim != 2 or ep.proprio.ndim != 2 or T < 1:
        raise ValueError(f"episode actions (T, A) and proprio (T + 1, P) must be 2-D with T >= 1, got "
                         f"{ep.actions.shape} and {ep.proprio.shape}")
    if len(ep.frames) != T + 1 or len(ep.proprio) != T + 1:
        raise ValueError(f"an episode of {T} actions needs {T + 1} frames and proprio rows, got "
                         f"{len(ep.frames)} and {len(ep.proprio)}")
    shape = {"frame_shape": list(ep.frames.shape[1:]), "proprio_dim": ep.proprio.shape[1],
             "action_dim": ep.actions.shape[1]}
    for key, value in shape.items():
        if manifest[key] is None:
            manifest[key] = value
        elif manifest[key] != value:
            raise ValueError(f"episodes disagree on {key}: {manifest[key]} before, {value} now")
    for key, dim in (("proprio_range", shape["proprio_dim"]), ("action_range", shape["action_dim"]),
                     ("action_pad", shape["action_dim"])):
        if len(manifest[key]) != dim:
            raise ValueError(f"{key} has {len(manifest[key])} entries for {dim} dimensions")


def _write_shard(root, episodes, manifest):
    name = f"shard-{len(manifest['shards']):05d}.safetensors"
    tensors = {"frames": np.concatenate([ep.frames for ep in episodes]),
               "proprio": np.concatenate([ep.proprio for ep in episodes]).astype(np.float32),
               "actions": np.concatenate([ep.actions for ep in episodes]).astype(np.float32),
               "lengths": np.array([len(ep.actions) for ep in episodes], dtype=np.int64)}
    # a single metadata entry: safetensors writes its metadata map in hash order, so two would vary run to run
    tmp = root / (name + ".tmp")
    save_file(tensors, tmp, metadata={"format": f"{FORMAT} {VERSION}"})
    checkpoints.publish(tmp, root / name)   # the permissions of any new file, flushed, renamed into place
    blob = (root / name).read_bytes()
    manifest["shards"].append({"file": name, "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest(),
                               "episodes": len(episodes)})
    manifest["episodes"] += [{"shard": name, "length": len(ep.actions), "instruction": ep.instruction,
                              "task": ep.task or ep.instruction, "info": ep.info} for ep in episodes]


def read_manifest(root, format=FORMAT, version=VERSION, required=REQUIRED, unfinished="its writing was interrupted"):
    """The manifest of a dataset folder, checked for its format, version and required keys (latent_data.py reads
    its variant with its own)."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a dataset directory (or {unfinished})")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if manifest.get("format") != format or manifest.get("version") != version:
        raise ValueError(f"{path}: expected format {format!r} version {version}, found "
                         f"{manifest.get('format')!r} version {manifest.get('version')}")
    missing = [k for k in required if k not in manifest]
    if missing:
        raise ValueError(f"{path} lacks the keys {missing}")
    return manifest


class Normalizer:
    """Maps each dimension's [low, high] range (a manifest's proprio_range or action_range) onto [-1, 1] and back."""

    def __init__(self, ranges):
        r = torch.tensor(ranges, dtype=torch.float32)   # (dims, 2)
        self.low, self.span = r[:, 0], (r[:, 1] - r[:, 0]).clamp(min=1e-8)

    def __call__(self, x):
        return 2 * (x - self.low) / self.span - 1

    def inverse(self, y):
        return (y + 1) / 2 * self.span + self.low


class Dataset:
    """A whole dataset in memory (it is small), episodes concatenated:
    frames (F, H, W, C) uint8, proprio (F, P), actions (N, A); episode e owns frames
    frame_start[e] .. frame_start[e] + lengths[e] and actions action_start[e] .. action_start[e] + lengths[e] - 1."""

    def __init__(self, root):
        self.root = Path(root)
        self.manifest = m = read_manifest(root)
        if [ep["shard"] for ep in m["episodes"]] != [s["file"] for s in m["shards"] for _ in range(s["episodes"])]:
            raise ValueError(f"{self.root / MANIFEST}: the episodes do not follow the shards in order and count")
        frames, proprio, actions = [], [], []
        for shard in m["shards"]:
            episodes = [ep for ep in m["episodes"] if ep["shard"] == shard["file"]]
            t = _read_shard(self.root / shard["file"], shard, [ep["length"] for ep in episodes], m)
            frames.append(t["frames"]), proprio.append(t["proprio"]), actions.append(t["actions"])
        self.frames, self.proprio, self.actions = (np.concatenate(x) for x in (frames, proprio, actions))
        self.lengths = np.array([ep["length"] for ep in m["episodes"]], dtype=np.int64)
        self.action_start = np.concatenate([[0], np.cumsum(self.lengths)[:-1]])
        self.frame_start = self.action_start + np.arange(len(self.lengths))
        self.instructions = [ep["instruction"] for ep in m["episodes"]]
        self.tasks = [ep["task"] for ep in m["episodes"]]
        self.action_pad = m["action_pad"]

    def __len__(self):
        return len(self.lengths)

    def episode(self, e):
        f, a, T = self.frame_start[e], self.action_start[e], self.lengths[e]
        ep = self.manifest["episodes"][e]
        return Episode(self.frames[f:f + T + 1], self.proprio[f:f + T + 1], self.actions[a:a + T],
                       ep["instruction"], ep["task"], ep["info"])


def _read_shard(path, entry, lengths, manifest):
    if not path.is_file():
        raise FileNotFoundError(f"shard {path} is listed in the manifest but missing")
    blob = path.read_bytes()
    if len(blob) != entry["bytes"]:
        raise ValueError(f"shard {path} is truncated or overwritten: expected {entry['bytes']} bytes, "
                         f"found {len(blob)}")
    if hashlib.sha256(blob).hexdigest() != entry["sha256"]:
        raise ValueError(f"shard {path} is corrupted: its sha256 differs from the manifest's")
    try:
        tensors = load_file(path)
    except Exception as e:     # safetensors reports a bad header with its own exception type
        raise ValueError(f"shard {path} is not a readable safetensors file: {e}") from None
    n, e = sum(lengths), len(lengths)
    expected = {"frames": ((n + e, *manifest["frame_shape"]), np.uint8),
                "proprio": ((n + e, manifest["proprio_dim"]), np.float32),
                "actions": ((n, manifest["action_dim"]), np.float32), "lengths": ((e,), np.int64)}
    for key, (shape, dtype) in expected.items():
        if key not in tensors:
            raise ValueError(f"shard {path} lacks the tensor {key!r}")
        found = tensors[key]
        if found.shape != shape or found.dtype != dtype:
            raise ValueError(f"shard {path}, tensor {key!r}: the manifest implies {shape} {np.dtype(dtype)}, "
                             f"found {found.shape} {found.dtype}")
    if tensors["lengths"].tolist() != lengths:
        raise ValueError(f"shard {path}: episode lengths {tensors['lengths'].tolist()} differ from the "
                         f"manifest's {lengths}")
    return tensors


def split_by_task(tasks, share):
    """(training episodes, held-out episodes): the last round(share * n) of each task's n episodes are held out
    (at least one where share > 0 and the task has two or more), so no task is left out of training or testing."""
    held_out = []
    for task in dict.fromkeys(tasks):
        ids = [e for e, t in enumerate(tasks) if t == task]
        n = min(len(ids) - 1, max(1, round(share * len(ids)))) if share > 0 else 0
        held_out += ids[len(ids) - n:] if n else []
    held_out = np.array(sorted(held_out), dtype=np.int64)
    return np.setdiff1d(np.arange(len(tasks)), held_out), held_out

def first_per_task(tasks, episodes, n):
    """The first n of `episodes` (indices into tasks) of each task, in order."""
    chosen = [e for task in dict.fromkeys(tasks[e] for e in episodes) for e in
              [e for e in episodes if tasks[e] == task][:n]]
    return np.array(sorted(chosen), dtype=np.int64)

# ----------------------------------------------------------------------------- training windows


@dataclass(frozen=True)
class WindowSpec:
    """What one training example holds, for a window starting at step t of an episode of T steps:

        history frames  t - (H_o - 1) s_o, ..., t - s_o, t          (H_o frames, stride s_o; the last is "now")
        future frames   t + s_f, t + 2 s_f, ..., t + F s_f          (F: by default ceil(H_a / s_f), the chunk)
        proprio         at t
        actions         t, ..., t + H_a - 1                        (the chunk H_a, as the dataset stores them)

    Padding at the episode's ends: a frame index before 0 takes frame 0 (the scene before the start looked like
    its first frame); past T it takes frame T (the world stays as the episode left it); an action past T - 1
    follows the manifest's action_pad ("zero": stay; "hold": keep the last value, e.g. the gripper command).
    """
    history: int = 1           # H_o
    horizon: int = 16          # H_a
    history_stride: int = 1    # s_o
    future_stride: int = 4     # s_f
    future_frames: int = 0     # F; 0: ceil(H_a / s_f), just enough frames to cover the chunk

    def __post_init__(self):
        for name in ("history", "horizon", "history_stride", "future_stride"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"WindowSpec.{name} must be a positive integer, got {getattr(self, name)!r}")
        if not isinstance(self.future_frames, int) or self.future_frames < 0:
            raise ValueError(f"WindowSpec.future_frames must be an integer >= 0, got {self.future_frames!r}")

    @property
    def future(self):
        return self.future_frames or math.ceil(self.horizon / self.future_stride)


def history_indices(t, history, stride):
    """Frame indices of the H_o history frames ending at step t (array-like t -> (..., H_o)), clamped at 0.
    The closed-loop evaluator uses it too, so a policy sees the same history in training and in the world."""
    return np.maximum(np.asarray(t)[..., None] - stride * np.arange(history - 1, -1, -1), 0)


class Windows:
    """Training windows drawn from a Dataset, one per step t in 0..T-1 of each chosen episode.
    Batches are gathered by numpy indexing from the in-memory arrays: no worker processes, and no multi-threaded
    torch gathers, which were 10x slower than numpy's on a busy 2-core machine."""

    def __init__(self, dataset, spec, text_encoder, episodes=None, future=True):
        self.data, self.spec, self.future = dataset, spec, future   # future False: the history frames alone
        episodes = np.arange(len(dataset)) if episodes is None else np.asarray(episodes, dtype=np.int64)
        lengths = dataset.lengths[episodes]
        self.episode = np.repeat(episodes, lengths)                                  # (windows,)
        self.t = np.concatenate([np.arange(T) for T in lengths])
        self.text = text_encoder(dataset.instructions).numpy()                        # (episodes, L, D)
        self.hold = np.array([rule == "hold" for rule in dataset.action_pad])

    def __len__(self):
        return len(self.t)

    def sample(self, batch_size, generator=None):
        return self.batch(torch.randint(len(self), (batch_size,), generator=generator).numpy())

    def batch(self, ids):
        """The windows `ids` as a dict of tensors:
        frames (B, H_o + F, H, W, C) uint8 (history then future; the H_o history frames alone where the windows
        were made with future=False), proprio (B, P), actions (B, H_a, A),
        text (B, L, D), episode (B,), t (B,)."""
        d, s = self.data, self.spec
        e, t = self.episode[ids], self.t[ids]
        T, f0 = d.lengths[e], d.frame_start[e]
        frames = d.frames[f0[:, None] + window_frames(s, t, T)[:, :None if self.future else s.history]]
        actions = action_chunks(s, d.actions, d.action_start[e], t, T, self.hold)
        return {"frames": torch.from_numpy(frames), "proprio": torch.from_numpy(d.proprio[f0 + t]),
                "actions": torch.from_numpy(actions), "text": torch.from_numpy(self.text[e]),
                "episode": torch.from_numpy(e), "t": torch.from_numpy(t)}


def window_frames(spec, t, T):
    """Frame indices (B, H_o + F) of the windows at steps t (B,) of episodes of T (B,) steps, history then future."""
    future = np.minimum(t[:, None] + spec.future_stride * np.arange(1, spec.future + 1), T[:, None])
    return np.concatenate([history_indices(t, spec.history, spec.history_stride), future], axis=1)


def action_chunks(spec, actions, a0, t, T, hold):
    """The chunks (B, H_a, A) of the windows at steps t of episodes whose T actions start at row a0 of `actions`:
    actions t .. t + H_a - 1, past the episode's end zero, or the last action's value where hold (A,) is True."""
    steps = t[:, None] + np.arange(spec.horizon)                                      # (B, H_a)
    chunk = actions[a0[:, None] + np.minimum(steps, T[:, None] - 1)]
    return np.where((steps >= T[:, None])[..., None] & ~hold, np.float32(0), chunk)
