"""The dataset format (round trip, errors that name the file, file permissions), training windows, normalisation."""
import hashlib
import json
import os

import numpy as np
import pytest
import torch

import data
from data import Dataset, Episode, WindowSpec, Windows
from encoders import TextEncoder

PAD = ["zero", "hold"]


def episode(T, seed, shape=(6, 4, 1), instruction="lift it"):
    """An episode whose every value tells where it came from: frame k is filled with k, action k is (k, 100 + k)."""
    rng = np.random.default_rng(seed)
    frames = np.broadcast_to(np.arange(T + 1, dtype=np.uint8)[:, None, None, None], (T + 1, *shape)).copy()
    frames[:, 0, 0, 0] = rng.integers(0, 256, T + 1)       # and something random, to catch mixed-up episodes
    actions = np.stack([np.arange(T), 100 + np.arange(T)], axis=1).astype(np.float32)
    proprio = rng.normal(size=(T + 1, 3)).astype(np.float32)
    return Episode(frames, proprio, actions, instruction, info={"seed": seed})


def write(root, episodes, **kw):
    args = dict(control_hz=5, proprio_range=[[-4, 4]] * 3, action_range=[[0, 200]] * 2, action_pad=PAD,
                episodes_per_shard=2)
    return data.write_dataset(root, episodes, **{**args, **kw})


@pytest.fixture
def small(tmp_path):
    eps = [episode(T, seed, instruction=f"task {seed % 2}") for seed, T in enumerate([3, 1, 5, 2, 4])]
    write(tmp_path / "ds", eps)
    return tmp_path / "ds", eps

# ----------------------------------------------------------------------------- the format


def test_round_trip(small):
    root, eps = small
    ds = Dataset(root)
    m = ds.manifest
    assert (m["frame_shape"], m["proprio_dim"], m["action_dim"], m["control_hz"]) == ([6, 4, 1], 3, 2, 5.0)
    assert len(m["shards"]) == 3 and len(ds) == 5
    for e, ep in enumerate(eps):
        back = ds.episode(e)
        np.testing.assert_array_equal(back.frames, ep.frames)
        np.testing.assert_array_equal(back.proprio, ep.proprio)
        np.testing.assert_array_equal(back.actions, ep.actions)
        assert (back.instruction, back.task, back.info) == (ep.instruction, ep.instruction, ep.info)


def test_writer_refuses_inconsistent_episodes(tmp_path):
    with pytest.raises(ValueError, match="disagree on frame_shape"):
        write(tmp_path / "a", [episode(2, 0), episode(2, 1, shape=(6, 4, 3))])
    bad = episode(3, 0)
    bad.frames = bad.frames[:3]
    with pytest.raises(ValueError, match="3 actions needs 4 frames"):
        write(tmp_path / "b", [bad])
    with pytest.raises(ValueError, match="action_pad entries"):
        write(tmp_path / "c", [episode(2, 0)], action_pad=["zero", "stay"])
    with pytest.raises(ValueError, match="action_range has 3 entries for 2 dimensions"):
        write(tmp_path / "d", [episode(2, 0)], action_range=[[0, 1]] * 3)
    write(tmp_path / "d", [episode(2, 0)])         # over the failed attempt's leftovers
    with pytest.raises(FileExistsError, match="manifest.json exists"):
        write(tmp_path / "d", [episode(2, 0)])


def test_truncated_shard_is_named(small):
    root, _ = small
    shard = root / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"shard-00001.safetensors is truncated .* expected \d+ bytes, found"):
        Dataset(root)


def test_corrupted_shard_is_named(small):
    root, _ = small
    shard = root / "shard-00002.safetensors"
    blob = bytearray(shard.read_bytes())
    blob[-1] ^= 1
    shard.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="shard-00002.safetensors is corrupted"):
        Dataset(root)


def edit_manifest(root, change):
    m = json.loads((root / "manifest.json").read_text())
    change(m)
    (root / "manifest.json").write_text(json.dumps(m))


def test_manifest_mismatch_names_file_tensor_and_shapes(small):
    root, _ = small
    edit_manifest(root, lambda m: m.update(frame_shape=[6, 4, 3]))
    with pytest.raises(ValueError, match=r"shard-00000.safetensors, tensor 'frames': the manifest implies "
                                         r"\(6, 6, 4, 3\) uint8, found \(6, 6, 4, 1\) uint8"):
        Dataset(root)


def test_manifest_episode_lengths_must_match_the_shard(small):
    root, _ = small
    edit_manifest(root, lambda m: (m["episodes"][0].update(length=2), m["episodes"][1].update(length=2)))
    with pytest.raises(ValueError, match=r"shard-00000.safetensors: episode lengths \[3, 1\] differ from the "
                                         r"manifest's \[2, 2\]"):
        Dataset(root)


def test_unreadable_shard_with_matching_checksum_is_named(small):
    root, _ = small
    shard = root / "shard-00000.safetensors"
    junk = b"\xff" * 64
    shard.write_bytes(junk)
    edit_manifest(root, lambda m: m["shards"][0].update(bytes=64, sha256=hashlib.sha256(junk).hexdigest()))
    with pytest.raises(ValueError, match="shard-00000.safetensors is not a readable safetensors file"):
        Dataset(root)


def test_missing_shard_and_bad_manifests_are_named(small):
    root, _ = small
    (root / "shard-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="shard-00002.safetensors is listed in the manifest but missing"):
        Dataset(root)
    edit_manifest(root, lambda m: m["episodes"].pop())
    with pytest.raises(ValueError, match="do not follow the shards"):
        Dataset(root)
    edit_manifest(root, lambda m: m.update(version=2))
    with pytest.raises(ValueError, match=r"manifest.json: expected format 'mimic-video-episodes' version 1, found "
                                         r"'mimic-video-episodes' version 2"):
        Dataset(root)
    (root / "manifest.json").write_text("{")
    with pytest.raises(ValueError, match="manifest.json is not valid JSON"):
        Dataset(root)
    (root / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="manifest.json not found"):
        Dataset(root)

# ----------------------------------------------------------------------------- training windows


def test_windows_pad_as_documented(small):
    root, eps = small
    spec = WindowSpec(history=3, horizon=4, history_stride=2, future_stride=2)
    windows = Windows(Dataset(root), spec, TextEncoder(length=4, dim=8))
    assert len(windows) == 3 + 1 + 5 + 2 + 4
    b = windows.batch(np.array([0, 2, 6]))          # episode 0 at t = 0 and 2; episode 2 (T = 5) at t = 2
    frame_ids = b["frames"][:, :, 1, 1, 0].tolist()  # frame k holds k
    assert frame_ids == [[0, 0, 0, 2, 3],   # t = 0 of T = 3: history -4, -2, 0 -> 0; future 2, 4 -> 2, 3
                         [0, 0, 2, 3, 3],   # t = 2: history -2, 0, 2; future 4, 6 -> 3, 3
                         [0, 0, 2, 4, 5]]   # t = 2 of T = 5: future 4, 6 -> 4, 5
    actions = b["actions"].tolist()
    assert actions[0] == [[0, 100], [1, 101], [2, 102], [0, 102]]      # past the end: "zero" then "hold"
    assert actions[1] == [[2, 102], [0, 102], [0, 102], [0, 102]]
    assert actions[2] == [[2, 102], [3, 103], [4, 104], [0, 104]]
    np.testing.assert_array_equal(b["proprio"][2], eps[2].proprio[2])
    np.testing.assert_array_equal(b["frames"][0, 0], eps[0].frames[0])           # the random pixel too
    assert b["episode"].tolist() == [0, 0, 2] and b["t"].tolist() == [0, 2, 2]
    text = TextEncoder(length=4, dim=8)(["task 0", "task 0", "task 0"])
    torch.testing.assert_close(b["text"], text, rtol=0, atol=0)


def test_windows_sample_is_seeded_and_can_hold_out_episodes(small):
    root, _ = small
    ds = Dataset(root)
    windows = Windows(ds, WindowSpec(horizon=3), TextEncoder(), episodes=[1, 3])
    assert len(windows) == 1 + 2
    a = windows.sample(32, torch.Generator().manual_seed(0))
    b = windows.sample(32, torch.Generator().manual_seed(0))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert set(a["episode"].tolist()) == {1, 3}
    assert a["frames"].shape == (32, 1 + 1, 6, 4, 1) and a["actions"].shape == (32, 3, 2)
    assert a["text"].shape == (32, 16, 64) and a["proprio"].dtype == torch.float32


def test_window_spec_validates():
    assert WindowSpec(horizon=16, future_stride=5).future == 4
    assert WindowSpec(horizon=4, future_stride=8, future_frames=2).future == 2
    with pytest.raises(ValueError, match="history_stride must be a positive integer"):
        WindowSpec(history_stride=0)
    with pytest.raises(ValueError, match="future_frames must be an integer >= 0"):
        WindowSpec(future_frames=-1)


def test_future_frames_may_look_past_the_chunk(small):
    """F = 3 frames at stride 2 for a chunk of 2 actions: frames t + 2, t + 4, t + 6, clamped at T."""
    root, _ = small
    spec = WindowSpec(history=1, horizon=2, future_stride=2, future_frames=3)
    b = Windows(Dataset(root), spec, TextEncoder(length=4, dim=8)).batch(np.array([4]))   # episode 2 (T = 5), t = 0
    assert b["frames"][:, :, 1, 1, 0].tolist() == [[0, 2, 4, 5]]
    assert b["actions"].shape == (1, 2, 2)


def test_files_get_the_permissions_of_any_new_file(tmp_path):
    umask = os.umask(0o022)
    try:
        manifest = write(tmp_path / "ds", [episode(3, 0)])
    finally:
        os.umask(umask)
    for name in ["manifest.json"] + [s["file"] for s in manifest["shards"]]:
        assert (tmp_path / "ds" / name).stat().st_mode & 0o777 == 0o644, name


def test_normalizer_maps_the_ranges_onto_the_unit_interval_and_back():
    norm = data.Normalizer([[-4, 4], [0, 200], [3, 3]])     # the last: a constant dimension
    x = torch.tensor([[-4.0, 0.0, 3.0], [4.0, 200.0, 3.0], [1.0, 50.0, 3.0]])
    torch.testing.assert_close(norm(x)[:2, :2], torch.tensor([[-1.0, -1.0], [1.0, 1.0]]))
    torch.testing.assert_close(norm(x)[2, :2], torch.tensor([0.25, -0.5]))
    torch.testing.assert_close(norm.inverse(norm(x)), x)
