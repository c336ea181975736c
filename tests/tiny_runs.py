"""Tiny untrained LIBERO-shaped runs for the server and LIBERO tests: a dataset in data.py's format whose episodes
have LIBERO's shapes (two 32x32 cameras side by side, the 8-D state, 7-D actions or 10-D relative 6D ones), trained
for a few steps with train.py's smoke preset through its command line. Their policies act at random, with the
shapes, the history and the instruction handling of a real LIBERO policy."""
import subprocess
import sys
from pathlib import Path

import numpy as np

import data

ROOT = Path(__file__).resolve().parent.parent
INSTRUCTIONS = ("open the middle drawer of the cabinet", "put the bowl on the plate")
REPLAN = 5        # LIBERO's protocol; the runs' history stride, so that the server's history is the trained one


def libero_dataset(root, action_dim=7, episodes=4, T=12, seed=0):
    rng = np.random.default_rng(seed)
    eps = [data.Episode(rng.integers(0, 256, (T + 1, 32, 64, 3), dtype=np.uint8),
                        rng.uniform(-1, 1, (T + 1, 8)).astype(np.float32),
                        rng.uniform(-1, 1, (T, action_dim)).astype(np.float32), INSTRUCTIONS[e % 2])
           for e in range(episodes)]
    data.write_dataset(root, eps, control_hz=20, proprio_range=[[-4, 4]] * 8, action_range=[[-1, 1]] * action_dim,
                       action_pad=["zero"] * action_dim, description="random episodes in LIBERO's shapes")


def train_tiny_run(tmp, action_dim=7):
    """The run directory of a smoke-preset training on libero_dataset: H_o = 2 frames 5 steps apart, H_a = 8."""
    libero_dataset(tmp / "data", action_dim)
    out = tmp / "run"
    proc = subprocess.run([sys.executable, "train.py", "--preset", "smoke", "--data", str(tmp / "data"), "--out",
                           str(out), "--history", "2", "--history_stride", str(REPLAN), "--horizon", "8",
                           "--future_stride", "4", "--text_length", "32", "--holdout", "0", "--threads", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out
