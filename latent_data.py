"""The latent variant of the dataset format: training windows already passed through the real frozen encoders (the
Wan2.1 VAE and T5), so that training the real models never runs either. preencode.py writes it from a LeRobot
dataset or a dataset in the frame format (data.py, "mimic-video-episodes" version 1, unchanged); train.py reads it
with --data like the frame format.

A latent dataset is a directory:

    manifest.json               what the windows are and how to read them (below); written last
    text.safetensors            the text states of every distinct instruction
    latents-00000.safetensors   windows, in manifest order (a few hundred per shard)
    ...

A window is one training example, at step t of an episode: its H_o history frames then its F future frames
(data.WindowSpec, the frame format's rule), encoded together as one clip of H_o + F = 1 + 4n frames into
T_lat = 1 + n latent frames; the first context_frames = (H_o - 1) / 4 + 1 of them hold the history alone (the VAE
is causal), Video2World's conditioning. A shard holds, for its W windows:
    latents  (W, C, T_lat, h, w)  bfloat16 | float16   normalised VAE latents (encoders.WanVAE)
    proprio  (W, P)               float32              proprioception at t
    actions  (W, H_a, A)          float32              the chunk t .. t + H_a - 1, padded past the end (action_pad)
    episode  (W,)                 int64                the window's episode (manifest order)
    t        (W,)                 int64                its step
text.safetensors holds states (N, L_used, D) in the shard dtype, the T5 states of the N instructions cut after the
longest prompt's L_used tokens (every later row is zero), and lengths (N,) int64, each prompt's tokens; reading pads
them with zeros to L.

manifest.json:
    format "mimic-video-latents", version 1
    latent_shape [C, T_lat, h, w], dtype, context_frames
    window        {history, horizon, history_stride, future_stride, future_frames}: data.WindowSpec
    every         windows start at steps t = 0, every, 2 every, ... of each episode
    encoders      the encoders' description (encoders.build), e.g. the VAE's and T5's source and the resize
    frame_shape [H, W, C] of the camera frames before encoding; proprio_dim P, action_dim A, control_hz,
    proprio_range, action_range, action_pad, description, source       as in the frame format
    text          {file, bytes, sha256, length L, dim D, instructions [N]}
    shards        [{file, bytes, sha256, windows}]
    episodes      [{length, instruction, task, info, windows}]

Reading checks every file's size and sha256 against the manifest and every tensor's shape and dtype against it,
and names the file at fault. Not here: writing it (preencode.py), the encoders (encoders.py).
"""
import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

import data

FORMAT = "mimic-video-latents"
VERSION = 1
REQUIRED = ("latent_shape", "dtype", "context_frames", "window", "every", "encoders", "text", *data.REQUIRED)
MANIFEST = "manifest.json"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def is_latent_dataset(root):
    path = Path(root) / MANIFEST
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("format") == FORMAT
    except json.JSONDecodeError:
        return False   # data.read_manifest names the broken file


def file_entry(path):
    """{file, bytes, sha256} of a written file."""
    blob = Path(path).read_bytes()
    return {"file": Path(path).name, "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}


def check_file(path, entry):
    """The integrity check of one listed file: present, its size, its sha256."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is listed in the manifest but missing")
    blob = path.read_bytes()
    if len(blob) != entry["bytes"]:
        raise ValueError(f"{path} is truncated or overwritten: expected {entry['bytes']} bytes, found {len(blob)}")
    if hashlib.sha256(blob).hexdigest() != entry["sha256"]:
        raise ValueError(f"{path} is corrupted: its sha256 differs from the manifest's")


def read_manifest(root):
    m = data.read_manifest(root, FORMAT, VERSION, REQUIRED, unfinished="its pre-encoding is unfinished")
    path = Path(root) / MANIFEST
    if m["dtype"] not in DTYPES:
        raise ValueError(f"{path}: dtype {m['dtype']!r}, expected one of {sorted(DTYPES)}")
    return m


def _open_checked(path, entry, expected):
    """safe_open a listed file after its integrity check, its tensors' shapes and dtypes as `expected`:
    {name: (shape, torch dtype)}."""
    check_file(path, entry)
    try:
        f = safe_open(path, framework="pt")
    except Exception as e:   # safetensors reports a bad header with its own exception type
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from None
    for name, (shape, dtype) in expected.items():
        if name not in f.keys():
            raise ValueError(f"{path} lacks the tensor {name!r}")
        found = f.get_slice(name)
        if tuple(found.get_shape()) != tuple(shape) or found.get_dtype() != _SAFETENSORS_NAMES[dtype]:
            raise ValueError(f"{path}, tensor {name!r}: the manifest implies {tuple(shape)} {dtype}, found "
                             f"{tuple(found.get_shape())} {found.get_dtype()}")
    return f


_SAFETENSORS_NAMES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.int64: "I64"}


class LatentDataset:
    """A latent dataset: its small arrays in memory (proprio, actions, episode and step of every window, the text
    states), its latents read from the shards per batch. Episode e's windows are those with episode == e."""

    def __init__(self, root):
        self.root = Path(root)
        self.manifest = m = read_manifest(root)
        self.spec = data.WindowSpec(**m["window"])
        self.context_frames, self.dtype = m["context_frames"], DTYPES[m["dtype"]]
        self.text = self._read_text(m)                                                  # (N, L, D) float32
        self.files, self.shards, proprio, actions, episode, t = [], [], [], [], [], []
        for entry in m["shards"]:
            W = entry["windows"]
            f = _open_checked(self.root / entry["file"], entry, {
                "latents": ((W, *m["latent_shape"]), self.dtype), "proprio": ((W, m["proprio_dim"]), torch.float32),
                "actions": ((W, self.spec.horizon, m["action_dim"]), torch.float32),
                "episode": ((W,), torch.int64), "t": ((W,), torch.int64)})
            self.files.append(f)   # kept open: the latents are read from it per batch
            self.shards.append(f.get_slice("latents"))
            for out, name in ((proprio, "proprio"), (actions, "actions"), (episode, "episode"), (t, "t")):
                out.append(f.get_tensor(name).numpy())
        self.proprio, self.actions, self.episode, self.t = (np.concatenate(x) for x in (proprio, actions, episode, t))
        counts = np.bincount(self.episode, minlength=len(m["episodes"])).tolist()
        if counts != [ep["windows"] for ep in m["episodes"]]:
            raise ValueError(f"{self.root / MANIFEST}: the shards' windows per episode {counts[:8]} differ from the "
                             f"manifest's {[ep['windows'] for ep in m['episodes']][:8]}")
        sizes = [s["windows"] for s in m["shards"]]
        self.shard_of = np.repeat(np.arange(len(sizes)), sizes)                          # window -> shard
        self.row_of = np.concatenate([np.arange(n) for n in sizes])                      # window -> row in shard
        self.instruction_of = np.array([m["text"]["instructions"].index(ep["instruction"]) for ep in m["episodes"]],
                                       dtype=np.int64)
        self.lengths = np.array([ep["length"] for ep in m["episodes"]], dtype=np.int64)
        self.instructions = [ep["instruction"] for ep in m["episodes"]]
        self.tasks = [ep["task"] for ep in m["episodes"]]

    def _read_text(self, m):
        entry, n = m["text"], len(m["text"]["instructions"])
        f = _open_checked(self.root / entry["file"], entry, {"lengths": ((n,), torch.int64)})
        states, lengths = f.get_tensor("states"), f.get_tensor("lengths")
        if states.dtype != self.dtype or states.shape[0] != n or states.shape[2] != entry["dim"] \
                or states.shape[1] > entry["length"] or (lengths > states.shape[1]).any():
            raise ValueError(f"{self.root / entry['file']}, tensor 'states': the manifest implies ({n}, <= "
                             f"{entry['length']}, {entry['dim']}) {self.dtype}, found {tuple(states.shape)} "
                             f"{states.dtype}")
        out = torch.zeros(n, entry["length"], entry["dim"])
        out[:, :states.shape[1]] = states.float()
        return out

    def __len__(self):
        return len(self.manifest["episodes"])

    def latents(self, ids):
        """Latents (B, C, T_lat, h, w) float32 of the windows `ids`, read from their shards."""
        rows = zip(self.shard_of[ids].tolist(), self.row_of[ids].tolist())
        return torch.stack([self.shards[s][r:r + 1][0] for s, r in rows]).float()


def clean_latents(batch, tokenizer):
    """A batch's clean latents: pre-encoded ones (LatentWindows) as they are, else its frames through the frozen
    video encoder (tokenizer: encoders.py)."""
    return batch["latents"] if "latents" in batch else tokenizer.encode(batch["frames"])


class LatentWindows:
    """The training windows of a LatentDataset's chosen episodes, drawn as data.Windows draws them."""

    def __init__(self, dataset, episodes=None):
        self.data = dataset
        chosen = np.arange(len(dataset)) if episodes is None else np.asarray(episodes, dtype=np.int64)
        self.ids = np.flatnonzero(np.isin(dataset.episode, chosen))

    def __len__(self):
        return len(self.ids)

    def sample(self, batch_size, generator=None):
        return self.batch(torch.randint(len(self), (batch_size,), generator=generator).numpy())

    def batch(self, ids):
        """The windows `ids` (0 .. len - 1) as a dict of tensors: latents (B, C, T_lat, h, w), proprio (B, P),
        actions (B, H_a, A), text (B, L, D), episode (B,), t (B,)."""
        d, w = self.data, self.ids[ids]
        e = d.episode[w]
        return {"latents": d.latents(w), "proprio": torch.from_numpy(d.proprio[w]),
                "actions": torch.from_numpy(d.actions[w]), "text": d.text[d.instruction_of[e]],
                "episode": torch.from_numpy(e), "t": torch.from_numpy(d.t[w])}
