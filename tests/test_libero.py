"""LIBERO end to end, in LIBERO's own environment (`python tests/libero_venv.py` builds it once per machine; until then,
these tests skip and say exactly why): the observation conversion on a real frame against openpi's client, one short
libero_goal episode of a tiny untrained policy in process and through the server, openpi's own client against the
server, scripted actions that move the end effector where the action conversion says, and the command line with
its incremental results and resume."""
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import libero_venv
import serve
from sample import VAMPolicy

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def libero_python():
    python, why = libero_venv.ensure()
    if python is None:
        pytest.skip(f"LIBERO is not available on this machine: {why}")
    return python


def in_libero(python, *args, timeout=900):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MUJOCO_GL": "osmesa", "PYOPENGL_PLATFORM": "osmesa"}
    return subprocess.run([str(python), *map(str, args)], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def checks(libero_python, libero_run):
    """tests/libero_checks.py's measurements, against a server (this process, seed 0) serving the tiny run."""
    policy, _ = VAMPolicy.load(libero_run, seed=0)
    server = serve.PolicyServer(serve.ServedPolicy(policy, serve.MAPPINGS["libero"], str(libero_run)), "127.0.0.1", 0,
                                log=lambda _: None).start()
    try:
        proc = in_libero(libero_python, "tests/libero_checks.py", libero_run, f"127.0.0.1:{server.port}")
    finally:
        server.stop()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_observation_conversion_is_openpis_on_a_real_frame(checks):
    o = checks["observation"]
    assert o["images_equal_openpi"] and o["flipped"] and o["image_shapes"] == [[224, 224, 3], [224, 224, 3]]
    assert o["state_vs_openpi"] < 1e-12
    # libero_goal task 0, initial state 0: the gripper pointing down (w ~ 0: an angle near pi), its fingers apart
    assert checks["instruction"] == "open the middle drawer of the cabinet"
    assert abs(np.linalg.norm(o["state"][3:6]) - np.pi) < 0.1 and o["state"][6] > 0.01 and o["state"][7] < -0.01


def test_one_goal_episode_in_process_and_through_the_server(checks, capsys):
    ep = checks["episode"]
    assert ep["steps"] == 10 and not ep["success"]      # 10 random steps open no drawer
    served, local = np.array(ep["server"]), np.array(ep["in_process"])
    assert served.shape == local.shape == (2, 8, 7)     # two replans of H_a = 8 LIBERO actions
    np.testing.assert_allclose(served, local, rtol=0, atol=1e-5)
    cost = checks["env_cost"]
    with capsys.disabled():
        print(f"\n[LIBERO] environment made in {checks['make_env_seconds']:.1f} s; "
              f"{cost['step_s'] / cost['steps'] * 1e3:.0f} ms per step, {cost['reset_s'] / cost['resets']:.1f} s per "
              f"reset; tiny policy {checks['policy_ms_per_call']:.0f} ms per call; server vs in process: largest "
              f"action difference {np.abs(served - local).max():.1e}")


def test_openpis_own_client_gets_the_in_process_answer(checks):
    o = checks["openpi"]
    assert o["metadata"]["action_dim"] == 7 and o["metadata"]["history"] == 2 and o["dtype"] == "float32"
    assert np.array(o["actions"]).shape == (8, 7)
    np.testing.assert_allclose(o["actions"], o["in_process"], rtol=0, atol=1e-5)


def test_scripted_relative_actions_move_the_end_effector_as_converted(checks):
    d = checks["directions"]
    for i, axis in enumerate("xyz"):          # 1 cm per step along a world axis: 0.2 units of LIBERO's command
        moved = np.array(d[f"+{axis}"]["position"])   # the controller lags its targets: 8.5 mm along x measured
        assert d[f"+{axis}"]["first_command"][i] == pytest.approx(0.2, abs=1e-9)
        assert moved[i] > 0.005 and moved[i] > 3 * np.abs(np.delete(moved, i)).max(), (axis, moved)
    # 0.06 rad per step about the gripper's own z axis (its frame, rotations.py's dR): it turns about its z
    turn = np.array(d["turn"]["rotation_in_gripper_frame"])
    assert turn[2] > 0.05 and turn[2] > 3 * np.abs(turn[:2]).max(), turn
    assert np.linalg.norm(d["turn"]["first_command"][3:6]) == pytest.approx(0.06 / 0.5, abs=1e-9)
    # +1 closes: the two fingers move towards each other
    assert d["close"]["fingers"][0] < -0.005 and d["close"]["fingers"][1] > 0.005


def test_the_command_line_writes_as_it_goes_and_resumes(libero_python, libero_run, tmp_path):
    out = tmp_path / "eval"
    args = ["libero_eval.py", "--run", libero_run, "--out", out, "--suites", "goal", "--tasks", "0", "--batch", "1",
            "--max-steps", "10"]
    first = in_libero(libero_python, *args, "--trials", "1", "--videos", "1")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "[goal task 0] trials 0..0: 0/1 succeeded" in first.stdout
    gif = Image.open(out / "videos" / "goal-task0-trial0-failure.gif")
    durations = []
    for i in range(gif.n_frames):   # Pillow merges identical frames (the held end) into one of their summed duration
        gif.seek(i)
        durations.append(gif.info["duration"])
    assert gif.size == (448, 224 + 14) and sum(durations) == (10 + 1 + 5) * 50   # each step, the start, the held end
    line = (out / "episodes.jsonl").read_text()
    second = in_libero(libero_python, *args, "--trials", "2")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "trials 1..1" in second.stdout and "trials 0..0" not in second.stdout       # only the missing trial
    lines = (out / "episodes.jsonl").read_text().splitlines()
    assert len(lines) == 2 and lines[0] + "\n" == line and json.loads(lines[1])["trial"] == 1
    summary = json.loads((out / "results.json").read_text())["suites"]["goal"]
    assert summary["episodes"] == 2 and summary["mean"] == 0.0
    refused = in_libero(libero_python, *args, "--trials", "2", "--replan", "4")
    assert refused.returncode != 0 and "other settings (replan: 5 there, 4 now)" in refused.stderr
