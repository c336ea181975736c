"""Processes and devices: the Runtime of one training process, data parallelism under torchrun (every process a
slice of each global batch, gradients averaged) and FSDP2 sharding of the video model (stage 1 of the 2B recipe).

Not here: the training loop that uses them (train.py).
"""
import os
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

import video_model


@dataclass(frozen=True)
class Runtime:
    """This process: its rank among world_size data-parallel processes, its device, and whether its forward passes
    run under bf16 autocast (--precision, resolved by uses_bf16)."""
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    bf16: bool = False

    def autocast(self):
        return torch.autocast(self.device.type, torch.bfloat16, enabled=self.bf16)

    def log(self, *msg):
        if self.rank == 0:
            print(*msg, flush=True)

    def rows(self, batch):
        """This process's rows of a global batch (a dataclass of tensors): every world_size-th, from its rank."""
        rows = {f.name: getattr(batch, f.name) for f in fields(batch)}
        return type(batch)(**{name: None if t is None else t[self.rank::self.world_size].to(self.device)
                              for name, t in rows.items()})


def setup(cfg):
    """The Runtime. Under torchrun: one process group, every process a slice of each batch."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          "cpu" if cfg.device == "auto" else cfg.device)
    bf16 = uses_bf16(cfg.precision, device)
    if "RANK" not in os.environ:
        return Runtime(0, 1, device, bf16)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    return Runtime(dist.get_rank(), dist.get_world_size(), device, bf16)


def uses_bf16(precision, device, cpuinfo="/proc/cpuinfo"):
    """--precision fp32 | bf16 | auto on `device`: auto is bf16 where the hardware multiplies bf16 natively, a CUDA
    GPU that supports it or a CPU with AVX512-BF16 or AMX instructions (on this project's 2-core CPU a bf16 matmul
    ran 4x faster than an fp32 one), else fp32: a CPU without them has no fast bf16 path to gain from."""
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path(cpuinfo).read_text().split()
    except OSError:   # not Linux: no way to tell here
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def average_gradients(params, world_size):
    """Data parallelism: each process holds the gradient of the mean loss over its rows; averaging over processes
    gives the gradient of the mean over the whole batch (equal row counts)."""
    for p in params:
        dist.all_reduce(p.grad)
        p.grad /= world_size


def shard(video):
    """FSDP2: every DiT block one unit, the rest of the model another. Each process keeps 1/N of every parameter,
    gradient and AdamW moment; a unit's weights are gathered for its forward and its backward only."""
    for block in video.blocks:
        fully_shard(block)
    return fully_shard(video)


def gathered(video):
    """The whole model, on every process, from an FSDP2-sharded one (a collective: every process calls it)."""
    full = whole(video.state_dict())
    with torch.device("meta"):
        plain = video_model.VideoDiT(video.cfg)
    if video.lora_config() is not None:
        plain.add_lora(*video.lora_config())
    plain.load_state_dict(full, assign=True)
    plain.checkpoint_blocks = video.checkpoint_blocks
    return plain


def whole(tensors):
    """{name: tensor} with every sharded tensor gathered whole (a collective: every process calls it)."""
    return {name: t.full_tensor() if isinstance(t, DTensor) else t for name, t in tensors.items()}


def shard_like(tensor, param):
    """A whole tensor read from a file, as this process holds `param`'s values: its shard of a sharded parameter
    (or of an AdamW moment of one), else the tensor itself on param's device (checkpoints.load_state's place)."""
    if isinstance(param, DTensor) and tensor.shape == param.shape:
        return distribute_tensor(tensor.to(param.dtype), param.device_mesh, param.placements)
    return tensor.to(param.device)
