"""lerobot.py: tiny LeRobot v3.0 and v2.1 datasets written in the real layouts (parquet + mp4) read back as
episodes; the paper's action preprocessing; errors that name the file, episode or key."""
import json
import shutil

import numpy as np
import pytest
from hypothesis import given, strategies as st

import data
import lerobot
import rotations
from lerobot import LeRobotReader, Preprocess
from lerobot_fixtures import make_episodes, write_lerobot

LENGTHS = [4, 6, 5]
CAMERA = "observation.images.image"


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """The same three episodes as v3.0 (h264; two mp4 files, the first holding two episodes back to back), v2.1
    (h264) and v3.0 (AV1)."""
    episodes = make_episodes(LENGTHS)
    root = tmp_path_factory.mktemp("lerobot")
    return episodes, {key: write_lerobot(root / "-".join(key), episodes, version=key[0], codec=key[1])
                      for key in (("v3.0", "h264"), ("v2.1", "h264"), ("v3.0", "av1"))}


@pytest.mark.parametrize("key", [("v3.0", "h264"), ("v2.1", "h264"), ("v3.0", "av1")])
def test_episodes_read_back_as_written(written, key):
    episodes, roots = written
    reader = LeRobotReader(roots[key], CAMERA)
    m = reader.manifest
    assert len(reader) == 3 and (m["frame_shape"], m["proprio_dim"], m["action_dim"]) == ([32, 48, 3], 8, 7)
    assert m["control_hz"] == 10 and m["action_pad"] == ["hold"] * 7
    everything = np.concatenate([ep["frames"] for ep in episodes]).astype(np.int16)   # all frames of all episodes
    first = np.cumsum([0] + LENGTHS)
    for e, ep in enumerate(episodes):
        back = reader.episode(e)
        assert back.frames.shape == ep["frames"].shape
        assert np.abs(back.frames.astype(np.int16) - ep["frames"]).mean() < 6      # within the codec's error
        # each decoded frame is nearest to the frame written at its place, across episode and file boundaries
        err = np.abs(back.frames[:, None].astype(np.int16) - everything[None]).mean(axis=(2, 3, 4))
        assert err.argmin(axis=1).tolist() == list(range(first[e], first[e + 1]))
        np.testing.assert_array_equal(back.proprio, ep["state"])
        np.testing.assert_array_equal(back.actions, ep["action"][:-1])             # the last row's action dropped
        assert back.instruction == ep["task"] and back.info == {"lerobot_episode": e}
    states = np.concatenate([ep["state"] for ep in episodes])
    np.testing.assert_array_equal(np.asarray(m["proprio_range"]), np.stack([states.min(0), states.max(0)], 1))


def test_another_fps_takes_the_nearest_rows(written):
    episodes, roots = written
    reader = LeRobotReader(roots["v3.0", "h264"], CAMERA, fps=5)
    assert reader.manifest["control_hz"] == 5 and reader.lengths.tolist() == [1, 2, 2]   # 4, 6, 5 rows at 10 fps
    back = reader.episode(1)
    np.testing.assert_array_equal(back.proprio, episodes[1]["state"][[0, 2, 4]])
    np.testing.assert_array_equal(back.actions, episodes[1]["action"][[0, 2]])
    assert np.abs(back.frames.astype(np.int16) - episodes[1]["frames"][[0, 2, 4]]).mean() < 6


def test_the_command_converts_to_the_frame_format(written, tmp_path):
    episodes, roots = written
    lerobot.main([str(roots["v2.1", "h264"]), str(tmp_path / "ds"), "--camera", CAMERA, "--episodes", "2",
                  "--rotation", "axis-angle", "--gripper", "binary"])
    ds = data.Dataset(tmp_path / "ds")
    assert len(ds) == 2 and ds.manifest["action_dim"] == 3 + 6 + 1 and ds.manifest["control_hz"] == 10
    reader = LeRobotReader(roots["v2.1", "h264"], CAMERA, preprocess=Preprocess(rotation="axis-angle",
                                                                                 gripper="binary"))
    for e in range(2):
        np.testing.assert_array_equal(ds.episode(e).frames, reader.episode(e).frames)
        np.testing.assert_array_equal(ds.episode(e).actions, reader.episode(e).actions)
    assert set(np.unique(ds.actions[:, -1])) <= {-1.0, 1.0}
    assert ds.manifest["source"]["preprocess"]["rotation"] == "axis-angle"

# ----------------------------------------------------------------------------- bad input


def copy(roots, key, tmp_path):
    return shutil.copytree(roots[key], tmp_path / "copy")


def test_a_missing_key_is_named_with_the_present_ones(written):
    _, roots = written
    with pytest.raises(ValueError, match=r"--camera 'observation.images.wrist' is not a video feature of .*; "
                                         r"present: \['observation.images.image'\]"):
        LeRobotReader(roots["v3.0", "h264"], "observation.images.wrist")
    with pytest.raises(ValueError, match=r"--state 'observation.joints' is not a feature .* present: \['action', "):
        LeRobotReader(roots["v3.0", "h264"], CAMERA, state="observation.joints")


def test_a_camera_of_another_resolution_than_the_metadata_is_named(written, tmp_path):
    _, roots = written
    root = copy(roots, ("v3.0", "h264"), tmp_path)
    info = json.loads((root / "meta/info.json").read_text())
    info["features"][CAMERA]["shape"] = [64, 64, 3]
    (root / "meta/info.json").write_text(json.dumps(info))
    reader = LeRobotReader(root, CAMERA)
    assert reader.manifest["frame_shape"] == [64, 64, 3]
    with pytest.raises(ValueError, match=r"file-001.mp4 \(episode 2, camera observation.images.image\): frames are "
                                         r"32x48x3, but meta/info.json says 64x64x3"):
        reader.episode(2)


@pytest.mark.parametrize("key, video", [(("v3.0", "h264"), "videos/observation.images.image/chunk-000/file-001.mp4"),
                                        (("v2.1", "h264"), "videos/chunk-000/observation.images.image/"
                                                           "episode_000002.mp4")])
def test_an_unreadable_mp4_is_named_with_its_episode(written, tmp_path, key, video):
    _, roots = written
    root = copy(roots, key, tmp_path)
    (root / video).write_bytes(b"\x00" * 1000)
    reader = LeRobotReader(root, CAMERA)
    reader.episode(0)
    with pytest.raises(ValueError, match=r"\(episode 2, camera observation.images.image\): not a readable video"):
        reader.episode(2)


def test_missing_files_and_versions_are_named(written, tmp_path):
    _, roots = written
    root = copy(roots, ("v3.0", "h264"), tmp_path)
    (root / "data/chunk-000/file-001.parquet").unlink()
    with pytest.raises(FileNotFoundError, match="file-001.parquet is named by the dataset's metadata but missing"):
        LeRobotReader(root, CAMERA)
    info = json.loads((root / "meta/info.json").read_text())
    (root / "meta/info.json").write_text(json.dumps({**info, "codebase_version": "v1.6"}))
    with pytest.raises(ValueError, match="codebase_version 'v1.6'; this reader knows v3.0 and v2.1"):
        LeRobotReader(root, CAMERA)
    with pytest.raises(FileNotFoundError, match="not a LeRobot dataset folder"):
        LeRobotReader(tmp_path / "nowhere", CAMERA)

# ----------------------------------------------------------------------------- the paper's preprocessing

unit = st.floats(-1, 1, allow_nan=False)
vectors = st.lists(unit, min_size=3, max_size=3).filter(lambda v: 1e-3 < np.linalg.norm(v))


@given(st.lists(unit, min_size=3, max_size=3), vectors, st.floats(0.01, 3.1), st.floats(-1, 1))
def test_6d_actions_round_trip_through_every_encoding(p, axis, angle, grip):
    R = rotations.axis_angle_to_matrix(np.asarray(axis) / np.linalg.norm(axis) * angle)
    for kind in lerobot.ROTATIONS:
        action = np.concatenate([p, lerobot.matrix_to_rotation(R, kind), [grip]])[None]
        sixd = lerobot.actions_to_6d(action, kind)
        assert sixd.shape == (1, 10)
        np.testing.assert_allclose(sixd[0, 3:9], R[:2].reshape(6), atol=1e-12)
        back = lerobot.actions_from_6d(sixd, kind)
        np.testing.assert_allclose(lerobot.rotation_to_matrix(back[0, 3:-1], kind), R, atol=1e-9)
        np.testing.assert_allclose(back[0, [0, 1, 2, -1]], action[0, [0, 1, 2, -1]], atol=1e-12)


@given(st.integers(0, 2**31))
def test_relative_actions_applied_to_the_pose_give_back_the_absolute_targets(seed):
    """A LIBERO-like state [eef position, axis-angle, gripper qpos 2] and absolute target poses [position,
    quaternion xyzw, gripper]: relative to the state, then applied to it again."""
    rng = np.random.default_rng(seed)
    state = np.concatenate([rng.normal(size=(5, 3)), rng.uniform(-1.5, 1.5, (5, 3)), rng.normal(size=(5, 2))], 1)
    quat = rng.normal(size=(5, 4))
    targets = np.concatenate([rng.normal(size=(5, 3)), quat / np.linalg.norm(quat, axis=1, keepdims=True),
                              rng.uniform(-1, 1, (5, 1))], 1)
    rel = lerobot.relative_actions(state, targets, "axis-angle", "quaternion-xyzw")
    assert rel.shape == (5, 10)
    np.testing.assert_allclose(rel[:, :3], targets[:, :3] - state[:, :3], atol=1e-12)
    back = lerobot.absolute_actions(state, rel, "axis-angle", "quaternion-xyzw")
    np.testing.assert_allclose(back[:, :3], targets[:, :3], atol=1e-9)
    np.testing.assert_allclose(lerobot.rotation_to_matrix(back[:, 3:7], "quaternion-xyzw"),
                               lerobot.rotation_to_matrix(targets[:, 3:7], "quaternion-xyzw"), atol=1e-9)
    np.testing.assert_allclose(back[:, 7], targets[:, 7], atol=0)
    # the target equal to the current pose is the identity: no motion, 6D [1, 0, 0, 0, 1, 0]
    same = np.concatenate([state[:, :3], lerobot.matrix_to_rotation(rotations.axis_angle_to_matrix(state[:, 3:6]),
                                                                    "quaternion-xyzw"), targets[:, 7:]], 1)
    np.testing.assert_allclose(lerobot.relative_actions(state, same, "axis-angle", "quaternion-xyzw")[:, :9],
                               np.tile([0, 0, 0, 1, 0, 0, 0, 1, 0], (5, 1)), atol=1e-9)


def test_preprocess_composes_and_checks_its_settings():
    state = np.zeros((2, 8))
    actions = np.array([[0.1, 0.2, 0.3, 0.0, 0.0, 0.5, 0.7], [0, 0, 0, 0, 0, 0, -0.2]])
    out = Preprocess(rotation="axis-angle", gripper="binary", gripper_threshold=0.0)(state, actions)
    assert out.dtype == np.float32 and out.shape == (2, 10) and out[:, -1].tolist() == [1.0, -1.0]
    np.testing.assert_allclose(out[0, 3:9], rotations.axis_angle_to_matrix([0, 0, 0.5])[:2].reshape(6), atol=1e-7)
    np.testing.assert_array_equal(Preprocess()(state, actions), actions.astype(np.float32))
    assert lerobot.binary_gripper([0.3, 0.5, 0.7], 0.5).tolist() == [-1.0, -1.0, 1.0]
    with pytest.raises(ValueError, match="--relative needs --rotation and --state_rotation"):
        Preprocess(relative=True, rotation="axis-angle")
    with pytest.raises(ValueError, match="--rotation must be one of"):
        Preprocess(rotation="euler")
