"""train.py and sample.py end to end, on the smoke preset (a few steps of each stage on a tiny dataset), and the
pieces of one training step: the batch draws, the frozen video model, the held-out split, the checks before stage 1."""
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import checkpoints
import config
import data
import encoders
import evaluation
import feature_cache
import flow
import latent_data
import parallel
import sample
import train
from action_decoder import ActionDecoder, preset as decoder_preset
from feature_cache import FeatureCache
from sample import VAMPolicy
from test_data import episode, write

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def world_data(tmp_path_factory):
    """The smoke preset's dataset, generated once for the module."""
    return str(tmp_path_factory.mktemp("data") / "world")


def smoke(out, world_data, *extra):
    return ["--preset", "smoke", "--world_data", world_data, "--out", str(out), *extra]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, world_data):
    """One smoke run of train.py's command line, in this process (the torchrun test below starts it as a user does,
    in processes of its own)."""
    out, stdout = tmp_path_factory.mktemp("run"), io.StringIO()
    with contextlib.redirect_stdout(stdout):
        train.main(smoke(out, world_data))
    return out, stdout.getvalue()

# ----------------------------------------------------------------------------- the command, end to end


def first_batch_loss(stage, video, decoder, cfg, run):
    """The loss of a stage's first training batch (step 0's generator) under the given models."""
    g = train.step_generator(cfg.seed, stage, 0)
    tokenizer = encoders.SpaceToDepth(cfg.tokenizer_factor)
    with torch.no_grad():
        if stage == "video":
            return train.video_loss(video, train.draw_video_batch(g, run.windows, tokenizer, cfg.video.batch_size),
                                    run.spec.history)[0].item()
        norms = (data.Normalizer(run.dataset.manifest["proprio_range"]),
                 data.Normalizer(run.dataset.manifest["action_range"]))
        batch = train.draw_action_batch(g, run.windows, tokenizer, norms, cfg.action)
        return train.action_loss(video, decoder, batch, run.spec.history, cfg.action.k)[0].item()


def test_a_world_dataset_made_by_another_seed_is_named_when_reused(finished_run, world_data, tmp_path):
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        train.main(smoke(tmp_path, world_data, "--seed", "1", "--video.steps", "1", "--action.steps", "1",
                         "--eval.episodes", "1"))
    assert f"data: note: {world_data} was generated with seed 0 and 4 demonstrations per task, not this run's 1 and 4" \
        in stdout.getvalue()
    assert "data: note" not in finished_run[1]   # the run that generated it


def test_smoke_run_trains_both_stages_and_evaluates(finished_run, world_data):
    out, stdout = finished_run
    logged = [line for line in stdout.splitlines() if line.startswith(("video ", "action "))]
    assert [line.split()[1] for line in logged] == ["2/4", "4/4", "2/4", "4/4"]
    assert all(np.isfinite(float(line.split("loss ")[1].split()[0])) for line in logged)
    results = json.loads((out / "results.json").read_text())
    assert results["episodes"] == 8 and sum(t["episodes"] for t in results["tasks"].values()) == 8
    assert "success" in stdout.splitlines()[-2]
    prediction = results["video_prediction"]   # logged after stage 1 (evaluation.video_prediction_error)
    assert prediction["windows"] > 0 and f"MSE {prediction['one_step_mse']:.4f}" in stdout
    for name in ("video", "action"):
        assert (out / f"{name}.safetensors").is_file() and (out / f"{name}.state.safetensors").is_file()
    # the checkpoints load, and training lowered the loss on the first batch each stage saw
    cfg, _ = config.parse_args(smoke(out, world_data))
    torch.manual_seed(cfg.seed)
    run = train.load_data(cfg, parallel.Runtime())
    initial_video = train.build_video(cfg, run, "cpu")
    policy, _ = VAMPolicy.load(out)
    initial_decoder = train.build_decoder(cfg, run, policy.video)
    assert first_batch_loss("video", policy.video, None, cfg, run) < first_batch_loss("video", initial_video, None,
                                                                                      cfg, run)
    assert first_batch_loss("action", policy.video, policy.decoder, cfg, run) < \
        first_batch_loss("action", policy.video, initial_decoder, cfg, run)


def test_policy_returns_chunks_and_runs_exactly_k_plus_1_blocks(finished_run):
    out, _ = finished_run
    policy, meta = VAMPolicy.load(out)
    k = meta["run"]["k"]
    calls = {"blocks": 0, "velocity": 0}
    for block in policy.video.blocks:
        block.register_forward_hook(lambda *_: calls.__setitem__("blocks", calls["blocks"] + 1))
    velocity = policy.video.video2world_velocity

    def counted(*a, **kw):
        calls["velocity"] += 1
        return velocity(*a, **kw)

    policy.video.video2world_velocity = counted
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


def test_the_action_temperature_is_the_runs_unless_overridden(finished_run):
    out, _ = finished_run
    frames = np.random.default_rng(0).integers(0, 255, (2, 2, 32, 32, 3), dtype=np.uint8)
    text, proprio = ["pick up the green block"] * 2, np.zeros((2, 3), np.float32)
    policy, meta = VAMPolicy.load(out, seed=3)
    assert meta["run"]["action_temperature"] == 1.0 and policy.action_temperature == 1.0    # the smoke preset's
    old = {key: value for key, value in meta["run"].items() if key != "action_temperature"}
    # runs written before it was recorded: the paper's temperature
    assert VAMPolicy(policy.video, policy.decoder, old).action_temperature == 1.0
    # temperature 0: the decoder integrates from eps = 0 on the same plan (the same seed draws the same video noise)
    cold, _ = VAMPolicy.load(out, seed=3, action_temperature=0.0)
    chunk = cold.act_batch(frames, text, proprio)
    states, _ = policy.plan(frames, text)
    p = policy.proprio_norm(torch.as_tensor(proprio))
    with torch.no_grad():
        from_zero = flow.euler(lambda x, tau: policy.decoder(states, 1.0, p, x, tau),
                               torch.zeros(2, policy.decoder.cfg.H_a, 3), 1.0, 0.0, policy.action_steps)
    np.testing.assert_allclose(chunk, policy.action_norm.inverse(from_zero).numpy(), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="action_temperature must be >= 0, got -1"):
        VAMPolicy.load(out, action_temperature=-1.0)


def test_policy_checks_its_inputs_against_what_the_run_was_trained_on(finished_run):
    policy, _ = VAMPolicy.load(finished_run[0])
    H_o = policy.spec.history
    good = np.zeros((2, H_o, 32, 32, 3), dtype=np.uint8)
    instructions, proprio = ["pick up the green block"] * 2, np.zeros((2, 3))
    cases = [(good[:, :1], instructions, proprio, f"trained on the last H_o = {H_o} frames of 32x32x3"),
             (np.zeros((2, H_o, 16, 16, 3), np.uint8), instructions, proprio, "32x32x3; got \\(2, 2, 16, 16, 3\\)"),
             (good.astype(np.float32), instructions, proprio, "uint8"),
             (good, instructions[:1], proprio, "2 frame histories but 1 instructions"),
             (good, instructions, np.zeros((2, 4)), "trained on 3-D proprioception; got \\(2, 4\\)")]
    for frames, text, p, message in cases:
        with pytest.raises(ValueError, match=message):
            policy.act_batch(frames, text, p)


def test_sample_cli_evaluates_with_a_gif_and_another_replan(finished_run, tmp_path, capsys):
    out, _ = finished_run
    gif = tmp_path / "plan.gif"
    sample.main(["--out", str(out), "--episodes", "1", "--replan", "8", "--gif", str(gif)])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[:5]] == ["pick_green", "place_red", "push_blue", "stack_blue_on_red",
                                                       "mean"]
    assert all("/1 " in line for line in lines[:4])
    image = Image.open(gif)
    assert image.n_frames > 5 and image.size[0] == 4 * 8 * 32   # four episodes side by side, scaled 8x
    sample.main(["--out", str(out), "--bench"])
    assert "video pass" in capsys.readouterr().out
    for replan in ("0", "17"):
        with pytest.raises(SystemExit, match=r"--replan must lie in 1 \.\. 16"):
            sample.main(["--out", str(out), "--replan", replan])
    with pytest.raises(SystemExit, match="none/video.safetensors: no such checkpoint"):
        sample.main(["--out", str(tmp_path / "none")])


# ----------------------------------------------------------------------------- resume, crashes, bad input


def final_weights(out):
    return {**{f"video.{k}": v for k, v in load_file(out / "video.safetensors").items()},
            **{f"action.{k}": v for k, v in load_file(out / "action.safetensors").items()}}


@pytest.mark.parametrize("cache", [[], ["--action.tau_v", "1.0", "--action.cache", "2"], ["--action.ema", "0.5"]],
                         ids=["", "cached", "ema"])
def test_resume_after_a_kill_equals_an_uninterrupted_run(tmp_path, world_data, monkeypatch, cache):
    args = ["--eval.episodes", "1", "--action.steps", "6", "--ckpt_every", "2", *cache]
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


def test_a_run_resumed_from_its_video_checkpoint_alone_trains_the_same_decoder(finished_run, tmp_path, world_data):
    """Stage 2 of a folder holding only a finished stage 1 (how a decoder is retrained on a video model) is the
    uninterrupted run's: loading the video checkpoint leaves the decoder's initialisation as it was."""
    (tmp_path / "run").mkdir()
    shutil.copy(finished_run[0] / "video.safetensors", tmp_path / "run")
    with contextlib.redirect_stdout(io.StringIO()):
        train.main(smoke(tmp_path / "run", world_data, "--resume"))
    whole, resumed = final_weights(finished_run[0]), final_weights(tmp_path / "run")
    assert whole.keys() == resumed.keys()
    for name in whole:
        torch.testing.assert_close(resumed[name], whole[name], rtol=0, atol=1e-6, msg=name)


def test_a_stage_saves_the_moving_average_of_its_weights(tmp_path):
    """With --section.ema d the saved weights are ema_T, ema_0 = theta_0, ema_t+1 = d_t ema_t + (1 - d_t) theta_t+1,
    d_t = min(d, (1 + t) / (10 + t)), over the trajectory theta_t of the same run without it."""
    def run(ema):
        torch.manual_seed(0)
        module, trajectory = torch.nn.Linear(3, 2), []

        def step_loss(g):
            trajectory.append([p.detach().clone() for p in module.parameters()])
            per_sample = module(torch.randn(4, 3, generator=g)).pow(2).mean(1)
            return per_sample.mean(), per_sample.detach(), torch.rand(4, generator=g)

        s = config.Optim(steps=5, batch_size=4, lr=0.1, warmup=0, schedule="constant", ema=ema)
        cfg = replace(config.PRESETS["smoke"], out=str(tmp_path / str(ema)), log_every=100, ckpt_every=100)
        Path(cfg.out).mkdir()
        rt = parallel.Runtime()
        train.train_stage("action", module, step_loss, s, cfg, rt, resume=False)
        return trajectory + [[p.detach().clone() for p in module.parameters()]], list(module.parameters())

    trajectory, _ = run(0.0)
    _, saved = run(0.2)
    average = trajectory[0]
    for t, theta in enumerate(trajectory[1:]):
        d = min(0.2, (1 + t) / (10 + t))
        average = [d * a + (1 - d) * p for a, p in zip(average, theta)]
    for a, p in zip(average, saved):
        torch.testing.assert_close(p.detach(), a, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(saved[0], trajectory[-1][0])   # the average, not the last weights


@pytest.mark.parametrize("name", ["video.safetensors", "video.state.safetensors", "action.state.safetensors"])
def test_a_truncated_file_under_resume_is_named_in_one_line(finished_run, tmp_path, world_data, name):
    shutil.copytree(finished_run[0], tmp_path / "run")
    run = tmp_path / "run"
    unfinished = {"video.safetensors": [], "video.state.safetensors": ["video", "action"],
                  "action.state.safetensors": ["action"]}[name]   # the stages that resume from their state
    for stage in unfinished:
        (run / f"{stage}.safetensors").unlink()
    blob = (run / name).read_bytes()
    (run / name).write_bytes(blob[: len(blob) // 2])
    with pytest.raises(SystemExit) as e:
        train.main(smoke(run, world_data, "--resume"))
    message = str(e.value.code)
    assert name in message and "not a valid safetensors file" in message and "delete it" in message


def test_nan_loss_stops_with_stage_and_step(tmp_path, world_data, monkeypatch):
    real = train.action_loss

    def poisoned(*a, **kw):
        loss, per_sample, tau = real(*a, **kw)
        return loss * float("nan"), per_sample, tau

    monkeypatch.setattr(train, "action_loss", poisoned)
    with pytest.raises(SystemExit, match=r"action stage: the loss is nan at step 0"):
        train.main(smoke(tmp_path, world_data))
    assert (tmp_path / "video.safetensors").is_file()   # stage 1's result is kept


def test_a_world_dataset_written_before_expert_py_is_still_evaluated_in_the_world(finished_run, world_data, tmp_path):
    """Datasets generated before the refactor name their generator "world.generate_dataset": still the built-in
    world's, so closed-loop evaluation, not a held-out split."""
    shutil.copytree(world_data, tmp_path / "data")
    manifest = tmp_path / "data" / data.MANIFEST
    m = json.loads(manifest.read_text())
    m["source"]["generator"] = "world.generate_dataset"
    manifest.write_text(json.dumps(m))
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        train.main(["--preset", "smoke", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run")])
    assert "held out" not in stdout.getvalue()
    assert json.loads((tmp_path / "run" / "results.json").read_text())["episodes"] == 8


def test_missing_dataset_is_named(tmp_path):
    with pytest.raises(SystemExit, match="manifest.json"):
        train.main(["--preset", "smoke", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")])


def test_bf16_autocast_on_the_cpu_trains_both_stages_with_fp32_weights(tmp_path, world_data):
    """--precision bf16 on the CPU: the forward passes and the feature cache under bf16 autocast; what is trained
    and saved stays fp32."""
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        train.main(smoke(tmp_path / "run", world_data, "--precision", "bf16", "--action.tau_v", "1.0",
                         "--action.cache", "1"))
    assert "cpu, bf16 autocast (--precision bf16)" in stdout.getvalue()
    logged = [line for line in stdout.getvalue().splitlines() if line.startswith(("video ", "action "))]
    assert len(logged) == 4 and all(np.isfinite(float(line.split("loss ")[1].split()[0])) for line in logged)
    assert json.loads((tmp_path / "run" / "results.json").read_text())["bf16_autocast"] is True
    for name in ("video", "action"):
        for f in (f"{name}.safetensors", f"{name}.state.safetensors"):
            tensors, _ = checkpoints.read(tmp_path / "run" / f)
            assert {t.dtype for t in tensors.values()} == {torch.float32}, f


def test_precision_auto_is_bf16_only_where_the_cpu_multiplies_bf16(tmp_path):
    cpu = torch.device("cpu")
    assert parallel.uses_bf16("bf16", cpu) and not parallel.uses_bf16("fp32", cpu)
    for flags, native in (("fpu avx2 avx512f avx512bw", False), ("avx512f avx512_bf16", True),
                          ("avx2 amx_tile amx_bf16", True)):
        (tmp_path / "cpuinfo").write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        assert parallel.uses_bf16("auto", cpu, tmp_path / "cpuinfo") is native, flags
    assert parallel.uses_bf16("auto", cpu, tmp_path / "no-such-file") is False


def test_what_can_only_fail_later_is_refused_before_stage_1(tmp_path, world_data):
    # a block the video model does not have (refused by config.check, or after loading a pretrained model)
    with pytest.raises(SystemExit, match=r"--action.k must name one of the video model's blocks, 0 \.\. 1"):
        train.main(smoke(tmp_path / "k", world_data, "--action.k", "2"))
    assert not (tmp_path / "k" / "video.state.safetensors").exists()
    with pytest.raises(SystemExit, match=r"--action.repeats must be >= 1 and divide --action.batch_size 8, got 3"):
        train.main(smoke(tmp_path / "r", world_data, "--action.repeats", "3"))
    with pytest.raises(SystemExit, match=r"--action.ema must lie in \[0, 1\) \(a decay; 0: none\), got 1.0"):
        train.main(smoke(tmp_path / "e", world_data, "--action.ema", "1"))
    # frames that the video tokens do not tile
    episodes = [episode(3, seed, shape=(30, 30, 3)) for seed in range(4)]
    write(tmp_path / "odd", episodes, proprio_range=[[-4, 4]] * 3, action_range=[[0, 200]] * 2)
    with pytest.raises(SystemExit, match="are 30x30, which the video tokens do not tile: they need multiples of "
                                         "--tokenizer_factor x patch = 4 x 2 = 8"):
        train.main(["--preset", "smoke", "--data", str(tmp_path / "odd"), "--out", str(tmp_path / "odd-run")])
    assert not (tmp_path / "odd-run" / "video.state.safetensors").exists()

# ----------------------------------------------------------------------------- one training step


def tiny_models(run_data, cfg):
    torch.manual_seed(0)
    video = train.build_video(cfg, run_data, "cpu")
    return video, train.build_decoder(cfg, run_data, video)


@pytest.fixture(scope="module")
def smoke_data(world_data, tmp_path_factory):
    cfg, _ = config.parse_args(smoke(tmp_path_factory.mktemp("unused"), world_data))
    return cfg, train.load_data(cfg, parallel.Runtime())


def test_an_untrained_video_models_prediction_error_is_the_noises(smoke_data):
    # adaLN-Zero: an untrained video model's velocity on the future frames is 0, so its one-step prediction
    # x0_hat = eps - v is the noise itself, whose error against the true future is E (eps - x0)^2 = 1 + E x0^2.
    # The context frames are the given ones (x0_hat = x0 there) and must not enter; "nothing moves" repeats the
    # last context latent frame.
    cfg, run = smoke_data
    video, _ = tiny_models(run, cfg)
    got = evaluation.video_prediction_error(video, run.windows, run.tokenizer, run.n_cond, max_windows=64)
    x0 = latent_data.clean_latents(run.windows.batch(np.linspace(0, len(run.windows) - 1, 64).astype(int)), run.tokenizer)
    future = x0[:, :, run.n_cond:]
    assert got["windows"] == 64
    assert got["one_step_mse"] == pytest.approx(1 + future.pow(2).mean().item(), abs=0.03)   # ~1e5 noise draws
    assert got["nothing_moves_mse"] == pytest.approx((x0[:, :, run.n_cond - 1:run.n_cond] - future).pow(2).mean()
                                                     .item(), rel=1e-5)


def test_gradients_never_reach_the_video_model(smoke_data):
    # The real stage-2 loss on a real VideoDiT left trainable on purpose: stage 2 itself must stop the gradient,
    # and an optimiser step (even one that was handed the video parameters) must leave them bit-identical.
    cfg, run = smoke_data
    video, decoder = tiny_models(run, cfg)
    with torch.no_grad():   # off adaLN-Zero, so that the video states depend on every video parameter
        for p in video.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    before = {n: p.clone() for n, p in video.named_parameters()}
    assert all(p.requires_grad for p in video.parameters())
    opt = torch.optim.AdamW(list(video.parameters()) + list(decoder.parameters()), lr=1e-2, weight_decay=0.1)
    tokenizer = encoders.SpaceToDepth(cfg.tokenizer_factor)
    norms = (data.Normalizer(run.dataset.manifest["proprio_range"]), data.Normalizer(run.dataset.manifest["action_range"]))
    batch = train.draw_action_batch(train.step_generator(0, "action", 0), run.windows, tokenizer, norms, cfg.action)
    loss, _, _ = train.action_loss(video, decoder, batch, run.spec.history, cfg.action.k)
    loss.backward()
    opt.step()
    assert all(p.grad is None for p in video.parameters())
    assert all(torch.equal(p, before[n]) for n, p in video.named_parameters())
    assert sum(p.grad is not None for p in decoder.parameters()) > 10


def test_repeated_video_examples_share_their_states_and_draw_their_own_actions(smoke_data):
    """--action.repeats R: B / R video examples, each tiled R times with its own action draws; the loss that runs
    the video model on the B / R examples only equals the loss that runs it on every row."""
    cfg, run = smoke_data
    video, decoder = tiny_models(run, cfg)
    with torch.no_grad():   # off adaLN-Zero, so that the video states depend on the video noise
        for p in list(video.parameters()) + list(decoder.parameters()):
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    tokenizer = encoders.SpaceToDepth(cfg.tokenizer_factor)
    norms = (data.Normalizer(run.dataset.manifest["proprio_range"]), data.Normalizer(run.dataset.manifest["action_range"]))
    s = replace(cfg.action, batch_size=8, repeats=4)
    batch = train.draw_action_batch(torch.Generator().manual_seed(5), run.windows, tokenizer, norms, s)
    for name in ("x0", "text", "tau_v", "eps_v", "proprio", "actions"):
        t = getattr(batch, name)
        assert len(t) == 8 and torch.equal(t, t[:2].repeat(4, *(1,) * (t.ndim - 1))), name
    assert not torch.equal(batch.x0[0], batch.x0[1]) and not torch.equal(batch.eps_v[0], batch.eps_v[1])
    assert len(set(batch.tau_a.tolist())) == 8 and len({tuple(e.flatten().tolist()) for e in batch.eps_a}) == 8
    with torch.no_grad():
        shared = train.action_loss(video, decoder, batch, run.spec.history, cfg.action.k, repeats=4)[1]
        every_row = train.action_loss(video, decoder, batch, run.spec.history, cfg.action.k, repeats=1)[1]
    torch.testing.assert_close(shared, every_row, rtol=1e-5, atol=1e-6)
    assert shared.std() > 0


@pytest.mark.parametrize("tau_v", ["0.6", "uniform"])
def test_cached_states_equal_the_states_recomputed_window_by_window(smoke_data, tau_v):
    """A FeatureCache's states of window i in draw d are blocks 0..k of the video model on that window alone, its
    future noised to the draw's tau_v (fixed, or uniform in (0, 1] per window and draw) with the noise of its chunk's
    row; stage 2's cached loss reads exactly those states, at their tau_v."""
    cfg, run = smoke_data
    video, decoder = tiny_models(run, cfg)
    with torch.no_grad():   # off adaLN-Zero, so that the states depend on the noise and the weights
        for p in list(video.parameters()) + list(decoder.parameters()):
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    k, n = cfg.action.k, len(run.windows)
    cache = FeatureCache(video, run.windows, run.tokenizer, run.n_cond, k, tau_v, 2, cfg.seed, parallel.Runtime())
    assert n > feature_cache.CHUNK and cache.states.shape == (2, n, train.video_tokens(run, video.cfg),
                                                               video.cfg.width)
    if tau_v == "uniform":   # a tau_v of its own per window and draw, spread over (0, 1]
        assert cache.tau_vs.shape == (2, n) and 0 < cache.tau_vs.min() < 0.1 and 0.9 < cache.tau_vs.max() <= 1
        assert len(cache.tau_vs.unique()) == 2 * n
    else:
        assert torch.equal(cache.tau_vs, torch.full((2, n), 0.6))
    for d in (0, 1):
        for i in (0, 1, feature_cache.CHUNK - 1, feature_cache.CHUNK, n - 1):
            first = i - i % feature_cache.CHUNK
            chunk = run.windows.batch(np.arange(first, min(first + feature_cache.CHUNK, n)))
            eps = torch.randn(latent_data.clean_latents(chunk, run.tokenizer).shape,
                              generator=cache.noise_generator(d, first))[i - first:i - first + 1]
            b = run.windows.batch(np.array([i]))
            x0, t = latent_data.clean_latents(b, run.tokenizer), cache.tau_vs[d, i:i + 1]
            with torch.no_grad():
                want = video.video2world_hidden_states(flow.interpolate(x0, eps, t), t, b["text"], x0, run.n_cond,
                                                       k)[0]
            torch.testing.assert_close(cache.states[d, i], want, rtol=1e-5, atol=1e-5, msg=f"draw {d}, window {i}")
    assert (cache.states[0] - cache.states[1]).abs().max() > 0.01   # two draws, two noises
    norms = (data.Normalizer(run.dataset.manifest["proprio_range"]), data.Normalizer(run.dataset.manifest["action_range"]))
    s = replace(cfg.action, tau_v=tau_v, cache=2)
    batch = train.draw_action_batch(torch.Generator().manual_seed(7), run.windows, run.tokenizer, norms, s, cache)
    assert batch.x0 is None and torch.equal(batch.tau_v, cache.tau_vs[batch.draw, batch.window])
    with torch.no_grad():
        got = train.action_loss(video, decoder, batch, run.n_cond, k, cache=cache)[1]
        want = decoder.loss(cache.states[batch.draw, batch.window], batch.tau_v, batch.proprio, batch.actions,
                            batch.tau_a, batch.eps_a, batch.drop_proprio)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_cache_built_under_bf16_autocast_holds_bf16_states_close_to_fp32(smoke_data):
    """Built as the uncached step computes its states (train_stage runs step_loss under the same autocast)."""
    cfg, run = smoke_data
    video, _ = tiny_models(run, cfg)
    with torch.no_grad():   # off adaLN-Zero, so that the states depend on the noise and the weights
        for p in video.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    built = {bf16: FeatureCache(video, run.windows, run.tokenizer, run.n_cond, cfg.action.k, 1.0, 1, cfg.seed,
                                parallel.Runtime(bf16=bf16)).states for bf16 in (False, True)}
    assert built[False].dtype == torch.float32 and built[True].dtype == torch.bfloat16
    err = (built[True].float() - built[False]).abs().max() / built[False].abs().max()
    assert 0 < err < 0.05, err


@pytest.mark.parametrize("alpha, beta", [(1.5, 1.0), (1.0, 1.0)])
def test_the_action_batch_draws_tau_a_and_the_proprio_dropout_as_configured(smoke_data, alpha, beta):
    cfg, run = smoke_data
    tokenizer = encoders.SpaceToDepth(cfg.tokenizer_factor)
    norms = (data.Normalizer(run.dataset.manifest["proprio_range"]), data.Normalizer(run.dataset.manifest["action_range"]))
    for p in (0.0, 1.0):
        s = replace(cfg.action, tau_a_alpha=alpha, tau_a_beta=beta, proprio_dropout=p, batch_size=6)
        batch = train.draw_action_batch(torch.Generator().manual_seed(3), run.windows, tokenizer, norms, s)
        assert batch.drop_proprio.tolist() == [bool(p)] * 6
        g = torch.Generator().manual_seed(3)   # replay: windows, tau_v, video noise, then tau_a
        run.windows.sample(6, g), torch.rand(6, generator=g), torch.randn(batch.x0.shape, generator=g)
        assert torch.equal(batch.tau_a, flow.sample_tau_action(6, alpha, beta, g))
        assert batch.tau_v.min() > 0 and batch.tau_v.max() <= 1 and batch.proprio.abs().max() <= 1


def test_stage_2_learns_from_the_first_episodes_of_each_task_and_stage_1_from_all(smoke_data):
    cfg, run = smoke_data
    tasks = run.dataset.tasks
    assert data.first_per_task(tasks, np.arange(len(tasks)), 2).tolist() == \
        sorted(e for t in dict.fromkeys(tasks) for e in [i for i, u in enumerate(tasks) if u == t][:2])
    cfg = replace(cfg, action=replace(cfg.action, episodes=1))
    labelled = train.load_data(cfg, parallel.Runtime())
    chosen = data.first_per_task(tasks, np.arange(len(tasks)), 1)
    assert len(chosen) == len(set(tasks)) and len(labelled.windows) == len(run.windows)
    assert set(labelled.action_windows.episode) == set(chosen.tolist())
    norms = (data.Normalizer(run.dataset.manifest["proprio_range"]), data.Normalizer(run.dataset.manifest["action_range"]))
    batch = train.draw_action_batch(torch.Generator().manual_seed(0), labelled.action_windows, run.tokenizer, norms,
                                    replace(cfg.action, batch_size=64))
    assert set(labelled.action_windows.episode[batch.window.numpy()]) <= set(chosen.tolist())


def test_the_held_out_split_is_per_task_and_zero_means_none():
    tasks = ["a"] * 10 + ["b"] * 10 + ["c"] * 3 + ["d"]
    train_ids, held_out = data.split_by_task(tasks, 0.1)
    assert held_out.tolist() == [9, 19, 22]   # the last of a, b and c; d has one episode, which it trains on
    assert sorted(train_ids.tolist() + held_out.tolist()) == list(range(len(tasks)))
    train_ids, held_out = data.split_by_task(tasks, 0.0)
    assert held_out.tolist() == [] and len(train_ids) == len(tasks)


def test_a_dataset_without_a_world_reports_the_held_out_error(tmp_path, capsys):
    episodes = [episode(6, seed, shape=(16, 16, 3), instruction=f"task {seed % 2}") for seed in range(8)]
    write(tmp_path / "ds", episodes, proprio_range=[[-4, 4]] * 3, action_range=[[0, 200]] * 2)
    train.main(["--preset", "smoke", "--data", str(tmp_path / "ds"), "--out", str(tmp_path / "run"),
                "--holdout", "0.25"])
    out = capsys.readouterr().out
    assert "held out 2 episodes" in out and "[6, 7]" in out
    assert json.loads((tmp_path / "run" / "results.json").read_text())["held_out_episodes"] == 2
    train.main(["--preset", "smoke", "--data", str(tmp_path / "ds"), "--out", str(tmp_path / "none"),
                "--holdout", "0"])
    assert "no held-out episodes" in capsys.readouterr().out
    # the decoder's video-token positions are sized from the manifest: 16x16 frames, 2 + 4 latent frames of 2x2
    _, meta = checkpoints.load_model(tmp_path / "run" / "action.safetensors", ActionDecoder,
                                     type(decoder_preset("tiny")))
    assert meta["model_config"]["context_tokens"] == (2 + 4) * 2 * 2

# ----------------------------------------------------------------------------- data parallelism


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


def test_the_static_image_control_never_sees_a_future_frame(smoke_data, tmp_path):
    # --video.static: every window holds the H_o history frames alone, all of them the model's target (no context
    # frame), so there is no place a future frame could enter; its policy reads the observed frames noised to tau_v.
    cfg, run = smoke_data
    static_cfg = replace(cfg, video=replace(cfg.video, static=True))
    static = train.load_data(static_cfg, parallel.Runtime())
    ids = np.arange(0, len(run.windows), 7)
    full, alone = run.windows.batch(ids)["frames"], static.windows.batch(ids)["frames"]
    H_o = run.spec.history
    assert alone.shape[1] == H_o and torch.equal(alone, full[:, :H_o])
    assert static.n_cond == 0 and static.latent_shape[1] == H_o and run.latent_shape[1] == H_o + run.spec.future
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        train.main(smoke(tmp_path / "static", cfg.world_data, "--video.static", "true", "--action.tau_v", "0.4",
                         "--eval.tau_v", "0.4", "--eval.episodes", "1"))
    assert "one-step prediction" not in stdout.getvalue()
    policy, _ = VAMPolicy.load(tmp_path / "static")
    frames = static.windows.batch(ids[:3])["frames"].numpy()
    states, x = policy.plan(frames, ["pick up the green block"] * 3)
    assert x.shape[2] == H_o and states.shape[1] == train.video_tokens(static, policy.video.cfg)
    with pytest.raises(SystemExit, match="--video.static reads the observed frames noised to one tau_v < 1"):
        train.main(smoke(tmp_path / "bad", cfg.world_data, "--video.static", "true"))
