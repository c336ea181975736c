"""expert.py: the scripted expert, the datasets made with it, the reference policies and the measurement CLI."""
from dataclasses import asdict

import numpy as np
from PIL import Image

import data
import expert
import world
from test_world import CFG, play, scene
from world import TASKS, TASK_SETS

# ----------------------------------------------------------------------------- the expert


def test_expert_succeeds_on_every_task():
    episodes = 30
    failures = {}
    for task in TASKS:
        ok = sum(expert.demonstrate(task, seed)[1] for seed in range(1000, 1000 + episodes))
        failures[task] = episodes - ok
    assert sum(failures.values()) <= 0.02 * episodes * len(TASKS), failures
    assert max(failures.values()) <= 2, failures


def test_expert_paths_vary_on_the_same_scene():
    runs = []
    for expert_seed in (11, 12):
        w, e = scene("place_red", seed=5), expert.Expert("place_red", expert_seed)
        actions = []
        while not w.done:
            actions.append(e.act(w))
            w.step(actions[-1])
        assert w.success()
        runs.append(np.array(actions))
    assert len(runs[0]) != len(runs[1]) or np.abs(runs[0] - runs[1]).max() > 0.1

# ----------------------------------------------------------------------------- datasets


def test_generated_dataset_is_reproducible_and_replays(tmp_path):
    tasks = ("pick_green", "push_blue")
    m1 = expert.generate_dataset(tmp_path / "a", tasks, episodes_per_task=3, seed=4, episodes_per_shard=4)
    expert.generate_dataset(tmp_path / "b", tasks, episodes_per_task=3, seed=4, episodes_per_shard=4)
    expert.generate_dataset(tmp_path / "c", tasks, episodes_per_task=3, seed=5, episodes_per_shard=4)
    for name in ["manifest.json"] + [s["file"] for s in m1["shards"]]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "manifest.json").read_bytes() != (tmp_path / "c" / "manifest.json").read_bytes()
    ds = data.Dataset(tmp_path / "a")
    assert ds.tasks == ["pick_green"] * 3 + ["push_blue"] * 3
    assert ds.manifest["source"]["config"] == asdict(CFG)
    for e in range(len(ds)):
        ep = ds.episode(e)
        assert ep.info["seed"] < world.EVAL_SEED_BASE
        frames, proprio = play(ep.task, ep.info["seed"], ep.actions)   # the stored actions replay the episode
        np.testing.assert_array_equal(frames, ep.frames)
        np.testing.assert_allclose(proprio, ep.proprio, atol=1e-6)
        assert ep.instruction == TASKS[ep.task].instruction

# ----------------------------------------------------------------------------- the reference policies


def test_evaluation_of_the_expert_random_and_instruction_blind(tmp_path):
    ceiling = world.evaluate(expert.ExpertPolicy(horizon=8), episodes_per_task=8, replan_every=5,
                             gif_path=tmp_path / "expert.gif")
    assert ceiling.mean >= 0.97, ceiling.summary()
    assert set(ceiling.episodes.values()) == {8}
    blind = world.evaluate(expert.ExpertPolicy(horizon=4, tasks=TASK_SETS["goal4"]), episodes_per_task=8)
    assert blind.mean <= 0.6, blind.summary()
    rand = world.evaluate(expert.RandomPolicy(), episodes_per_task=20)
    assert rand.mean <= 0.05, rand.summary()
    assert all(s == CFG.time_limit for s in rand.mean_steps.values())
    gif = Image.open(tmp_path / "expert.gif")
    assert gif.size == (4 * 8 * CFG.frame_size, 8 * CFG.frame_size + 14)
    assert gif.n_frames >= max(ceiling.mean_steps.values()) + 5


def test_measurement_cli_runs(tmp_path, capsys):
    expert.main(["--episodes", "2", "--data-episodes", "2", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "expert (2 episodes per task" in out and "dataset: 8 episodes" in out
    assert (tmp_path / "expert.gif").is_file() and Image.open(tmp_path / "frame.png").size == (256, 256)
