"""What pre-encoding costs: the tiny random Wan VAE and T5 (tests/tiny_models.py) on a tiny LeRobot v3.0 dataset
(tests/lerobot_fixtures.py, h264) run through preencode.py on this machine's CPU, timed by stage; and the disk cost
of the real VAE's latents for a dataset of given sizes, computed (not measured) from the format.

    python benchmarks/preencode_cost.py                                  # tiny models, 64x64 frames, 5 + 4 frames
    python benchmarks/preencode_cost.py --size 128 --future 12 --threads 2
    python benchmarks/preencode_cost.py --disk-only --episodes 1693 --frames 273465 --size 256 --future 56

Prints the wall times (decode, VAE, T5, all of preencode), windows per second and bytes per episode.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
import encoders  # noqa: E402
import lerobot  # noqa: E402
import preencode  # noqa: E402
from lerobot_fixtures import make_episodes, write_lerobot  # noqa: E402
from tiny_models import save_cosmos_encoders  # noqa: E402


def disk_cost(episodes, frames, size, history, future, horizon, action_dim, proprio_dim, z_dim=16, dtype_bytes=2,
              every=1):
    """Bytes of a latent dataset with one window per step (every `every` steps): latents C x T_lat x (H/8)^2 in
    dtype_bytes each, plus the float32 proprio and action chunk and two int64 per window."""
    windows = (frames - episodes) // every           # an episode of N frames has N - 1 steps
    t_lat = (history + future - 1) // 4 + 1
    latent = z_dim * t_lat * (size // 8) ** 2 * dtype_bytes
    rest = 4 * proprio_dim + 4 * horizon * action_dim + 16
    return windows, t_lat, latent, rest, windows * (latent + rest)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=64, help="square frame side")
    ap.add_argument("--history", type=int, default=5)
    ap.add_argument("--future", type=int, default=4, help="future frames (history + future = 1 + 4n)")
    ap.add_argument("--horizon", type=int, default=16)
    ap.add_argument("--lengths", type=int, nargs="+", default=[30] * 4, help="episode lengths (frames)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--disk-only", action="store_true", help="only the computed disk cost")
    ap.add_argument("--episodes", type=int, default=1693)
    ap.add_argument("--frames", type=int, default=273465)
    args = ap.parse_args()
    if args.disk_only:
        windows, t_lat, latent, rest, total = disk_cost(args.episodes, args.frames, args.size, args.history,
                                                        args.future, args.horizon, 10, 8)
        print(f"{windows} windows x ({latent} B latents [16 x {t_lat} x {args.size // 8} x {args.size // 8} bf16] + "
              f"{rest} B proprio, actions, indices) = {total / 1e9:.1f} GB ({total / 2**30:.1f} GiB), "
              f"{total / args.episodes / 1e6:.1f} MB per episode")
        return
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cosmos = save_cosmos_encoders(tmp / "cosmos")
        src = write_lerobot(tmp / "lerobot", make_episodes(args.lengths, size=(args.size, args.size)))
        reader = lerobot.LeRobotReader(src, "observation.images.image")
        start = time.perf_counter()
        for e in range(len(reader)):
            reader.episode(e)
        decode_s = time.perf_counter() - start
        vae, t5 = encoders.build(encoders.cosmos_spec(str(cosmos)))
        clip = torch.randint(0, 256, (args.batch, args.history + args.future, args.size, args.size, 3),
                             dtype=torch.uint8)
        vae.encode(clip)   # warm-up
        start = time.perf_counter()
        vae.encode(clip)
        vae_s = time.perf_counter() - start
        start = time.perf_counter()
        t5(["pick up the green block", "push the blue block"])
        t5_s = (time.perf_counter() - start) / 2
        spec = preencode.data.WindowSpec(args.history, args.horizon, 1, 1, args.future)
        start = time.perf_counter()
        manifest = preencode.preencode(reader, tmp / "latents", spec, encoders.cosmos_spec(str(cosmos)),
                                       batch=args.batch, log=lambda *a: None)
        total_s = time.perf_counter() - start
    windows = sum(s["windows"] for s in manifest["shards"])
    stored = sum(s["bytes"] for s in manifest["shards"]) + manifest["text"]["bytes"]
    frames = sum(args.lengths)
    print(f"{len(args.lengths)} episodes, {frames} frames of {args.size}x{args.size}, windows of {args.history} + "
          f"{args.future} frames -> latents {manifest['latent_shape']} bf16; {torch.get_num_threads()} threads")
    print(f"decode (h264, PyAV): {decode_s:.2f} s for {frames} frames = {frames / decode_s:.0f} frames/s")
    print(f"tiny VAE: {vae_s:.2f} s for {args.batch} clips = {args.batch / vae_s:.1f} windows/s "
          f"({args.batch * (args.history + args.future) / vae_s:.0f} frames/s)")
    print(f"tiny T5: {t5_s * 1e3:.0f} ms per instruction (512 tokens)")
    print(f"preencode: {windows} windows in {total_s:.1f} s = {windows / total_s:.1f} windows/s; "
          f"{stored} bytes = {stored / len(args.lengths) / 1e3:.1f} kB per episode "
          f"({stored / windows / 1e3:.1f} kB per window)")


if __name__ == "__main__":
    main()
