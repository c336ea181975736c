"""Where one train.py optimiser step spends its time, per stage: the step's wall time (median of --steps), its FLOPs
per sample (torch's FlopCounterMode: matmuls and attention), the GFLOP/s that makes against an fp32 2048^2 matmul
measured in the same run, and the share of the CPU time in matmul and attention kernels (torch.profiler, self CPU
time) against everything else (drawing the batch, elementwise ops, norms, the optimiser, Python). Stage 2 is split
into the frozen video model's blocks 0..k (no gradient) and the decoder's forward, backward and AdamW. Every
forward runs under the autocast train.py would use (--precision: fp32, or bf16 where it resolves to bf16).

    python benchmarks/train_profile.py                        # the default run (world preset)
    python benchmarks/train_profile.py --action.repeats 4     # any train.py flag
    python benchmarks/train_profile.py --precision fp32       # against the default's bf16, where it is bf16

Run it alone: on 2 cores a second busy process takes about three quarters of the matmul rate.
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import config  # noqa: E402
import data  # noqa: E402
import flow  # noqa: E402
import parallel  # noqa: E402
import train  # noqa: E402

DENSE_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm",
             "aten::_scaled_dot_product_flash_attention_for_cpu",
             "aten::_scaled_dot_product_flash_attention_for_cpu_backward"}


def timed(fn, repeats):
    fn()   # warm-up: allocator, thread pool
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def report(name, fn, batch_size, repeats, peak):
    """Print and return the median seconds of fn, with its FLOPs and where its CPU time goes."""
    with FlopCounterMode(display=False) as counter:
        fn()
    flops = counter.get_total_flops()
    t = timed(fn, repeats)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    dense = sum(e.self_cpu_time_total for e in events if e.key in DENSE_OPS)
    print(f"{name}: {t * 1e3:.1f} ms per step of {batch_size} ({batch_size / t:.0f} samples/s); "
          f"{flops / batch_size / 1e9:.3f} GFLOP per sample, {flops / t / 1e9:.1f} GFLOP/s = {flops / t / 1e9 / peak:.0%} "
          f"of the matmul rate; matmul + attention {dense / total:.0%} of the CPU time")
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:8]
    print("    largest self CPU: " + ", ".join(f"{e.key.removeprefix('aten::')} {e.self_cpu_time_total / total:.0%}"
                                              for e in top))
    return t


def matmul_rate(n=2048, repeats=5):
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n ** 3 / timed(lambda: a @ b, repeats) / 1e9


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per measurement (their median)")
    args, rest = ap.parse_known_args()
    cfg, _ = config.parse_args(rest + ["--out", tempfile.mkdtemp(prefix="train_profile_")])
    rt = parallel.setup(cfg)
    torch.manual_seed(cfg.seed)
    run = train.load_data(cfg, rt)
    peak = matmul_rate()
    print(f"{len(run.windows)} training windows; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"an fp32 2048^2 matmul runs at {peak:.0f} GFLOP/s now")
    g = torch.Generator().manual_seed(0)

    video = train.build_video(cfg, run, rt.device).train()
    opt = torch.optim.AdamW(video.parameters(), lr=1e-4)

    def video_step():
        with rt.autocast():
            loss = train.video_loss(video, train.draw_video_batch(g, run.windows, run.tokenizer, cfg.video.batch_size),
                                    run.n_cond)[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    report("stage 1 (video) step", video_step, cfg.video.batch_size, args.steps, peak)
    t = timed(lambda: train.draw_video_batch(g, run.windows, run.tokenizer, cfg.video.batch_size), args.steps)
    print(f"    of which drawing the batch (windows, encoders, noise): {t * 1e3:.1f} ms")

    video.requires_grad_(False).eval()
    decoder = train.build_decoder(cfg, run, video).to(rt.device).train()
    opt = torch.optim.AdamW(decoder.parameters(), lr=1e-4)
    norms = (data.Normalizer(run.dataset.manifest["proprio_range"]),
             data.Normalizer(run.dataset.manifest["action_range"]))
    batch = train.draw_action_batch(g, run.windows, run.tokenizer, norms, cfg.action)

    def action_step():
        with rt.autocast():
            loss = train.action_loss(video, decoder, train.draw_action_batch(g, run.windows, run.tokenizer, norms,
                                                                             cfg.action), run.n_cond, cfg.action.k,
                                     cfg.action.repeats)[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    n = cfg.action.batch_size // cfg.action.repeats   # video examples per step (--action.repeats)

    def video_part():
        with torch.no_grad(), rt.autocast():
            x_tau = flow.interpolate(batch.x0[:n], batch.eps_v[:n], batch.tau_v[:n])
            return video.video2world_hidden_states(x_tau, batch.tau_v[:n], batch.text[:n], batch.x0[:n], run.n_cond,
                                                   cfg.action.k)

    states = video_part().repeat(cfg.action.repeats, 1, 1)

    def decoder_part():
        with rt.autocast():
            loss = decoder.loss(states, batch.tau_v, batch.proprio, batch.actions, batch.tau_a, batch.eps_a,
                                batch.drop_proprio).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    B = cfg.action.batch_size
    whole = report("stage 2 (action) step", action_step, B, args.steps, peak)
    t_draw = timed(lambda: train.draw_action_batch(g, run.windows, run.tokenizer, norms, cfg.action), args.steps)
    t_video = report(f"    the frozen video model, blocks 0..{cfg.action.k}, on {n} video examples", video_part, n,
                     args.steps, peak)
    t_decoder = report("    the decoder: forward, backward, AdamW", decoder_part, B, args.steps, peak)
    print(f"    shares of the step: drawing the batch {t_draw / whole:.0%}, video blocks {t_video / whole:.0%}, "
          f"decoder {t_decoder / whole:.0%}")
    # --action.cache D: the video blocks run once per window and draw before stage 2; a step draws its batch, looks
    # its states up in a (D, windows, tokens, width) table and runs the decoder
    table = torch.zeros(max(1, cfg.action.cache), len(run.windows), *states.shape[1:])
    rows = torch.randint(len(run.windows), (n,), generator=g)
    t_lookup = timed(lambda: table[torch.zeros_like(rows), rows], args.steps)
    cached = t_draw + t_lookup + t_decoder
    print(f"    with --action.cache D: building the cache {len(run.windows) * t_video / n:.0f} s per noise draw "
          f"({len(run.windows)} windows), then {cached * 1e3:.1f} ms per step (lookup {t_lookup * 1e3:.1f} ms), "
          f"{whole / cached:.2f}x faster than the step above")


if __name__ == "__main__":
    main()
