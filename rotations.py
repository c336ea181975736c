"""Rotations and poses as the paper's actions carry them: a rotation as 6D (the first two rows of its matrix, the
continuous representation of Zhou et al. 2019), converted from and to matrices, axis-angle vectors and quaternions,
and actions relative to the proprioceptive pose. numpy, float64, any leading batch shape.

A pose is (p, R): position p (3,) and rotation matrix R (3, 3) in the robot's base frame. An action's target pose
(p_t, R_t) relative to the current pose (p, R) is

    dp = p_t - p            (in the base frame)          dR = R^T R_t   (the target in the current gripper frame)

and the absolute target comes back as p_t = p + dp, R_t = R dR (relative_pose / apply_relative_pose).

Not here: reading a dataset (lerobot.py), what a simulator expects (a benchmark harness converts dR to its own
convention, e.g. LIBERO's delta axis-angle in the base frame, R_t R^T).
"""
import numpy as np


def _skew(v):
    """[v]_x, the matrix of the cross product with v: (..., 3) -> (..., 3, 3)."""
    z = np.zeros(v.shape[:-1])
    x, y, w = v[..., 0], v[..., 1], v[..., 2]
    return np.stack([np.stack([z, -w, y], -1), np.stack([w, z, -x], -1), np.stack([-y, x, z], -1)], -2)


def axis_angle_to_matrix(v):
    """Rodrigues: R = I + sin(t) [k]_x + (1 - cos(t)) [k]_x^2 for v = t k, |k| = 1.  (..., 3) -> (..., 3, 3).
    Written with sin(t) / t and (1 - cos t) / t^2 (their series near t = 0), so it is exact at v = 0."""
    v = np.asarray(v, dtype=np.float64)
    t = np.linalg.norm(v, axis=-1)[..., None, None]
    small = t < 1e-4
    a = np.where(small, 1 - t ** 2 / 6, np.sin(t) / np.where(small, 1, t))
    b = np.where(small, 0.5 - t ** 2 / 24, (1 - np.cos(t)) / np.where(small, 1, t) ** 2)
    K = _skew(v)
    return np.eye(3) + a * K + b * (K @ K)


def quaternion_to_matrix(q, order="xyzw"):
    """A unit quaternion (..., 4), in `order` "xyzw" (robosuite, LIBERO, scipy) or "wxyz", -> (..., 3, 3).
    The quaternion is normalised first; q and -q give the same rotation."""
    q = np.asarray(q, dtype=np.float64)
    x, y, z, w = np.moveaxis(q if order == "xyzw" else np.roll(q, -1, axis=-1), -1, 0)
    n = np.sqrt(x * x + y * y + z * z + w * w)
    x, y, z, w = x / n, y / n, z / n, w / n
    return np.stack([np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
                     np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
                     np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1)], -2)


def matrix_to_quaternion(R, order="xyzw"):
    """The unit quaternion of a rotation matrix, w >= 0.  (..., 3, 3) -> (..., 4).

    Each row below is 4 c q for one component c of q = (w, x, y, z) (e.g. 4 w^2 = 1 + tr R); the row of the largest
    |c| is the well-conditioned one at every angle (Shepperd's method), and normalising it gives q."""
    R = np.asarray(R, dtype=np.float64)
    r = {f"{i}{j}": R[..., i, j] for i in range(3) for j in range(3)}
    tr = r["00"] + r["11"] + r["22"]
    rows = np.stack([
        np.stack([1 + tr, r["21"] - r["12"], r["02"] - r["20"], r["10"] - r["01"]], -1),
        np.stack([r["21"] - r["12"], 1 + 2 * r["00"] - tr, r["01"] + r["10"], r["02"] + r["20"]], -1),
        np.stack([r["02"] - r["20"], r["01"] + r["10"], 1 + 2 * r["11"] - tr, r["12"] + r["21"]], -1),
        np.stack([r["10"] - r["01"], r["02"] + r["20"], r["12"] + r["21"], 1 + 2 * r["22"] - tr], -1)], -2)
    best = np.take_along_axis(rows, np.diagonal(rows, axis1=-2, axis2=-1).argmax(-1)[..., None, None], -2)[..., 0, :]
    q = best / np.linalg.norm(best, axis=-1, keepdims=True)
    q = q * np.where(q[..., :1] < 0, -1.0, 1.0)                   # wxyz
    return np.roll(q, -1, axis=-1) if order == "xyzw" else q


def matrix_to_axis_angle(R):
    """The rotation vector t k (angle t in [0, pi], axis k) of a rotation matrix, by way of its quaternion.
    (..., 3, 3) -> (..., 3)."""
    q = matrix_to_quaternion(R, order="wxyz")
    w, xyz = q[..., :1], q[..., 1:]
    s = np.linalg.norm(xyz, axis=-1, keepdims=True)               # sin(t / 2)
    t = 2 * np.arctan2(s, w)
    return np.where(s < 1e-12, 2 * xyz / np.maximum(w, 1e-300), xyz * t / np.maximum(s, 1e-300))


def matrix_to_6d(R):
    """The first two rows of R, concatenated: (..., 3, 3) -> (..., 6)."""
    R = np.asarray(R, dtype=np.float64)
    return R[..., :2, :].reshape(*R.shape[:-2], 6)


def sixd_to_matrix(x):
    """The rotation whose first two rows are closest to the 6D vector's (Gram-Schmidt), third row r1 x r2; exact
    for a 6D vector made by matrix_to_6d, and a valid rotation for any other, e.g. a network's output.
    (..., 6) -> (..., 3, 3)."""
    x = np.asarray(x, dtype=np.float64)
    a, b = x[..., :3], x[..., 3:]
    r1 = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b - (r1 * b).sum(-1, keepdims=True) * r1
    r2 = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return np.stack([r1, r2, np.cross(r1, r2)], axis=-2)


def relative_pose(p, R, p_target, R_target):
    """(dp, dR) = (p_t - p, R^T R_t): a target pose relative to the current one (see the module docstring)."""
    return np.asarray(p_target) - np.asarray(p), np.swapaxes(np.asarray(R), -1, -2) @ np.asarray(R_target)


def apply_relative_pose(p, R, dp, dR):
    """The absolute target (p + dp, R dR) of a relative action."""
    return np.asarray(p) + np.asarray(dp), np.asarray(R) @ np.asarray(dR)
