"""evaluation.py: Wilson intervals, lockstep rollouts in any environment with the documented interface, GIFs."""
import numpy as np
import pytest

import evaluation
from test_world import CFG, play
from world import World

def test_wilson_interval_pinned_values():
    z2 = 1.96**2
    # at 0 and n successes the interval closes to [0, z^2 / (n + z^2)] and [n / (n + z^2), 1]
    np.testing.assert_allclose(evaluation.wilson_interval(0, 10), (0.0, z2 / (10 + z2)), rtol=1e-12)
    np.testing.assert_allclose(evaluation.wilson_interval(10, 10), (10 / (10 + z2), 1.0), rtol=1e-12)
    # 5 of 10, by hand: centre 1/2, half width 1.96 sqrt(0.025 + z^2 / 400) / (1 + z^2 / 10) = 0.263410
    np.testing.assert_allclose(evaluation.wilson_interval(5, 10), (0.236590, 0.763410), atol=1e-6)
    np.testing.assert_allclose(evaluation.wilson_interval(81, 100), (0.72221, 0.87485), atol=1e-5)


class Recorder:
    """A per-episode (act) policy that always moves right, recording what it is shown."""

    def __init__(self):
        self.seen = []

    def act(self, frames, instruction, proprio):
        self.seen.append((frames, instruction, proprio))
        return np.tile([1.0, 0.0, -1.0], (6, 1))


def test_rollout_shows_the_policy_strided_history_and_replans_every_r():
    policy, r = Recorder(), 3
    worlds = [World("push_blue")]
    result = evaluation.rollout(policy, worlds, [9], replan_every=r, history=3, history_stride=2)[0]
    assert result["steps"] == CFG.time_limit and not result["success"]
    assert len(policy.seen) == -(-CFG.time_limit // r)
    frames, _ = play("push_blue", 9, [[1.0, 0.0, -1.0]] * CFG.time_limit)
    for call, (shown, instruction, proprio) in enumerate(policy.seen):
        t = call * r
        idx = np.maximum([t - 4, t - 2, t], 0)                   # same padding as data.Windows
        np.testing.assert_array_equal(shown, frames[idx])
        assert instruction == "push the blue block to the left edge"
        assert proprio[2] == -1


def test_rollout_rejects_short_chunks():
    class Short:
        def act_batch(self, frames, instructions, proprio):
            return np.zeros((len(frames), 2, 3))
    with pytest.raises(ValueError, match=r"expected \(2, >= 4 \(replan_every\), action_dim\)"):
        evaluation.rollout(Short(), [World("pick_green"), World("place_red")], [0, 0], replan_every=4)


class Corridor:
    """Not the built-in world: a 1-D corridor behind the documented interface, 1-D actions, 2-D proprio and 4x4
    grey frames that show the position; success at position >= goal, truncated after 12 steps."""

    def __init__(self, task):
        self.goal = {"near": 3, "far": 30}[task]

    def reset(self, seed):
        self.x, self.t = seed % 2, 0
        return self._obs(), {"success": False}

    def step(self, action):
        assert np.shape(action) == (1,)
        self.x, self.t = self.x + float(action[0]), self.t + 1
        success = self.x >= self.goal
        return self._obs(), float(success), success, self.t >= 12 and not success, {"success": success}

    def _obs(self):
        frame = np.full((4, 4, 1), min(255, 10 * self.t), np.uint8)
        return {"frame": frame, "proprio": np.array([self.x, self.goal], np.float32), "instruction": "go right"}


class Forward:
    def act_batch(self, frames, instructions, proprio):
        assert frames.shape[1:] == (2, 4, 4, 1) and proprio.shape[1] == 2
        return np.ones((len(frames), 3, 1))


def test_any_environment_with_the_interface_is_evaluated(tmp_path):
    result = evaluation.evaluate(Forward(), Corridor, ["near", "far"], 4, seed_base=0, replan_every=2, history=2,
                                 gif_path=tmp_path / "corridor.gif")
    assert result.successes == {"near": 4, "far": 0} and result.episodes == {"near": 4, "far": 4}
    assert result.mean_steps == {"near": 2.5, "far": 12.0}         # seeds 0, 1, 2, 3 start at 0, 1, 0, 1
    assert result.to_json()["episodes"] == 8 and result.mean == 0.5
    assert (tmp_path / "corridor.gif").is_file()


def test_held_out_error_compares_sampled_chunks_with_the_recorded_ones(tmp_path):
    import data
    from encoders import TextEncoder
    from test_data import episode, write
    write(tmp_path / "ds", [episode(T, seed) for seed, T in enumerate([4, 6])])
    dataset = data.Dataset(tmp_path / "ds")
    spec = data.WindowSpec(history=1, horizon=2)
    windows = data.Windows(dataset, spec, TextEncoder(4, 8))
    norm = data.Normalizer(dataset.manifest["action_range"])

    class Replay:   # returns each window's recorded chunk, off by `shift` in normalised units
        text_encoder, action_norm = TextEncoder(4, 8), norm

        def __init__(self, shift):
            self.shift, self.calls = shift, 0

        def act_batch(self, frames, instructions, proprio):
            b = windows.batch(np.arange(self.calls, self.calls + len(frames)))
            self.calls += len(frames)
            return norm.inverse(norm(b["actions"]) + self.shift).numpy()

    assert evaluation.held_out_error(Replay(0.0), dataset, spec, [0, 1]) == pytest.approx(0.0, abs=1e-10)
    assert evaluation.held_out_error(Replay(0.5), dataset, spec, [0, 1]) == pytest.approx(0.25, rel=1e-5)
