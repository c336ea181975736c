"""Run in LIBERO's environment by tests/test_libero.py: one libero_goal environment, several checks, one JSON line
of what was measured on stdout (the test asserts on it).

    python tests/libero_checks.py RUN SERVER_ADDRESS

  observation  libero_io.observation on a real frame against openpi_client's own image resize and robosuite's
               quat2axisangle (what openpi's LIBERO client sends)
  episode      one short episode (settle steps + 10 policy steps) of the tiny run: at each replan the server and the
               policy in process get the same observation (the server's answer is executed). Two episodes would not
               do: LIBERO renders the same initial state differently after each reset (about 20% of the pixels differ)
  openpi       openpi_client.WebsocketClientPolicy against the server, and the same request in process
  directions   scripted relative 6D chunks converted by libero_io.relative6d_to_libero and executed: where the
               end effector and the fingers went
"""
import json
import sys
import time

import numpy as np
import robosuite.utils.transform_utils as T
from openpi_client import image_tools, websocket_client_policy

import evaluation
import libero_eval
import libero_io
import rotations
import serve

STEPS = 10


def observation(env):
    env.env.reset()
    raw = env.env.set_init_state(env.init_states[0])
    ours = libero_io.observation(raw, env.instruction)
    theirs = {key: image_tools.convert_to_uint8(image_tools.resize_with_pad(
        np.ascontiguousarray(raw[name][::-1, ::-1]), 224, 224))
        for key, name in ((libero_io.IMAGE, "agentview_image"), (libero_io.WRIST, "robot0_eye_in_hand_image"))}
    state = np.concatenate([raw["robot0_eef_pos"], T.quat2axisangle(raw["robot0_eef_quat"].copy()),
                            raw["robot0_gripper_qpos"]])
    full = libero_io.observation(raw, env.instruction, size=256)
    return {"images_equal_openpi": all(np.array_equal(ours[k], theirs[k]) for k in theirs),
            "state_vs_openpi": float(np.abs(ours[libero_io.STATE] - state).max()),
            "flipped": bool(np.array_equal(full[libero_io.IMAGE], raw["agentview_image"][::-1, ::-1])),
            "image_shapes": [list(ours[k].shape) for k in theirs], "state": ours[libero_io.STATE].tolist(),
            "raw_quat": raw["robot0_eef_quat"].tolist()}


class Both:
    """The server's policy, executed, and the same run in process, asked the same at every replan."""

    def __init__(self, remote, local):
        self.remote, self.local, self.metadata, self.local_chunks = remote, local, local.metadata, []

    def bind(self, envs):
        self.remote.bind(envs)

    def act_batch(self, frames, instructions, proprio):
        self.local_chunks.append(self.local.act_batch(frames, instructions, proprio))
        return self.remote.act_batch(frames, instructions, proprio)   # it sends the newest frame; the server keeps H_o


def episode(remote, local, env):
    both, start = Both(remote, local), time.perf_counter()
    result = evaluation.rollout(both, [env], [0], libero_eval.REPLAN, local.metadata["history"],
                                local.metadata["history_stride"], record=[0])[0]
    return {"server": [chunk.tolist() for _, chunk in result["plans"][::libero_eval.REPLAN]],
            "in_process": [chunk[0].tolist() for chunk in both.local_chunks], "steps": result["steps"],
            "success": result["success"], "seconds": time.perf_counter() - start}


def openpi(address, local, env):
    host, port = address.rsplit(":", 1)
    client = websocket_client_policy.WebsocketClientPolicy(host, int(port))
    obs, _ = env.reset(1)
    answer = client.infer(libero_eval.request(obs["frame"], obs["proprio"], obs["instruction"]))
    mine = local.act_batch(np.stack([[obs["frame"]] * 2]), [obs["instruction"]], obs["proprio"][None])[0]
    return {"metadata": client.get_server_metadata(), "actions": answer["actions"].tolist(),
            "dtype": str(answer["actions"].dtype), "in_process": mine.tolist(),
            "server_timing": answer["server_timing"]}


def directions(env):
    """Each scripted chunk: 5 steps, targets relative to the pose observed before it (libero_io's convention)."""
    obs, _ = env.reset(0)
    j = np.arange(1, 6)[:, None]
    still = np.tile(rotations.matrix_to_6d(np.eye(3)), (5, 1))
    turn = rotations.matrix_to_6d(rotations.axis_angle_to_matrix(j * [0.0, 0.0, 0.06]))  # about the gripper's z
    chunks = {f"+{axis}": np.concatenate([j * 0.01 * np.eye(3)[i], still, -np.ones((5, 1))], axis=1)
              for i, axis in enumerate("xyz")}
    chunks["turn"] = np.concatenate([np.zeros((5, 3)), turn, -np.ones((5, 1))], axis=1)
    chunks["close"] = np.concatenate([np.zeros((5, 3)), still, np.ones((5, 1))], axis=1)
    moved = {}
    for name, chunk in chunks.items():
        before = obs["proprio"]
        commands = libero_io.relative6d_to_libero(chunk, before)
        for a in commands:
            obs, *_ = env.step(a)
        after = obs["proprio"]
        (p0, R0), (p1, R1) = (libero_io._pose(s) for s in (before, after))
        moved[name] = {"position": (p1 - p0).tolist(), "rotation_in_gripper_frame":
                       rotations.matrix_to_axis_angle(R0.T @ R1).tolist(), "fingers": (after[6:] - before[6:]).tolist(),
                       "first_command": commands[0].tolist()}
    return moved


def main(run, address):
    start = time.perf_counter()
    env = libero_eval.LiberoEnv("goal", 0, max_steps=STEPS)
    made = time.perf_counter() - start
    out = {"instruction": env.instruction, "make_env_seconds": made, "observation": observation(env)}
    local = libero_eval.LocalPolicy(run, serve.MAPPINGS["libero"], seed=0)
    out["episode"] = episode(libero_eval.RemotePolicy(address), local, env)
    out["openpi"] = openpi(address, local, env)
    out["directions"] = directions(env)
    out["env_cost"] = env.cost
    out["policy_ms_per_call"] = local.seconds / local.calls * 1e3
    print(json.dumps(out))


if __name__ == "__main__":
    main(*sys.argv[1:])
