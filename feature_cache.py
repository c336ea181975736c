"""Stage 2's frozen video states, computed once before stage 2 and looked up afterwards (an efficiency choice, not
the paper's).

Stage 2 reads the frozen video model's layer-k states on a window's latents noised to tau_v,
x_tau = (1 - tau_v) x0 + tau_v eps: they depend on the window, tau_v and the noise eps alone. So each training
window's states are computed for `draws` draws of (tau_v, eps), and a stage-2 step looks up one of them instead of
running blocks 0..k: the step is the decoder's alone. tau_v is either fixed (the built-in world trains its decoder at
tau_v = 1, the only tau_v its policy uses) or, with tau_v "uniform", drawn uniformly in (0, 1] once per window and
draw. The departure from the paper: the decoder sees `draws` draws per window over all of stage 2, instead of a
fresh one each time the window is drawn.

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
    tokens after block k for every training window (window i: windows.batch([i])) with the noise of draw d, its
    latents noised to tau_vs[d, i] (draws, windows): tau_v, or with "uniform" a draw of its own."""

    def __init__(self, video, windows, tokenizer, n_cond, k, tau_v, draws, seed, rt):
        self.video, self.windows, self.tokenizer = video, windows, tokenizer
        self.n_cond, self.k, self.draws, self.seed = n_cond, k, draws, seed
        if tau_v == "uniform":   # 1 - U[0, 1): uniform on (0, 1], as the uncached stage 2 draws it
            self.tau_vs = 1 - torch.rand(draws, len(windows), generator=torch.Generator().manual_seed(seed))
        else:
            self.tau_vs = torch.full((draws, len(windows)), float(tau_v))
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
        at = "tau_v uniform in (0, 1], one per window and draw" if tau_v == "uniform" else f"tau_v {float(tau_v):g}"
        rt.log(f"action: cached the frozen video model's block-{k} states at {at} for "
               f"{len(windows)} windows x {draws} noise draws ({self.states.numel() * self.states.element_size() / 1e9:.2f}"
               f" GB) in {time.perf_counter() - start:.0f}s")

    def noise_generator(self, draw, first):
        """The generator of the video noise of the chunk of windows from `first` in draw `draw`."""
        return torch.Generator().manual_seed((self.seed * self.draws + draw) * len(self.windows) + first)

    @torch.no_grad()
    def compute(self, draw, first, device):
        """The states of windows first .. first + CHUNK - 1 in draw `draw`, from blocks 0..k of the video model."""
        last = min(first + CHUNK, len(self.windows))
        b = self.windows.batch(np.arange(first, last))
        x0 = latent_data.clean_latents(b, self.tokenizer)
        eps = torch.randn(x0.shape, generator=self.noise_generator(draw, first))
        x0, eps, tau_v = x0.to(device), eps.to(device), self.tau_vs[draw, first:last].to(device)
        x_tau = flow.interpolate(x0, eps, tau_v)
        return self.video.video2world_hidden_states(x_tau, tau_v, b["text"].to(device), x0, self.n_cond, self.k)

    def lookup(self, draw, window):
        """The states (B, tokens, width) of windows `window` (B,) in draws `draw` (B,)."""
        return self.states[draw.cpu(), window.cpu()].to(window.device)
