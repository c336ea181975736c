"""Checkpoint files: how this project writes and reads its safetensors files, and how it reads tensors from any
safetensors file without a second copy in memory. No pickles anywhere.

A train.py run folder holds
    video.safetensors, action.safetensors   a finished stage's model: its state dict; metadata "mimic_video" =
                                            JSON {"model_config", "run", "stats", "config"} (save_model)
    video.state.safetensors, ...            a stage's resumable point: its trainable parameters "model.<name>",
                                            AdamW's moments "optim.<i>.<key>"; metadata {"step", "config"} (save_state)
    video.lora.safetensors                  LoRA adapters alone, with their rank and alpha (save_lora)
Every file appears whole or not at all (write_atomic), and a file that cannot be read raises a ValueError naming it.

Not here: the public Cosmos checkpoints' layouts and names (cosmos_weights.py), the dataset format (data.py).
"""
import json
import os
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

META_KEY = "mimic_video"

# ----------------------------------------------------------------------------- writing


def write_atomic(path, tensors, metadata=None):
    """Write a safetensors file so that a crash at any moment leaves either the old file or the new one: write a
    temporary file, flush it to disk, rename it over the old one (atomic on POSIX), flush the rename."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    publish(tmp, path)


def publish(tmp, path):
    """Give a finished temporary file the permissions of any new file (safetensors writes 0600), flush it, and
    rename it to `path`."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(Path(path).parent, os.O_RDONLY)
    try:
        os.fsync(fd)   # the rename itself reaches the disk
    finally:
        os.close(fd)


def save(path, tensors, meta):
    """A project file: tensors plus JSON metadata."""
    write_atomic(path, tensors, {META_KEY: json.dumps(meta)})

# ----------------------------------------------------------------------------- reading


def read(path):
    """(tensors, metadata) of a file written by save()."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    headers, metadata = read_headers([path])
    if META_KEY not in metadata:
        raise ValueError(f"{path}: not a train.py checkpoint (no '{META_KEY}' metadata)")
    try:
        meta = json.loads(metadata[META_KEY])
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: its '{META_KEY}' metadata is not valid JSON: {e}") from None
    return read_tensors(headers, {name: name for name in headers}), meta


_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def read_headers(files):
    """Names, shapes and dtypes of the tensors in safetensors files, read without touching their data:
    ({name: (file, shape, dtype)}, metadata of the last file)."""
    headers, metadata = {}, {}
    for file in files:
        try:
            with safe_open(file, "pt") as f:
                metadata = f.metadata() or {}
                for name in f.keys():
                    if name in headers:
                        raise ValueError(f"{name} is in both {headers[name][0]} and {file}")
                    s = f.get_slice(name)
                    if s.get_dtype() not in _DTYPES:
                        raise ValueError(f"{file}: {name} has dtype {s.get_dtype()}, which torch cannot hold")
                    headers[name] = (file, tuple(s.get_shape()), _DTYPES[s.get_dtype()])
        except SafetensorError as e:
            raise ValueError(f"{file}: not a valid safetensors file (truncated, or another format): {e}") from None
    return headers, metadata


def read_tensors(headers, rename, dtype=None):
    """{rename[name]: tensor} for every name in headers, each read from disk straight into its own memory.

    Not safetensors' get_tensor: recent versions hand out tensors that map the file, which then must never change
    while the model lives (saving fused weights over it would crash), and older ones copied while the whole
    file stayed mapped (two copies at the peak). Here each tensor is one allocation filled by one read.
    """
    state = {}
    for file in dict.fromkeys(file for file, _, _ in headers.values()):
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            entries = json.loads(f.read(n))   # already validated by safe_open in read_headers
            for name, entry in entries.items():
                if name not in headers:
                    continue
                _, shape, stored = headers[name]
                begin, end = entry["data_offsets"]   # relative to the end of the header; data is little-endian
                raw = torch.empty(end - begin, dtype=torch.uint8)
                f.seek(8 + n + begin)
                if f.readinto(raw.numpy()) != end - begin:
                    raise ValueError(f"{file}: {name} is cut short")
                state[rename[name]] = raw.view(stored).reshape(shape).to(dtype or stored)
    return state


def check_names_and_shapes(expected, found, names, source, what="this model"):
    """expected: {our name: shape}; found: {file's name: shape}; names: {file's name: our name}."""
    ours_to_file = {ours: name for name, ours in names.items()}
    missing = [ours_to_file.get(n, n) for n in expected if ours_to_file.get(n) not in found]
    unexpected = [n for n in found if n not in names]
    if missing or unexpected:
        raise ValueError(f"{source} does not match {what}: "
                         + (f"{len(missing)} missing keys (e.g. {missing[:3]})" if missing else "")
                         + ("; " if missing and unexpected else "")
                         + (f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})" if unexpected else ""))
    for name, shape in found.items():
        if tuple(shape) != expected[names[name]]:
            raise ValueError(f"{source}: {name} has shape {tuple(shape)}, but {what} expects {expected[names[name]]}")

# ----------------------------------------------------------------------------- models and resumable points


def save_model(path, model, meta):
    """A finished model: its state dict, its config (model.cfg, a dataclass) and `meta` (the run's)."""
    save(path, model.state_dict(), {"model_config": asdict(model.cfg), **meta})


def load_model(path, model_class, config_class, device="cpu"):
    """(model, metadata) of a file written by save_model."""
    state, meta = read(path)
    try:
        cfg = config_class(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["model_config"].items()})
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: its model config does not describe a {model_class.__name__}: {e}") from None
    with torch.random.fork_rng(devices=[]):   # its random initialisation, overwritten, leaves the caller's RNG alone
        model = model_class(cfg)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not fit the config stored with them: {e}") from None
    return model.to(device), meta


def _optimised(opt):
    return [p for group in opt.param_groups for p in group["params"]]


def state_tensors(module, opt, ema=None):
    """What a resumable point holds: the trainable parameters (LoRA's adapters alone when the base is frozen),
    AdamW's moments and, given, the weights' moving average (ema: a tensor per trainable parameter), by name."""
    trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    tensors = {f"model.{n}": p for n, p in trainable}
    tensors.update({f"ema.{n}": e for (n, _), e in zip(trainable, ema or [])})
    for i, p in enumerate(_optimised(opt)):
        for key, value in opt.state.get(p, {}).items():
            tensors[f"optim.{i}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return tensors


def save_state(path, tensors, step, config):
    """A resumable point: state_tensors(module, opt), the step, and the run's config (a dict)."""
    save(path, tensors, {"step": step, "config": config})


def load_state(path, module, opt, config, place=None, ema=None):
    """Restore a point written by save_state into module, opt and, given, ema (the moving average's tensors, one per
    trainable parameter); returns its step. The run's config must be the one it was written with.
    place(tensor, param): the file's whole tensor as this process holds param's values (a sharded parameter's
    shard, train.py's FSDP2); default: as it is, on param's device."""
    tensors, meta = read(path)
    if meta.get("config") != config:
        diff = ", ".join(_differences(meta.get("config") or {}, config)) or "its format"
        raise ValueError(f"{path} was written by a run with another configuration (differs in: {diff}); "
                         f"resume with the same flags, or use another --out")
    trainable = {n: p for n, p in module.named_parameters() if p.requires_grad}
    missing = [n for n in trainable if f"model.{n}" not in tensors]
    missing += [f"ema.{n}" for n in trainable if ema is not None and f"ema.{n}" not in tensors]
    if missing:
        raise ValueError(f"{path} lacks trainable parameters of this model, e.g. {missing[:3]}")
    place = place or (lambda tensor, param: tensor.to(param.device))
    with torch.no_grad():
        for name, p in trainable.items():
            p.copy_(place(tensors[f"model.{name}"], p))
        for (name, p), e in zip(trainable.items(), ema or []):
            e.copy_(place(tensors[f"ema.{name}"], p))
    for i, p in enumerate(_optimised(opt)):
        keys = [k for k in tensors if k.startswith(f"optim.{i}.")]
        if keys:
            opt.state[p] = {k.rsplit(".", 1)[1]: place(tensors[k], p) for k in keys}
    return meta["step"]


def _differences(a, b, prefix=""):
    """Dotted names of the leaves where two nested dicts differ."""
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            yield from _differences(x, y, f"{prefix}{key}.")
        elif x != y:
            yield prefix + key

# ----------------------------------------------------------------------------- LoRA adapters


def save_lora(model, path):
    """Write just a model's adapters (names ending in lora_A / lora_B) and their rank / alpha."""
    if model.lora_config() is None:
        raise ValueError("this model has no LoRA adapters to save")
    rank, alpha = model.lora_config()
    adapters = {n: p for n, p in model.named_parameters() if n.endswith((".lora_A", ".lora_B"))}
    write_atomic(path, adapters, {"lora_rank": str(rank), "lora_alpha": repr(alpha)})


def load_lora(model, path):
    """Load adapters written by save_lora, adding them (with the file's rank / alpha) if the model has none."""
    path = Path(path)
    headers, metadata = read_headers([path])
    if "lora_rank" not in metadata or "lora_alpha" not in metadata:
        raise ValueError(f"{path}: not a LoRA adapter file (no lora_rank / lora_alpha metadata)")
    rank, alpha = int(metadata["lora_rank"]), float(metadata["lora_alpha"])
    if model.lora_config() is None:
        model.add_lora(rank, alpha)
    elif model.lora_config() != (rank, alpha):
        raise ValueError(f"{path}: adapters of rank {rank}, alpha {alpha}; the model has {model.lora_config()}")
    expected = {n: tuple(p.shape) for n, p in model.named_parameters() if n.endswith((".lora_A", ".lora_B"))}
    identity = {n: n for n in expected}
    check_names_and_shapes(expected, {n: shape for n, (_, shape, _) in headers.items()}, identity, path)
    adapters = read_tensors(headers, identity)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in adapters:
                p.copy_(adapters[name])
