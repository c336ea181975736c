"""Open-loop errors of finished built-in-world runs on the same fresh expert episodes (generated here with a seed no
run trained on), to tell a weak video model from a weak decoder without rolling out:
  - the video model's one-step prediction error of the future latents from noise (evaluation.video_prediction_error,
    which train.py logs on training windows after stage 1), with the "nothing moves" baseline;
  - the decoder's action error: sampled chunks against the expert's, in normalised units
    (evaluation.held_out_error, the policy as it acts: tau_v, k and the action steps of the run).

    python benchmarks/open_loop.py out/world out/world-seed1 ...      # one line per run
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import data  # noqa: E402
import evaluation  # noqa: E402
import expert  # noqa: E402
from sample import VAMPolicy  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="train.py output folders (video.safetensors, action.safetensors)")
    p.add_argument("--episodes", type=int, default=25, help="fresh expert episodes per task")
    p.add_argument("--seed", type=int, default=1000, help="seed of the fresh episodes (not a training seed)")
    p.add_argument("--windows", type=int, default=256, help="windows per error")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        expert.generate_dataset(Path(tmp), episodes_per_task=args.episodes, seed=args.seed)
        episodes = data.Dataset(Path(tmp))
        everyone = np.arange(len(episodes))
        for out in args.runs:
            policy, _ = VAMPolicy.load(out, seed=0)
            windows = data.Windows(episodes, policy.spec, policy.text_encoder, everyone)
            video = evaluation.video_prediction_error(policy.video, windows, policy.tokenizer, policy.n_cond,
                                                      max_windows=args.windows)
            action = evaluation.held_out_error(policy, episodes, policy.spec, everyone, max_windows=args.windows)
            print(json.dumps({"run": out, "video_one_step_mse": round(video["one_step_mse"], 4),
                              "nothing_moves_mse": round(video["nothing_moves_mse"], 4),
                              "action_mse": round(action, 4), "windows": video["windows"]}), flush=True)


if __name__ == "__main__":
    main()
