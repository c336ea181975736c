"""Sampling an action chunk with the video keys/values cached (ActionDecoder.sample) against recomputing them at every
Euler step (the plain forward inside flow.euler). Prints wall times (median of --repeats) and the FLOP ratio.

    python benchmarks/decoder_kv_cache.py --preset tiny --tokens 256 2048
"""
import argparse
import os
import statistics
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import flow  # noqa: E402
from action_decoder import ActionDecoder, preset  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--tokens", type=int, nargs="+", default=[256, 2048], help="video tokens N")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = preset(args.preset)
    dec = ActionDecoder(cfg).eval()
    proprio = torch.randn(args.batch, cfg.proprio_dim)
    print(f"preset {args.preset}, batch {args.batch}, {args.steps} Euler steps, {args.threads} thread(s), "
          f"torch {torch.__version__}")

    for n in args.tokens:
        video = torch.randn(args.batch, n, cfg.video_dim)

        def cached():
            return dec.sample(video, 1.0, proprio, steps=args.steps, generator=torch.Generator().manual_seed(0))

        def recomputed():
            noise = torch.randn(args.batch, cfg.H_a, cfg.action_dim, generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                return flow.euler(lambda x, tau: dec(video, 1.0, proprio, x, tau), noise, 1.0, 0.0, args.steps)

        times, flops = {}, {}
        for name, fn in (("cached", cached), ("recomputed", recomputed)):
            with FlopCounterMode(display=False) as counter:
                fn()
            flops[name] = counter.get_total_flops()
            samples = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                fn()
                samples.append(time.perf_counter() - t)
            times[name] = statistics.median(samples)
        print(f"N = {n:5d}: cached {times['cached'] * 1e3:8.1f} ms, recomputed {times['recomputed'] * 1e3:8.1f} ms, "
              f"time ratio {times['recomputed'] / times['cached']:.2f}x, FLOP ratio "
              f"{flops['recomputed'] / flops['cached']:.2f}x")


if __name__ == "__main__":
    main()
