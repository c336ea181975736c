"""The paper's recipe end to end at toy sizes, through the commands a GPU user runs (`--preset cosmos-tiny`): a
tiny LeRobot dataset -> preencode.py (tiny Wan VAE and T5) -> train.py with a tiny pretrained Cosmos DiT: stage 1
LoRA, fused, stage 2 at layer k -> VAMPolicy acting on raw camera frames. Also: a kill in stage 1 resumed, bf16,
and torchrun with DDP and FSDP2 against one process."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import checkpoints
import cosmos_weights
import lerobot
import preencode
import train
from sample import VAMPolicy
from tiny_models import save_tiny_recipe

ROOT = Path(__file__).resolve().parent.parent
WINDOW = ["--history", "5", "--horizon", "4", "--future_stride", "1", "--future_frames", "4"]   # cosmos-tiny's


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    """(the tiny Cosmos folder with lerobot/, the pre-encoded dataset)."""
    root = save_tiny_recipe(tmp_path_factory.mktemp("recipe"))
    preencode.main([str(root / "lerobot"), str(root / "latents"), "--encoder_source", str(root), "--device", "cpu",
                    *WINDOW])
    return root, root / "latents"


def recipe_args(recipe, out, *extra):
    root, latents = recipe
    return ["--preset", "cosmos-tiny", "--data", str(latents), "--video.pretrained", str(root), "--out", str(out),
            *extra]


@pytest.fixture(scope="module")
def finished(recipe, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    train.main(recipe_args(recipe, out))
    return out


def adapters(run):
    """The stage-1 resumable point's trainable tensors: the LoRA adapters after the last step."""
    tensors, _ = checkpoints.read(run / "video.state.safetensors")
    return {name: t for name, t in tensors.items() if name.startswith("model.")}


def assert_fused(root, run, dtype):
    """The run's video.safetensors is the pretrained model (in dtype) with the trained adapters fused into it,
    bit for bit: stage 1 changed nothing but the adapters."""
    video = cosmos_weights.from_pretrained(root, dtype=dtype)
    video.add_lora(4, 8.0)
    video.load_state_dict({n.removeprefix("model."): t for n, t in adapters(run).items()}, strict=False)
    video.fuse_lora()
    saved, _ = checkpoints.read(run / "video.safetensors")
    assert saved.keys() == video.state_dict().keys()
    for name, t in video.state_dict().items():
        assert torch.equal(saved[name], t), name


def test_the_recipe_trains_lora_fuses_and_the_policy_acts_on_camera_frames(recipe, finished):
    root, _ = recipe
    results = json.loads((finished / "results.json").read_text())
    assert results["held_out_episodes"] == 2 and np.isfinite(results["held_out_action_mse"])
    # stage 1 trained the adapters alone; what was saved is the pretrained model with them fused in
    trained = adapters(finished)
    assert trained and all(".lora_A" in n or ".lora_B" in n for n in trained)
    assert_fused(root, finished, torch.float32)
    # the policy: raw uint8 frames of a LeRobot episode through the VAE and T5 it rebuilds from the run
    policy, meta = VAMPolicy.load(finished)
    assert meta["run"]["k"] == 1 and policy.k == 1
    ep = lerobot.LeRobotReader(root / "lerobot", camera="observation.images.image").episode(0)
    calls = []
    for block in policy.video.blocks:
        block.register_forward_hook(lambda *_: calls.append(1))
    chunk = policy.act(ep.frames[:5], ep.instruction, ep.proprio[4])
    assert chunk.shape == (4, 3) and chunk.dtype == np.float32 and np.isfinite(chunk).all()
    assert len(calls) == 2     # tau_v = 1: one pass through blocks 0..k, k = 1 of 3


def test_a_kill_in_stage_1_resumes_to_the_uninterrupted_run(recipe, finished, tmp_path, monkeypatch):
    """cosmos-tiny checkpoints every 2 steps; killed after stage 1's 3rd step, resumed from its step 2."""
    calls, step = {"n": 0}, torch.optim.AdamW.step

    def dying_step(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt("killed")
        return step(self, *a, **kw)

    monkeypatch.setattr(torch.optim.AdamW, "step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        train.main(recipe_args(recipe, tmp_path / "run"))
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    _, meta = checkpoints.read(tmp_path / "run" / "video.state.safetensors")
    assert meta["step"] == 2 and not (tmp_path / "run" / "video.safetensors").exists()
    train.main(recipe_args(recipe, tmp_path / "run", "--resume"))
    for name in ("video.safetensors", "action.safetensors"):
        whole, _ = checkpoints.read(finished / name)
        resumed, _ = checkpoints.read(tmp_path / "run" / name)
        for key in whole:
            torch.testing.assert_close(resumed[key], whole[key], rtol=0, atol=1e-6, msg=f"{name}: {key}")


def test_bf16_keeps_the_base_in_bf16_and_the_adapters_and_adamw_in_fp32(recipe, finished, tmp_path):
    train.main(recipe_args(recipe, tmp_path / "run", "--precision", "bf16"))
    state, _ = checkpoints.read(tmp_path / "run" / "video.state.safetensors")
    assert {t.dtype for t in state.values() if t.ndim} == {torch.float32}     # adapters, exp_avg, exp_avg_sq
    saved, _ = checkpoints.read(tmp_path / "run" / "video.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}             # fused, then cast once
    assert_fused(recipe[0], tmp_path / "run", torch.bfloat16)                # in fp32, one rounding to bf16


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_train_the_adapters_one_process_trains(recipe, finished, tmp_path, parallel):
    """torchrun, 2 CPU processes on gloo: DDP (gradients averaged) and FSDP2 (the video model sharded per block)
    give the adapters one process trains on the same global batches."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    port = {"ddp": "29531", "fsdp": "29532"}[parallel]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           port, "train.py", *recipe_args(recipe, tmp_path / "run", "--parallel", parallel)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "world size 2" in proc.stdout
    one, two = adapters(finished), adapters(tmp_path / "run")
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-6, msg=name)
    saved, _ = checkpoints.read(tmp_path / "run" / "video.safetensors")   # gathered from the shards, then fused
    whole, _ = checkpoints.read(finished / "video.safetensors")
    for name in whole:
        torch.testing.assert_close(saved[name], whole[name], rtol=1e-4, atol=1e-6, msg=name)
