"""libero_eval.py without LIBERO: the results on disk (incremental, resumable, a torn last line dropped, other
settings refused), the per-suite summary with Wilson intervals, how an observation is sent, the command's checks.
(With LIBERO: tests/test_libero.py.)"""
import json

import numpy as np
import pytest

import evaluation
import libero_eval

SETTINGS = {"policy": "out/libero", "server": False, "replan": 5}


def episode(task_id, trial, success, suite="goal"):
    return {"suite": suite, "task_id": task_id, "task": f"task {task_id}", "trial": trial, "success": success,
            "steps": 100 + trial, "seconds": 1.0}


def test_results_are_written_as_they_come_and_resume(tmp_path):
    results = libero_eval.Results(tmp_path, SETTINGS)
    results.add([episode(0, 0, True), episode(0, 1, False)])
    results.add([episode(1, 0, True), episode(0, 0, True, suite="spatial")])
    summary = json.loads((tmp_path / "results.json").read_text())
    goal = summary["suites"]["goal"]
    assert goal["episodes"] == 3 and goal["tasks"]["task 0"]["successes"] == 1
    assert goal["tasks"]["task 0"]["interval"] == pytest.approx(list(evaluation.wilson_interval(1, 2)))
    assert goal["tasks"]["task 0"]["mean_steps"] == 100.5
    assert summary["average_of_suites"] == pytest.approx((2 / 3 + 1) / 2)
    # a crash in the middle of a line: the rerun drops the torn line and finds the rest
    with open(tmp_path / "episodes.jsonl", "a") as f:
        f.write('{"suite": "goal", "task_id": 1, "tr')
    again = libero_eval.Results(tmp_path, SETTINGS)
    assert again.done("goal", 0) == {0, 1} and again.done("goal", 1) == {0} and again.done("object", 0) == set()
    assert len((tmp_path / "episodes.jsonl").read_text().splitlines()) == 4
    again.add([episode(1, 1, False)])
    lines = (tmp_path / "episodes.jsonl").read_text().splitlines()
    assert [json.loads(line)["trial"] for line in lines] == [0, 1, 0, 0, 1]
    assert again.by_suite()["goal"].summary().splitlines()[-1].split()[:2] == ["mean", "2/4"]


def test_results_of_other_settings_are_not_mixed(tmp_path):
    libero_eval.Results(tmp_path, SETTINGS)
    with pytest.raises(SystemExit, match=r"other settings \(replan: 5 there, 2 now\)"):
        libero_eval.Results(tmp_path, {**SETTINGS, "replan": 2})


def test_a_frame_is_sent_as_its_two_cameras():
    frame = np.zeros((224, 448, 3), np.uint8)
    frame[:, 224:] = 7
    sent = libero_eval.request(frame, np.arange(8.0), "open the drawer")
    assert (sent["observation/image"] == 0).all() and (sent["observation/wrist_image"] == 7).all()
    assert sent["observation/image"].shape == (224, 224, 3) and sent["observation/image"].flags.c_contiguous
    assert sent["observation/state"].dtype == np.float64 and sent["prompt"] == "open the drawer"


@pytest.mark.parametrize("argv, message", [
    (["--run", "x", "--suites", "goal,long"], "--suites: choose from spatial, object, goal, 10"),
    (["--run", "x", "--tasks", "10"], "--tasks must lie in 0..9"),
    (["--run", "/nonexistent"], "no such checkpoint"),
])
def test_the_command_refuses_what_cannot_run(argv, message):
    with pytest.raises(SystemExit, match=message):
        libero_eval.main(argv)
