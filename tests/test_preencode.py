"""preencode.py and latent_data.py: a tiny LeRobot dataset pre-encoded by the tiny random Wan VAE and T5, read back
as training windows; killed and resumed; corrupted; and train.py on it, which must not run either encoder."""
import json

import numpy as np
import pytest
import torch

import data
import encoders
import latent_data
import lerobot
import preencode
from lerobot_fixtures import make_episodes, write_lerobot
from tiny_models import save_cosmos_encoders

WINDOW = data.WindowSpec(history=5, horizon=4, history_stride=1, future_stride=1, future_frames=4)   # 9 frames
WINDOW_FLAGS = ["--history", "5", "--horizon", "4", "--future_stride", "1", "--future_frames", "4"]
LENGTHS = [6, 9, 7]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """(LeRobot v3.0 folder, the same episodes in the frame format, the tiny encoders' folder)."""
    root = tmp_path_factory.mktemp("preencode")
    episodes = make_episodes(LENGTHS, state_dim=4, action_dim=3,
                             tasks=("pick up the green block", "push the blue block"))
    write_lerobot(root / "lerobot", episodes)
    frames = root / "frames"
    lerobot.main([str(root / "lerobot"), str(frames), "--action_pad", "zero,zero,hold"])
    return root / "lerobot", frames, save_cosmos_encoders(root / "cosmos")


def run(src, out, cosmos, *extra):
    preencode.main([str(src), str(out), "--encoder_source", str(cosmos), "--windows_per_shard", "4", "--batch", "3",
                    "--action_pad", "zero,zero,hold", *WINDOW_FLAGS, *extra])


@pytest.fixture(scope="module")
def encoded(sources, tmp_path_factory):
    src, _, cosmos = sources
    out = tmp_path_factory.mktemp("latents") / "ds"
    run(src, out, cosmos)
    return out


def test_the_windows_hold_the_encoders_outputs_of_the_frame_windows(sources, encoded):
    _, frames, cosmos = sources
    ds = latent_data.LatentDataset(encoded)
    m = ds.manifest
    assert (m["latent_shape"], m["context_frames"], m["dtype"]) == ([16, 3, 4, 6], 2, "bfloat16")
    assert len(ds) == 3 and len(ds.episode) == sum(T - 1 for T in LENGTHS) and len(m["shards"]) == 5
    vae, t5 = encoders.build(encoders.cosmos_spec(str(cosmos)))
    reference = data.Windows(data.Dataset(frames), WINDOW, t5)
    windows = latent_data.LatentWindows(ds)
    ids = np.arange(len(windows))
    ours, theirs = windows.batch(ids), reference.batch(ids)
    for key in ("proprio", "actions", "episode", "t"):
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0, msg=key)
    latents = vae.encode(theirs["frames"])
    torch.testing.assert_close(ours["latents"], latents.to(torch.bfloat16).float(), rtol=1 / 128, atol=1e-3)
    torch.testing.assert_close(ours["text"], theirs["text"].to(torch.bfloat16).float(), rtol=0, atol=0)
    assert ours["text"].shape == (len(ids), 512, 1024) and ours["latents"].abs().max() > 0.1
    # training's context frames are what the policy gets from the history alone (the VAE is causal)
    history = vae.encode(theirs["frames"][:, :5])
    torch.testing.assert_close(latents[:, :, :2], history, rtol=0, atol=1e-6)


def test_the_frame_format_gives_the_same_shards_as_the_lerobot_folder(sources, encoded, tmp_path):
    _, frames, cosmos = sources
    run(frames, tmp_path / "ds", cosmos)
    for entry in latent_data.read_manifest(encoded)["shards"]:
        assert (tmp_path / "ds" / entry["file"]).read_bytes() == (encoded / entry["file"]).read_bytes()


def test_a_killed_run_resumes_to_byte_identical_files(sources, encoded, tmp_path, monkeypatch):
    src, _, cosmos = sources
    real, calls = preencode.Encoded.windows, {"n": 0}

    def dying(self, *a):
        calls["n"] += 1
        if calls["n"] == 4:   # the second batch of the third shard (two batches of <= 3 per shard of 4)
            raise KeyboardInterrupt("killed")
        return real(self, *a)

    monkeypatch.setattr(preencode.Encoded, "windows", dying)
    with pytest.raises(KeyboardInterrupt):
        run(src, tmp_path / "ds", cosmos)
    monkeypatch.setattr(preencode.Encoded, "windows", real)
    progress = json.loads((tmp_path / "ds" / preencode.PROGRESS).read_text())
    assert len(progress["shards"]) == 1 and not (tmp_path / "ds" / latent_data.MANIFEST).exists()
    (tmp_path / "ds" / "latents-00001.safetensors.tmp").write_bytes(b"half a shard")   # what a kill can leave
    with pytest.raises(SystemExit, match=r"started with other settings \(differs in: every\)"):
        run(src, tmp_path / "ds", cosmos, "--every", "2")
    run(src, tmp_path / "ds", cosmos)
    names = sorted(p.name for p in encoded.iterdir())
    assert sorted(p.name for p in (tmp_path / "ds").iterdir() if not p.name.endswith(".tmp")) == names
    for name in names:
        assert (tmp_path / "ds" / name).read_bytes() == (encoded / name).read_bytes(), name
    with pytest.raises(SystemExit, match="this pre-encoding is complete"):
        run(src, tmp_path / "ds", cosmos)


def test_a_corrupted_or_inconsistent_file_is_named_on_read(encoded, tmp_path):
    import shutil
    root = shutil.copytree(encoded, tmp_path / "ds")
    shard = root / "latents-00001.safetensors"
    blob = bytearray(shard.read_bytes())
    blob[-3] ^= 1
    shard.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="latents-00001.safetensors is corrupted"):
        latent_data.LatentDataset(root)
    shard.write_bytes(bytes(blob[:-10]))
    with pytest.raises(ValueError, match=r"latents-00001.safetensors is truncated .* expected \d+ bytes"):
        latent_data.LatentDataset(root)
    shutil.copy(encoded / shard.name, shard)
    m = json.loads((root / "manifest.json").read_text())
    (root / "manifest.json").write_text(json.dumps({**m, "latent_shape": [16, 4, 4, 6]}))
    with pytest.raises(ValueError, match=r"latents-00000.safetensors, tensor 'latents': the manifest implies "
                                         r"\(4, 16, 4, 4, 6\)"):
        latent_data.LatentDataset(root)
    (root / "manifest.json").write_text(json.dumps({**m, "version": 2}))
    with pytest.raises(ValueError, match="expected format 'mimic-video-latents' version 1, found"):
        latent_data.LatentDataset(root)


def test_a_window_off_the_vaes_frame_rule_is_refused_before_anything_is_written(sources, tmp_path):
    src, _, cosmos = sources
    with pytest.raises(SystemExit, match=r"H_o = 4 history and F = 4 future frames: .* must both be 1 \+ 4n"):
        preencode.main([str(src), str(tmp_path / "ds"), "--encoder_source", str(cosmos), "--history", "4",
                        "--future_frames", "4", "--future_stride", "1"])
    assert not (tmp_path / "ds" / preencode.PROGRESS).exists()

# ----------------------------------------------------------------------------- training on it


def test_training_on_latents_runs_neither_encoder_and_the_policy_rebuilds_them(sources, encoded, tmp_path,
                                                                                monkeypatch):
    import sample
    import train

    def refuse(*a, **kw):
        raise AssertionError("an encoder ran in training")

    for name in ("encode", "decode"):
        monkeypatch.setattr(encoders.WanVAE, name, refuse)
    monkeypatch.setattr(encoders.T5Encoder, "__call__", refuse)
    monkeypatch.setattr(encoders, "build", refuse)
    out = tmp_path / "run"
    train.main(["--preset", "smoke", "--data", str(encoded), "--out", str(out), "--holdout", "0.4", *WINDOW_FLAGS])
    results = json.loads((out / "results.json").read_text())
    assert results["held_out_episodes"] == 1 and np.isfinite(results["held_out_action_mse"])
    monkeypatch.undo()
    policy, meta = sample.VAMPolicy.load(out)
    assert meta["run"]["encoders"] == latent_data.read_manifest(encoded)["encoders"]
    assert (policy.n_cond, policy.latent_frames) == (2, 3)
    # on raw camera frames the policy builds the same VAE and T5 and acts
    ep = data.Dataset(sources[1]).episode(0)
    chunk = policy.act(ep.frames[:5], ep.instruction, ep.proprio[4])
    assert chunk.shape == (4, 3) and np.isfinite(chunk).all()
    assert isinstance(policy.tokenizer, encoders.WanVAE) and isinstance(policy.text_encoder, encoders.T5Encoder)
    with pytest.raises(SystemExit, match=r"pre-encoded with another window; train with its settings: --horizon 8 "
                                         r"\(encoded: 4\)"):
        train.main(["--preset", "smoke", "--data", str(encoded), "--out", str(tmp_path / "other"),
                    *WINDOW_FLAGS, "--horizon", "8"])


def test_a_vae_whose_channels_differ_from_the_video_model_is_refused_before_training(sources, tmp_path):
    import train
    from cosmos_reference import REF_CONFIG
    from diffusers import CosmosTransformer3DModel
    CosmosTransformer3DModel(**{**REF_CONFIG, "text_embed_dim": 1024}).save_pretrained(tmp_path / "dit")
    cosmos8 = save_cosmos_encoders(tmp_path / "cosmos8", z_dim=8)
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=r"dit takes 16-channel latents and 1024-wide text states, but the encoders "
                                         r"\(wan2.1, t5\) give 8 and 1024"):
        train.main(["--preset", "smoke", "--data", str(sources[1]), "--out", str(out), "--encoders", "cosmos",
                    "--encoder_source", str(cosmos8), "--video.pretrained", str(tmp_path / "dit"), *WINDOW_FLAGS])
    assert not list(out.glob("*.safetensors"))


def test_train_can_run_the_real_encoders_itself_on_frames(sources, tmp_path):
    """--encoders cosmos on a frame-format dataset: each batch's frames go through the VAE in training; the run's
    metadata names those encoders and their context frames, and the policy acts through them."""
    import sample
    import train
    _, frames, cosmos = sources
    out = tmp_path / "run"
    train.main(["--preset", "smoke", "--data", str(frames), "--out", str(out), "--holdout", "0.4", "--encoders",
                "cosmos", "--encoder_source", str(cosmos), *WINDOW_FLAGS])
    assert json.loads((out / "results.json").read_text())["held_out_episodes"] == 1
    policy, meta = sample.VAMPolicy.load(out)
    assert meta["run"]["encoders"] == encoders.cosmos_spec(str(cosmos))
    assert (meta["run"]["context_frames"], meta["run"]["latent_frames"]) == (2, 3)
    ep = data.Dataset(frames).episode(1)
    assert policy.act(ep.frames[:5], ep.instruction, ep.proprio[4]).shape == (4, 3)
