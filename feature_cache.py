"""Stage 2's frozen video states, computed once before stage 2 and looked up afterwards (an efficiency choice, not
the paper's).

Stage 2 reads the frozen video model's layer-k states on a window's latents noised to tau_v,
x_tau = (1 - tau_v) x0 + tau_v eps. With tau_v fixed (the built-in world trains its decoder at tau_v = 1, the only
tau_v its policy uses) those states depend on the window and the noise eps alone. So each training window's states
are computed for `draws` noise draws, and a stage-2 step looks up one of them instead of running blocks 0..k: the
step is the decoder's alone. The departure from the paper: the decoder sees `draws` noise draws per window over all
of stage 2, instead of a fresh one each time the window is drawn.

Not here: the stage-2 loss that reads them (train.action_loss) and the batches (train.draw_action_batch).
"""
import time

import numpy as np
import torch
import torch.distributed as dist

import flow
import latent_data

CHUNK = 64   # windows per forward pass; the noise of a chunk depends on (seed, draw, first window) only


class FeatureCache:
    """states: (draws, windows, tokens, width) on the CPU (float32, or bf16 under bf16 autocast), the video model's
    tokens after block k for every training window (window i: windows.batch([i])) with the noise of draw d."""

    def __init__(self, video, windows, tokenizer, n_cond, k, tau_v, draws, seed, rt):
        self.video, self.windows, self.tokenizer = video, windows, tokenizer
        self.n_cond, self.k, self.tau_v, self.draws, self.seed = n_cond, k, float(tau_v), draws, seed
        start, chunks = time.perf_counter(), [(d, i) for d in range(draws) for i in range(0, len(windows), CHUNK)]
        for n, (d, i) in enumerate(chunks):   # under torchrun each process computes every world_size-th chunk
            if n % rt.world_size != rt.rank:
                continue
            with rt.autocast():   # as the uncached step computes them
                states = self.compute(d, i, rt.device).cpu()
            if n == rt.rank:
                self.states = torch.zeros(draws, len(windows), *states.shape[1:], dtype=states.dtype)
            self.states[d, i:i + len(states)] = states
        if rt.world_size > 1:   # the others' chunks are zeros here: summing fills them in
            dist.all_reduce(self.states)
        rt.log(f"action: cached the frozen video model's block-{k} states at tau_v {self.tau_v:g} for "
               f"{len(windows)} windows x {draws} noise draws ({self.states.numel() * self.states.element_size() / 1e9:.2f}"
               f" GB) in {time.perf_counter() - start:.0f}s")

    def noise_generator(self, draw, first):
        """The generator of the video noise of the chunk of windows from `first` in draw `draw`."""
        return torch.Generator().manual_seed((self.seed * self.draws + draw) * len(self.windows) + first)

    @torch.no_grad()
    def compute(self, draw, first, device):
        """The states of windows first .. first + CHUNK - 1 in draw `draw`, from blocks 0..k of the video model."""
        b = self.windows.batch(np.arange(first, min(first + CHUNK, len(self.windows))))
        x0 = latent_data.clean_latents(b, self.tokenizer)
        eps = torch.randn(x0.shape, generator=self.noise_generator(draw, first))
        x0, eps, tau_v = x0.to(device), eps.to(device), torch.full((len(x0),), self.tau_v, device=device)
        x_tau = flow.interpolate(x0, eps, tau_v)
        return self.video.video2world_hidden_states(x_tau, tau_v, b["text"].to(device), x0, self.n_cond, self.k)

    def lookup(self, draw, window):
        """The states (B, tokens, width) of windows `window` (B,) in draws `draw` (B,)."""
        return self.states[draw.cpu(), window.cpu()].to(window.device)
