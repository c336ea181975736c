"""libero_io.py: the observation conversion pinned on a known frame, the 8-D state, and the relative 6D -> LIBERO
action conversion: its signs and frames on worked examples, and its inverse. (On real LIBERO frames and against
openpi's client: tests/test_libero.py.)"""
import numpy as np
import pytest
from hypothesis import given, strategies as st
from PIL import Image

import libero_io
import rotations


def test_resize_with_pad_keeps_the_aspect_ratio_on_black():
    image = np.zeros((100, 50, 3), np.uint8)
    image[..., 0] = 200
    out = libero_io.resize_with_pad(image, 32, 32)
    # 100x50 scaled by 32/100 -> 32x16, centred: 8 black columns either side
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert (out[:, :8] == 0).all() and (out[:, 24:] == 0).all() and (out[:, 8:24, 0] == 200).all()
    square = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    expected = np.asarray(Image.fromarray(square).resize((224, 224), resample=Image.BILINEAR))
    np.testing.assert_array_equal(libero_io.resize_with_pad(square, 224, 224), expected)   # square: plain bilinear
    assert libero_io.resize_with_pad(square, 256, 256) is square


def known_frame():
    """A robosuite observation whose every value is known: images with a marker in their top-left pixel, the
    gripper pointing down (180 degrees about x), slightly turned about z."""
    agent, wrist = (np.zeros((256, 256, 3), np.uint8) for _ in range(2))
    agent[0, 0], wrist[0, 0] = (255, 0, 0), (0, 255, 0)
    # 180 degrees about x, then 0.2 rad about the world's z: q = (cos 0.1, 0, 0, sin 0.1) * (1, 0, 0, 0) in (x, y, z, w)
    quat = np.array([np.cos(0.1), np.sin(0.1), 0.0, 0.0])
    return {"agentview_image": agent, "robot0_eye_in_hand_image": wrist, "robot0_eef_pos": np.array([-0.2, 0.01, 1.17]),
            "robot0_eef_quat": quat, "robot0_gripper_qpos": np.array([0.039, -0.039])}


def test_observation_flips_both_images_and_builds_the_8d_state():
    raw = known_frame()
    full = libero_io.observation(raw, "open the drawer", size=256)
    assert set(full) == {"observation/image", "observation/wrist_image", "observation/state", "prompt"}
    # rotated by 180 degrees: the marker moves from the top-left to the bottom-right pixel
    assert tuple(full["observation/image"][-1, -1]) == (255, 0, 0) and full["observation/image"][0, 0].sum() == 0
    assert tuple(full["observation/wrist_image"][-1, -1]) == (0, 255, 0)
    # w = 0: angle 2 acos(0) = pi about the axis (cos 0.1, sin 0.1, 0)
    np.testing.assert_allclose(full["observation/state"],
                               [-0.2, 0.01, 1.17, np.pi * np.cos(0.1), np.pi * np.sin(0.1), 0, 0.039, -0.039],
                               rtol=0, atol=1e-12)
    small = libero_io.observation(raw, "open the drawer")
    assert small["observation/image"].shape == (224, 224, 3) and small["prompt"] == "open the drawer"
    np.testing.assert_array_equal(small["observation/image"],
                                  libero_io.resize_with_pad(full["observation/image"], 224, 224))


def test_quat_to_axis_angle_keeps_robosuites_unfolded_angles():
    assert (libero_io.quat_to_axis_angle([0, 0, 0, 1]) == 0).all()
    s = np.sin(np.pi / 4)
    np.testing.assert_allclose(libero_io.quat_to_axis_angle([0, 0, s, s]), [0, 0, np.pi / 2], atol=1e-12)
    # w < 0: robosuite reports 2 acos(w) > pi (not the folded pi - 0.02 about -x); the rotation is the same
    q = np.array([1.0, 0, 0, -0.01]) / np.linalg.norm([1.0, 0, 0, -0.01])
    v = libero_io.quat_to_axis_angle(q)
    np.testing.assert_allclose(v, [2 * np.arccos(q[3]), 0, 0], atol=1e-12)
    assert v[0] > np.pi
    np.testing.assert_allclose(rotations.axis_angle_to_matrix(v), rotations.quaternion_to_matrix(q), atol=1e-12)


def pose_state(p, R, fingers=(0.04, -0.04)):
    return np.concatenate([p, rotations.matrix_to_axis_angle(R), fingers])


R_Z90 = rotations.axis_angle_to_matrix([0, 0, np.pi / 2])    # the gripper turned 90 degrees about the world's z


def test_relative6d_to_libero_signs_and_frames():
    state = pose_state([0.1, 0.2, 1.0], R_Z90)
    tilt = rotations.axis_angle_to_matrix([0.1, 0, 0])       # 0.1 rad about the gripper's own x axis
    chunk = np.array([[0.01, 0, 0, *rotations.matrix_to_6d(np.eye(3)), 1.0],      # 1 cm along world x, close
                      [0.01, 0.02, 0, *rotations.matrix_to_6d(tilt), -1.0]])       # then 2 cm along y, and tilt
    a = libero_io.relative6d_to_libero(chunk, state)
    # step 1: 0.01 m / 0.05 m per unit = 0.2 along x; no rotation; the gripper as given
    np.testing.assert_allclose(a[0], [0.2, 0, 0, 0, 0, 0, 1.0], atol=1e-12)
    # step 2 moves from target 1 to target 2: 0.02 m along y = 0.4. The gripper's x axis is the world's y here
    # (R_Z90), so 0.1 rad about it is 0.1 rad about world y: 0.2 units
    np.testing.assert_allclose(a[1], [0, 0.4, 0, 0, 0.2, 0, -1.0], atol=1e-12)


def test_relative6d_to_libero_rejects_other_shapes():
    with pytest.raises(ValueError, match=r"\(H_a, 10\)"):
        libero_io.relative6d_to_libero(np.zeros((8, 7)), np.zeros(8))
    with pytest.raises(ValueError, match=r"\(H_a, 7\)"):
        libero_io.libero_to_relative6d(np.zeros((8, 10)), np.zeros(8))


@given(st.integers(0, 2**32 - 1), st.integers(1, 12))
def test_the_two_conversions_invert_each_other(seed, H):
    rng = np.random.default_rng(seed)
    state = pose_state(rng.normal(size=3), rotations.axis_angle_to_matrix(rng.normal(size=3)), rng.normal(size=2))
    commands = np.concatenate([rng.uniform(-1, 1, (H, 6)), rng.choice([-1.0, 1.0], (H, 1))], axis=1)
    relative = libero_io.libero_to_relative6d(commands, state)
    np.testing.assert_allclose(libero_io.relative6d_to_libero(relative, state), commands, atol=1e-9)
    # and the targets are where the commands lead: p_j = p0 + 0.05 sum a[0:3], R_j = Exp(0.5 a_j) ... Exp(0.5 a_0) R0
    p0, R0 = libero_io._pose(state)
    R = R0
    for a, x in zip(commands, relative):
        R = rotations.axis_angle_to_matrix(0.5 * a[3:6]) @ R
        np.testing.assert_allclose(R0 @ rotations.sixd_to_matrix(x[3:9]), R, atol=1e-9)
    np.testing.assert_allclose(p0 + relative[:, :3], p0 + 0.05 * np.cumsum(commands[:, :3], axis=0), atol=1e-12)
