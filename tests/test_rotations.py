"""rotations.py: 6D <-> matrix <-> axis-angle / quaternion round trips (hypothesis), and relative actions that give
back the absolute targets."""
import numpy as np
from hypothesis import given, strategies as st

import rotations as rot

unit = st.floats(-1, 1, allow_nan=False)
vectors = st.tuples(unit, unit, unit).map(np.array)
quaternions = st.tuples(unit, unit, unit, unit).filter(lambda q: np.linalg.norm(q) > 0.1).map(
    lambda q: np.array(q) / np.linalg.norm(q))


def is_rotation(R):
    return np.allclose(R @ R.swapaxes(-1, -2), np.eye(3), atol=1e-9) and np.allclose(np.linalg.det(R), 1, atol=1e-9)


@given(vectors, st.floats(0, np.pi, allow_nan=False))
def test_axis_angle_round_trip(axis, angle):
    v = angle * axis / max(np.linalg.norm(axis), 1e-12) if np.linalg.norm(axis) > 1e-6 else np.zeros(3)
    R = rot.axis_angle_to_matrix(v)
    assert is_rotation(R)
    back = rot.matrix_to_axis_angle(R)
    if angle < np.pi - 1e-6:   # at 180 degrees t k and -t k are the same rotation
        np.testing.assert_allclose(back, v, atol=1e-9)
    np.testing.assert_allclose(rot.axis_angle_to_matrix(back), R, atol=1e-9)


@given(quaternions)
def test_quaternion_round_trip_in_both_orders(q_xyzw):
    R = rot.quaternion_to_matrix(q_xyzw)
    assert is_rotation(R)
    q = rot.matrix_to_quaternion(R)
    assert q[3] >= 0 and min(np.abs(q - q_xyzw).max(), np.abs(q + q_xyzw).max()) < 1e-9   # q, -q: one rotation
    q_wxyz = np.roll(q_xyzw, 1)
    np.testing.assert_allclose(rot.quaternion_to_matrix(q_wxyz, order="wxyz"), R, atol=1e-12)
    np.testing.assert_allclose(rot.matrix_to_quaternion(R, order="wxyz"), np.roll(q, 1), atol=1e-12)


@given(quaternions, st.floats(0.5, 2), vectors)
def test_6d_is_the_first_two_rows_and_inverts_exactly(q, scale, noise):
    R = rot.quaternion_to_matrix(q)
    six = rot.matrix_to_6d(R)
    np.testing.assert_array_equal(six, np.concatenate([R[0], R[1]]))
    np.testing.assert_allclose(rot.sixd_to_matrix(six), R, atol=1e-12)
    # any 6D vector (a network's output) gives a rotation; a scaled copy of a valid one gives the same rotation
    assert is_rotation(rot.sixd_to_matrix(six * scale + 0.1 * np.concatenate([noise, noise[::-1]])))
    np.testing.assert_allclose(rot.sixd_to_matrix(six * scale), R, atol=1e-12)


def test_pinned_values():
    np.testing.assert_allclose(rot.axis_angle_to_matrix([0, 0, np.pi / 2]), [[0, -1, 0], [1, 0, 0], [0, 0, 1]],
                               atol=1e-15)
    np.testing.assert_allclose(rot.quaternion_to_matrix([0, 0, np.sin(np.pi / 4), np.cos(np.pi / 4)]),
                               rot.axis_angle_to_matrix([0, 0, np.pi / 2]), atol=1e-15)
    np.testing.assert_allclose(rot.matrix_to_axis_angle(np.diag([1.0, -1, -1])), [np.pi, 0, 0], atol=1e-12)
    np.testing.assert_array_equal(rot.axis_angle_to_matrix(np.zeros(3)), np.eye(3))


@given(vectors, quaternions, vectors, quaternions)
def test_relative_actions_give_back_the_absolute_targets(p, q, p_target, q_target):
    R, R_target = rot.quaternion_to_matrix(q), rot.quaternion_to_matrix(q_target)
    dp, dR = rot.relative_pose(p, R, p_target, R_target)
    assert is_rotation(dR)
    p_back, R_back = rot.apply_relative_pose(p, R, dp, dR)
    np.testing.assert_allclose(p_back, p_target, atol=1e-12)
    np.testing.assert_allclose(R_back, R_target, atol=1e-12)
    # batched: a trajectory of targets relative to one pose, through the 6D form a model predicts
    dR6 = rot.matrix_to_6d(np.stack([dR, np.eye(3)]))
    _, R_back = rot.apply_relative_pose(p, R, 0, rot.sixd_to_matrix(dR6))
    np.testing.assert_allclose(R_back, np.stack([R_target, R]), atol=1e-12)
