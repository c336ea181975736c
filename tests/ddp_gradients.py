"""Run by tests/test_train.py under torchrun (2 processes, gloo): both stages' data-parallel gradients, averaged over
the processes, against the gradient of one process on the whole global batch (stage 2 also with a FeatureCache,
each process computing half of it). Writes the comparison as JSON.

    python -m torch.distributed.run --nproc_per_node 2 tests/ddp_gradients.py DATA_DIR OUT.json
"""
import json
import sys
from dataclasses import replace

import torch
import torch.distributed as dist

import config
import data
import encoders
import parallel
import train
from feature_cache import FeatureCache

world_data, out_file = sys.argv[1], sys.argv[2]
cfg, _ = config.parse_args(["--preset", "smoke", "--world_data", world_data])
rt = parallel.setup(cfg)
assert rt.world_size == 2, "run me with torchrun --nproc_per_node 2"
run = train.load_data(cfg, rt)
tokenizer = encoders.SpaceToDepth(cfg.tokenizer_factor)
norms = (data.Normalizer(run.dataset.manifest["proprio_range"]), data.Normalizer(run.dataset.manifest["action_range"]))
torch.manual_seed(0)
video = train.build_video(cfg, run, rt.device)
decoder = train.build_decoder(cfg, run, video)
with torch.no_grad():   # move off the zero-initialised layers, so that every parameter gets a gradient
    for p in list(video.parameters()) + list(decoder.parameters()):
        p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))


def gradients(stage, runtime, repeats=1, cached=False):
    g = train.step_generator(cfg.seed, stage, 0)
    if stage == "video":
        module = video.requires_grad_(True)
        batch = runtime.rows(train.draw_video_batch(g, run.windows, tokenizer, cfg.video.batch_size))
        loss = train.video_loss(video, batch, run.spec.history)[0]
    else:
        module = decoder
        video.requires_grad_(False)
        s, cache = replace(cfg.action, repeats=repeats), None
        if cached:   # every chunk of the cache computed by one of the processes, then shared
            s = replace(s, tau_v="1.0", cache=2)
            cache = FeatureCache(video, run.windows, tokenizer, run.n_cond, s.k, 1.0, 2, cfg.seed, runtime)
        batch = runtime.rows(train.draw_action_batch(g, run.windows, tokenizer, norms, s, cache))
        loss = train.action_loss(video, decoder, batch, run.spec.history, cfg.action.k, repeats, cache)[0]
    params = [p for p in module.parameters() if p.requires_grad]
    module.zero_grad(set_to_none=True)
    loss.backward()
    return params


worst, largest, count = 0.0, 0.0, 0
for stage, repeats, cached in (("video", 1, False), ("action", 1, False), ("action", 2, False),   # repeats 2: 4
                               ("action", 1, True)):                                              # video examples
    single = [p.grad.clone() for p in gradients(stage, parallel.Runtime(0, 1, rt.device), repeats, cached)]
    params = gradients(stage, rt, repeats, cached)
    parallel.average_gradients(params, rt.world_size)
    for p, ref in zip(params, single):
        worst = max(worst, (p.grad - ref).abs().max().item())
        largest = max(largest, ref.abs().max().item())
        count += 1
if rt.rank == 0:
    with open(out_file, "w") as f:
        json.dump({"max_abs_diff": worst, "max_abs_grad": largest, "parameters": count}, f)
dist.destroy_process_group()
