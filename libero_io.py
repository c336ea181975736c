"""LIBERO's conventions, as openpi's LIBERO client and the benchmark's controller define them: what a LIBERO
observation becomes on the wire, and how a policy's action chunk becomes LIBERO's actions. numpy, PIL and
rotations.py only, so the policy server (serve.py) uses it without LIBERO installed.

Observation: robosuite's keys -> openpi's LIBERO keys (observation()):
    observation/image        agentview_image rotated by 180 degrees ([::-1, ::-1]: robosuite's offscreen images come
                             out upside down and mirrored), resized with padding to 224x224 (resize_with_pad)
    observation/wrist_image  robot0_eye_in_hand_image, the same
    observation/state        (8,) float64: robot0_eef_pos (3, metres, world frame), the axis-angle of robot0_eef_quat
                             (3, radians; quaternion order x, y, z, w; see quat_to_axis_angle), robot0_gripper_qpos
                             (2, the finger joints, metres)
    prompt                   the task's instruction

Actions: LIBERO's 7-D action a drives robosuite's OSC_POSE controller in delta mode at 20 Hz; the controller clips a
to [-1, 1] and scales it (POSITION_SCALE, ROTATION_SCALE):
    goal position   p + 0.05 a[0:3]              metres, world frame
    goal rotation   Exp(0.5 a[3:6]) R            axis-angle in radians, world frame: left-multiplied
    gripper         a[6]                         -1 open, +1 closed
A policy trained on relative 6D actions (the paper's format, in rotations.py's convention) predicts for each step j
of its chunk a target pose relative to the pose (p0, R0) observed when the chunk was asked for:
    x_j = (dp_j (3), 6D of dR_j (6), gripper_j (1)),      p_j = p0 + dp_j,   R_j = R0 dR_j
relative6d_to_libero turns the chunk into commands, each moving the goal from one target to the next (the first
from the observed pose, (p_-1, R_-1) = (p0, R0)):
    a_j[0:3] = (p_j - p_{j-1}) / 0.05,      a_j[3:6] = Log(R_j R_{j-1}^T) / 0.5,      a_j[6] = gripper_j
and libero_to_relative6d is its inverse: how a LIBERO dataset's commands become such targets for training.

Not here: running LIBERO (libero_eval.py), the server and its observation keys (serve.py).
"""
import numpy as np
from PIL import Image

import rotations

IMAGE, WRIST, STATE, PROMPT = "observation/image", "observation/wrist_image", "observation/state", "prompt"
SIZE = 224                 # openpi's LIBERO client sends 224x224 images
STATE_DIM, ACTION_DIM, RELATIVE6D_DIM = 8, 7, 10
POSITION_SCALE = 0.05      # metres per unit of a[0:3] (robosuite's OSC_POSE output_max)
ROTATION_SCALE = 0.5       # radians per unit of a[3:6]

# ----------------------------------------------------------------------------- observations


def resize_with_pad(image, height, width):
    """openpi's image resize (its LIBERO client's, after TensorFlow's resize_with_pad): scale (bilinear) to fit
    height x width keeping the aspect ratio, centred on black. (h, w, C) uint8 -> (height, width, C) uint8."""
    h, w = image.shape[:2]
    if (h, w) == (height, width):
        return image
    ratio = max(w / width, h / height)
    rh, rw = int(h / ratio), int(w / ratio)
    resized = np.asarray(Image.fromarray(image).resize((rw, rh), resample=Image.BILINEAR))
    out = np.zeros((height, width, image.shape[2]), dtype=np.uint8)
    top, left = (height - rh) // 2, (width - rw) // 2
    out[top:top + rh, left:left + rw] = resized.reshape(rh, rw, -1)
    return out


def quat_to_axis_angle(q):
    """The rotation vector of a unit quaternion (x, y, z, w) as robosuite's quat2axisangle computes it, the
    convention of LIBERO's datasets and openpi's client: angle 2 acos(w) in [0, 2 pi], axis (x, y, z) / sin(angle / 2).
    Unlike rotations.matrix_to_axis_angle it does not fold w < 0 into an angle below pi, so a policy trained on those
    datasets sees the values it was trained on. Zero where |w| = 1 exactly (no rotation), as robosuite has it."""
    x, w = np.asarray(q[:3], dtype=np.float64), float(np.clip(q[3], -1.0, 1.0))
    s = np.sqrt(1.0 - w * w)
    return np.zeros(3) if s == 0.0 else x * 2.0 * np.arccos(w) / s


def state(raw):
    """The 8-D state of a robosuite observation: eef position, eef axis-angle, the two gripper finger joints."""
    return np.concatenate([raw["robot0_eef_pos"], quat_to_axis_angle(raw["robot0_eef_quat"]),
                           raw["robot0_gripper_qpos"]]).astype(np.float64)


def observation(raw, instruction, size=SIZE):
    """A robosuite observation as openpi's LIBERO client sends it (the module docstring lists the keys)."""
    def camera(key):
        return resize_with_pad(np.ascontiguousarray(raw[key][::-1, ::-1]), size, size)
    return {IMAGE: camera("agentview_image"), WRIST: camera("robot0_eye_in_hand_image"), STATE: state(raw),
            PROMPT: str(instruction)}

# ----------------------------------------------------------------------------- actions


def _pose(state_row):
    """(p, R) of an 8-D state: its position and the rotation of its axis-angle (any angle)."""
    s = np.asarray(state_row, dtype=np.float64)
    return s[:3], rotations.axis_angle_to_matrix(s[3:6])


def relative6d_to_libero(chunk, state_row):
    """(H_a, 10) relative 6D actions, relative to the pose in `state_row` (8,) -> (H_a, 7) LIBERO commands
    (module docstring). Not clipped: the controller clips."""
    chunk = np.asarray(chunk, dtype=np.float64)
    if chunk.ndim != 2 or chunk.shape[1] != RELATIVE6D_DIM:
        raise ValueError(f"relative 6D actions are (H_a, 10) = position 3 + 6D rotation 6 + gripper 1, "
                         f"got {chunk.shape}")
    p0, R0 = _pose(state_row)
    p, R = rotations.apply_relative_pose(p0, R0, chunk[:, :3], rotations.sixd_to_matrix(chunk[:, 3:9]))
    p_prev, R_prev = np.concatenate([p0[None], p[:-1]]), np.concatenate([R0[None], R[:-1]])
    step = rotations.matrix_to_axis_angle(R @ np.swapaxes(R_prev, -1, -2))        # Log(R_j R_{j-1}^T)
    return np.concatenate([(p - p_prev) / POSITION_SCALE, step / ROTATION_SCALE, chunk[:, 9:]], axis=1)


def libero_to_relative6d(commands, state_row):
    """The inverse of relative6d_to_libero: (H_a, 7) LIBERO commands issued from the pose in `state_row` -> the
    (H_a, 10) targets they command, relative to that pose."""
    commands = np.asarray(commands, dtype=np.float64)
    if commands.ndim != 2 or commands.shape[1] != ACTION_DIM:
        raise ValueError(f"LIBERO commands are (H_a, 7), got {commands.shape}")
    p0, R0 = _pose(state_row)
    p = p0 + np.cumsum(commands[:, :3] * POSITION_SCALE, axis=0)
    R, targets = R0, []
    for a in commands:
        R = rotations.axis_angle_to_matrix(a[3:6] * ROTATION_SCALE) @ R              # R_j = Exp(0.5 a) R_{j-1}
        targets.append(R)
    dp, dR = rotations.relative_pose(p0, R0, p, np.stack(targets))
    return np.concatenate([dp, rotations.matrix_to_6d(dR), commands[:, 6:]], axis=1)
