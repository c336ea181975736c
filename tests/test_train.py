"""train.py and sample.py end to end, on the smoke preset (a few steps of each stage on a tiny dataset)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import train
from sample import VAMPolicy

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def world_data(tmp_path_factory):
    """The smoke preset's dataset, generated once for the module."""
    return str(tmp_path_factory.mktemp("data") / "world")


def smoke(out, world_data, *extra):
    return ["--preset", "smoke", "--world_data", world_data, "--out", str(out), *extra]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, world_data):
    """One smoke run through the real command line, as a user starts it."""
    out = tmp_path_factory.mktemp("run")
    proc = subprocess.run([sys.executable, "train.py", *smoke(out, world_data)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, proc.stdout


def test_smoke_run_trains_both_stages_and_evaluates(finished_run):
    out, stdout = finished_run
    assert "video      4/4" in stdout and "action      4/4" in stdout
    results = json.loads((out / "results.json").read_text())
    assert 0 <= results["mean"] <= 1 and sum(t["episodes"] for t in results["tasks"].values()) == 8
    assert "success" in stdout.splitlines()[-2]
    for name in ("video", "action"):
        assert (out / f"{name}.safetensors").is_file() and (out / f"{name}.state.safetensors").is_file()


def test_policy_returns_chunks_and_runs_exactly_k_plus_1_blocks(finished_run):
    out, _ = finished_run
    policy, meta = VAMPolicy.load(out)
    k = meta["run"]["k"]
    calls = {"blocks": 0, "velocity": 0}
    for block in policy.video.blocks:
        block.register_forward_hook(lambda *_: calls.__setitem__("blocks", calls["blocks"] + 1))
    velocity = policy.video.video2world_velocity
    policy.video.video2world_velocity = lambda *a: calls.__setitem__("velocity", calls["velocity"] + 1) or velocity(*a)
    frames = np.zeros((3, policy.spec.history, 32, 32, 3), dtype=np.uint8)
    chunk = policy.act_batch(frames, ["pick up the green block"] * 3, np.zeros((3, 3), dtype=np.float32))
    assert chunk.shape == (3, meta["model_config"]["H_a"], 3) and np.isfinite(chunk).all()
    assert calls == {"blocks": k + 1, "velocity": 0}      # tau_v = 1: no video integration, blocks 0..k once
    assert policy.act(frames[0], "pick up the green block", np.zeros(3)).shape == chunk.shape[1:]
    # tau_v < 1 integrates the video flow first: `video_steps` full passes, then blocks 0..k
    policy, _ = VAMPolicy.load(out, tau_v=0.5, video_steps=3)
    calls.update(blocks=0, velocity=0)
    for block in policy.video.blocks:
        block.register_forward_hook(lambda *_: calls.__setitem__("blocks", calls["blocks"] + 1))
    policy.act_batch(frames, ["pick up the green block"] * 3, np.zeros((3, 3), dtype=np.float32))
    assert calls["blocks"] == 3 * len(policy.video.blocks) + k + 1


def test_sample_cli_evaluates_and_benchmarks(finished_run):
    out, _ = finished_run
    proc = subprocess.run([sys.executable, "sample.py", "--out", str(out), "--episodes", "1", "--bench"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "video pass" in proc.stdout and "action integration" in proc.stdout


def final_weights(out):
    return {**{f"video.{k}": v for k, v in load_file(out / "video.safetensors").items()},
            **{f"action.{k}": v for k, v in load_file(out / "action.safetensors").items()}}


def test_resume_after_a_kill_equals_an_uninterrupted_run(tmp_path, world_data, monkeypatch):
    args = ["--eval.episodes", "1", "--action.steps", "6", "--ckpt_every", "2"]
    train.main(smoke(tmp_path / "whole", world_data, *args))
    # kill the second run in stage 2, after its 5th optimiser step (its last checkpoint is step 4)
    calls, step = {"n": 0}, torch.optim.AdamW.step

    def dying_step(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 4 + 5 + 1:
            raise KeyboardInterrupt("killed")
        return step(self, *a, **kw)

    monkeypatch.setattr(torch.optim.AdamW, "step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        train.main(smoke(tmp_path / "killed", world_data, *args))
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    with pytest.raises(SystemExit, match="--resume"):   # a finished or started run is never overwritten
        train.main(smoke(tmp_path / "killed", world_data, *args))
    train.main(smoke(tmp_path / "killed", world_data, *args, "--resume"))
    whole, resumed = final_weights(tmp_path / "whole"), final_weights(tmp_path / "killed")
    assert whole.keys() == resumed.keys()
    for name in whole:
        torch.testing.assert_close(resumed[name], whole[name], rtol=0, atol=1e-6, msg=name)
    assert json.loads((tmp_path / "whole/results.json").read_text())["mean"] == \
        json.loads((tmp_path / "killed/results.json").read_text())["mean"]


def test_a_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "x.safetensors"
    train.save_atomic(path, {"w": torch.ones(3)}, {"step": 1})

    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk unplugged")

    monkeypatch.setattr(train, "save_file", crash)
    with pytest.raises(OSError):
        train.save_atomic(path, {"w": torch.zeros(3)}, {"step": 2})
    tensors, meta = train.read_checkpoint(path)
    assert meta == {"step": 1} and torch.equal(tensors["w"], torch.ones(3))


def test_nan_loss_stops_with_stage_and_step(tmp_path, world_data, monkeypatch):
    real = train.action_loss

    def poisoned(*a, **kw):
        loss, per_sample, tau = real(*a, **kw)
        return loss * float("nan"), per_sample, tau

    monkeypatch.setattr(train, "action_loss", poisoned)
    with pytest.raises(SystemExit, match=r"action stage: the loss is nan at step 0"):
        train.main(smoke(tmp_path, world_data))
    assert (tmp_path / "video.safetensors").is_file()   # stage 1's result is kept


@pytest.mark.parametrize("argv, message", [
    (["--video.steps", "many"], "invalid int value"),
    (["--eval.gif", "maybe"], "takes true or false"),
    (["--action.schedule", "exp"], "schedule must be constant, linear or cosine"),
    (["--eval.tau_v", "0"], "tau_v must lie in"),
    (["--action.tau_v", "2"], "'uniform' or a number in"),
    (["--preset", "nope"], "invalid choice"),
])
def test_bad_flags_are_refused_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(argv)
    assert message in str(e.value.code) + capsys.readouterr().err


def test_help_lists_every_field(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    text = capsys.readouterr().out
    for name, _, _ in train._leaves(train.Config()):
        assert f"--{name}" in text


def test_missing_dataset_is_named(tmp_path):
    with pytest.raises(SystemExit, match="manifest.json"):
        train.main(["--preset", "smoke", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")])


def test_two_processes_average_to_the_single_process_gradient(tmp_path, world_data):
    """torchrun, 2 processes on gloo: each takes its rows of the same global batch; the averaged gradients equal
    the gradient one process computes on the whole batch."""
    script = ROOT / "tests" / "ddp_gradients.py"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", "29517", str(script), world_data, str(tmp_path / "grads.json")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "grads.json").read_text())
    assert result["parameters"] > 100
    assert result["max_abs_diff"] < 1e-6 * max(1.0, result["max_abs_grad"])


def test_torchrun_runs_the_training_command(tmp_path, world_data):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", "29518", "train.py", *smoke(tmp_path, world_data, "--eval.episodes", "1")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "world size 2" in proc.stdout and (tmp_path / "results.json").is_file()
