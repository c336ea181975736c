"""experiments.py: each experiment end to end at smoke size through its command line, and what its privileged
policies see."""
import contextlib
import io
import json

import numpy as np
import pytest
from PIL import Image

import config
import evaluation
import experiments
import train
import world


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A finished smoke run of train.py, its decoder at tau_v = 1 on cached states as the default's: the base every
    experiment builds on."""
    root = tmp_path_factory.mktemp("base")
    with contextlib.redirect_stdout(io.StringIO()):
        train.main(["--preset", "smoke", "--world_data", str(root / "data"), "--out", str(root / "run"),
                    "--action.tau_v", "1.0", "--action.cache", "2"])
    return root / "run"


def test_the_oracle_experiment_runs_end_to_end_and_resumes(base, tmp_path, capsys):
    experiments.main(["oracle", "--base", str(base), "--out", str(tmp_path)])
    result = json.loads((tmp_path / "oracle.json").read_text())
    assert len(result["rows"]) == 3 and all(r["episodes"] == 8 for r in result["rows"].values())   # 2 per task
    assert Image.open(tmp_path / "oracle.png").size[0] == 760
    point = tmp_path / "tau_v0.4"
    assert json.loads((point / "results.json").read_text())["config"]["action"]["tau_v"] == "0.4"
    out = capsys.readouterr().out
    assert "true future (oracle)" in out and "cached the frozen video model's block-1 states" in out
    mtime = (point / "action.safetensors").stat().st_mtime
    experiments.main(["oracle", "--base", str(base), "--out", str(tmp_path)])   # a finished point is kept
    assert (point / "action.safetensors").stat().st_mtime == mtime
    with pytest.raises(SystemExit, match="not a finished train.py run"):
        experiments.main(["oracle", "--base", str(tmp_path / "nothing"), "--out", str(tmp_path)])


def test_a_base_from_before_a_setting_existed_gives_its_points_the_plain_default(base, tmp_path):
    """A base whose results.json predates --action.ema (written before the default used one): its points run with
    the plain default, no moving average, not with today's world preset's."""
    old = tmp_path / "old"
    old.mkdir()
    (old / "video.safetensors").write_bytes((base / "video.safetensors").read_bytes())
    results = json.loads((base / "results.json").read_text())
    for stage in ("video", "action"):
        del results["config"][stage]["ema"]
    (old / "results.json").write_text(json.dumps(results))
    assert experiments.base_config(old)["action"]["ema"] == 0.0 and config.PRESETS["world"].action.ema > 0
    assert {k: v for k, v in experiments.base_config(old).items() if k not in ("video", "action")} == \
        {k: v for k, v in results["config"].items() if k not in ("video", "action")}


def test_the_oracles_future_frames_are_what_the_experts_actions_produce(base):
    """Executing the expert's planned chunks whole (replan every H steps), the frames the oracle encoded at each
    replan are the frames the world then shows at t + s, t + 2s, ... (its last frame past the episode's end)."""
    oracle, _ = experiments.OraclePolicy.load(base)
    spec, seen = oracle.spec, []
    H = spec.future_stride * spec.future

    class ExpertReplay:
        def bind(self, worlds):
            oracle.bind(worlds)

        def act_batch(self, frames, instructions, proprio):
            seen.append(oracle.future_frames(frames, instructions, proprio))
            return oracle.expert_chunks

    tasks = list(world.TASK_SETS["goal4"])
    envs = [world.World(t) for t in tasks]
    results = evaluation.rollout(ExpertReplay(), envs, [world.EVAL_SEED_BASE + 3] * 4, replan_every=H,
                                 history=spec.history, record=range(4))
    assert all(r["success"] for r in results)   # the expert's own plans, executed: every task done
    checked = 0
    for j, future in enumerate(seen):
        active = [r for r in results if r["steps"] > H * j]
        assert len(future) == len(active) and future.shape[1] == spec.future
        for r, got in zip(active, future):
            last = len(r["frames"]) - 1
            want = [r["frames"][min(H * j + spec.future_stride * m, last)] for m in range(1, spec.future + 1)]
            np.testing.assert_array_equal(got, np.stack(want))
            checked += 1
    assert checked > len(envs)   # some episodes replanned from where a plan had brought them


def test_the_tau_v_experiment_runs_end_to_end(base, tmp_path, capsys):
    experiments.main(["tau_v", "--base", str(base), "--out", str(tmp_path), "--windows", "32", "--tau_vs", "0.02,1",
                      "--steps", "3"])
    result = json.loads((tmp_path / "tau_v.json").read_text())
    assert list(result["rows"]) == list(result["action_error"]) == ["tau_v = 0.02 (~0)", "tau_v = 1"]
    assert all(e > 0 for e in result["action_error"].values())
    assert result["action_error_of"] == "action error on the ground-truth future"
    point = json.loads((tmp_path / "tau_v-uniform-steps3" / "results.json").read_text())   # --steps names the point
    assert point["config"]["action"]["tau_v"] == "uniform" and point["config"]["action"]["cache"] == 2
    assert point["config"]["action"]["steps"] == 3 != json.loads((base / "results.json").read_text())["config"][
        "action"]["steps"]
    assert Image.open(tmp_path / "tau_v.png").size[0] == 760
    assert "action error on the ground-truth future" in capsys.readouterr().out


def test_the_data_efficiency_experiment_runs_end_to_end(base, tmp_path):
    experiments.main(["data", "--base", str(base), "--out", str(tmp_path), "--labelled", "1,3"])
    result = json.loads((tmp_path / "data.json").read_text())
    # the base's own size (4 per task, all labelled) is always the last point
    assert list(result["rows"]) == [f"{n} per task: {c}" for n in (1, 3, 4) for c in ("video model", "static image")]
    for n, static in ((1, "static-episodes1"), (3, "static-episodes3"), (4, "static")):
        control = json.loads((tmp_path / static / "results.json").read_text())["config"]
        assert control["action"]["episodes"] == (n if n < 4 else 0) and control["video"]["static"]
        if n < 4:
            video = json.loads((tmp_path / f"episodes{n}" / "results.json").read_text())["config"]
            assert video["action"]["episodes"] == n and not video["video"]["static"]
            assert control["action"]["steps"] == video["action"]["steps"]   # the same budget
    # all 4 demonstrations per task labelled: the base run itself, not a decoder trained again
    assert result["rows"]["4 per task: video model"] == json.loads((base / "results.json").read_text())
    assert not (tmp_path / "episodes4").exists()
    assert (tmp_path / "data.png").is_file()
    # another set of sizes reuses the control's run (its video model and its all-labelled decoder)
    mtime = (tmp_path / "static" / "action.safetensors").stat().st_mtime
    experiments.main(["data", "--base", str(base), "--out", str(tmp_path), "--labelled", "2"])
    assert list(json.loads((tmp_path / "data.json").read_text())["rows"]) == [
        f"{n} per task: {c}" for n in (2, 4) for c in ("video model", "static image")]
    assert (tmp_path / "static" / "action.safetensors").stat().st_mtime == mtime
    assert ((tmp_path / "static-episodes2" / "video.safetensors").read_bytes()
            == (tmp_path / "static" / "video.safetensors").read_bytes())
    # a finished point trained with other flags than asked now is refused, not silently reused
    with pytest.raises(SystemExit, match=r"static was trained with --action.tau_v 0.4, this experiment asks for 0.6"):
        experiments.main(["data", "--base", str(base), "--out", str(tmp_path), "--labelled", "2", "--tau_v", "0.6"])
    with pytest.raises(SystemExit, match=r"--labelled: each size must lie in 1..4"):
        experiments.main(["data", "--base", str(base), "--out", str(tmp_path), "--labelled", "2,5"])


def test_the_data_experiment_trains_the_full_data_point_anew_when_its_cache_is_not_the_bases(base, tmp_path):
    experiments.main(["data", "--base", str(base), "--out", str(tmp_path), "--labelled", "4", "--cache", "1"])
    video = json.loads((tmp_path / "episodes4" / "results.json").read_text())["config"]["action"]
    assert video["cache"] == 1 and video["episodes"] == 4


def test_the_layer_and_history_experiments_run_end_to_end(base, tmp_path):
    # the base's depth (2 blocks): its own video model, its own decoder for its k = 1, a new one for k = 0
    experiments.main(["layer", "--base", str(base), "--out", str(tmp_path), "--windows", "16"])   # --layers 0
    result = json.loads((tmp_path / "layer.json").read_text())
    assert list(result["rows"]) == ["k = 0 of 2 blocks", "k = 1 of 2 blocks"]
    assert result["rows"]["k = 1 of 2 blocks"] == json.loads((base / "results.json").read_text())
    assert json.loads((tmp_path / "layers2-k0" / "results.json").read_text())["config"]["action"]["k"] == 0
    assert ((tmp_path / "layers2-k0" / "video.safetensors").read_bytes()
            == (base / "video.safetensors").read_bytes()) and not (tmp_path / "layers2").exists()
    assert set(result["action_error"]) == set(result["rows"])
    assert result["action_error_of"] == "action error on its own prediction"
    # another depth: a video model of 3 blocks trained for it, a decoder on each block
    experiments.main(["layer", "--base", str(base), "--out", str(tmp_path), "--layers", "3", "--windows", "16"])
    rows = json.loads((tmp_path / "layer.json").read_text())["rows"]
    assert [r["config"]["action"]["k"] for r in rows.values()] == [0, 1, 2]
    assert all(r["config"]["video"]["layers"] == 3 for r in rows.values())
    experiments.main(["history", "--base", str(base), "--out", str(tmp_path), "--histories", "1,2"])
    rows = json.loads((tmp_path / "history.json").read_text())["rows"]
    assert list(rows) == ["H_o = 1 history frames", "H_o = 2 history frames"]
    assert json.loads((tmp_path / "history1" / "results.json").read_text())["config"]["history"] == 1
