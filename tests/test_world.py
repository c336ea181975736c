"""The built-in world: determinism, mechanics, rendering, success checks (its expert: test_expert.py)."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import world
from world import TASKS, World, WorldConfig

CFG = WorldConfig()


def random_actions(n, seed):
    return np.random.default_rng(seed).uniform(-1, 1, (n, 3))


def play(task, seed, actions):
    w = World(task)
    obs, _ = w.reset(seed)
    frames, proprio = [obs["frame"]], [obs["proprio"]]
    for a in actions:
        if w.done:
            break
        obs, _, _, _, _ = w.step(a)
        frames.append(obs["frame"]), proprio.append(obs["proprio"])
    return np.stack(frames), np.stack(proprio)


def scene(task="place_red", seed=0):
    """A world reset to a scene, for hand-building states."""
    w = World(task)
    w.reset(seed)
    return w

# ----------------------------------------------------------------------------- determinism


def test_same_seed_same_episode():
    actions = random_actions(40, 1)
    f1, p1 = play("stack_blue_on_red", 7, actions)
    f2, p2 = play("stack_blue_on_red", 7, actions)
    np.testing.assert_array_equal(f1, f2)
    np.testing.assert_array_equal(p1, p2)
    f3, _ = play("stack_blue_on_red", 8, actions)
    assert not np.array_equal(f1[0], f3[0])


def test_scene_depends_on_seed_only_and_starts_unsolved():
    for seed in range(40):
        w = World("push_red")
        w.reset(seed)
        for i in range(3):   # each block can be pushed: closing right of it grasps no other block
            start = w.blocks[i] + [world.push_start(CFG), 0]
            assert np.linalg.norm(w.blocks - start, axis=1).min() > CFG.grasp_radius
        first = None
        for task in TASKS:
            w = World(task)
            obs, info = w.reset(seed)
            assert not info["success"], (task, seed)
            assert obs["instruction"] == TASKS[task].instruction
            if first is None:
                first = obs["frame"]
            np.testing.assert_array_equal(obs["frame"], first)


def test_observation_format():
    obs, info = World("push_blue").reset(3)
    assert obs["frame"].shape == (32, 32, 3) and obs["frame"].dtype == np.uint8
    assert obs["proprio"].dtype == np.float32 and obs["proprio"][2] == -1          # starts open
    assert info == {"success": False, "task": "push_blue", "t": 0}

# ----------------------------------------------------------------------------- mechanics


def test_closed_gripper_over_a_block_carries_it_and_puts_it_down():
    w = scene()
    w.gripper = w.blocks[0] + [0.05, -0.03]
    w.step([0, 0, 1])
    assert w.held == 0 and w.proprio()[2] == 1
    before = w.blocks[0].copy()
    w.step([1, -0.5, 1])
    np.testing.assert_allclose(w.blocks[0] - before, [CFG.max_step, -0.5 * CFG.max_step])
    w.step([0, 0, -1])
    assert w.held == -1 and w.z[0] == 0
    still = w.blocks[0].copy()
    w.step([1, 1, -1])
    np.testing.assert_array_equal(w.blocks[0], still)


def test_closing_away_from_blocks_grasps_nothing_and_shoves():
    w = scene()
    w.gripper = w.blocks[1] + [0.3, 0.04]                 # a little off the block's row
    w.step([0, 0, 1])
    assert w.held == -1 and w.closed
    start = w.blocks[1].copy()
    for _ in range(5):
        w.step([-1, 0, 1])
    # a square pusher: the block stays at contact distance ahead of it and moves straight, off-centre or not
    reach = CFG.block_half + CFG.pusher_half
    np.testing.assert_allclose(w.blocks[1], [w.gripper[0] - reach, start[1]], atol=1e-12)
    assert w.blocks[1][0] < start[0] - 0.2


def test_closing_beside_a_block_and_opening_leaves_it():
    w = scene()
    w.gripper = w.blocks[0] + [CFG.grasp_radius + 0.02, 0]   # overlapping the pusher, but too far to grasp
    blocks = w.blocks.copy()
    w.step([0, 0, 1])
    w.step([0, 0, -1])
    assert w.held == -1
    np.testing.assert_array_equal(w.blocks, blocks)


def test_an_open_gripper_passes_over_blocks():
    w = scene()
    w.gripper = w.blocks[2] + [0.3, 0.0]
    blocks = w.blocks.copy()
    for _ in range(6):
        w.step([-1, 0, -1])
    np.testing.assert_array_equal(w.blocks, blocks)


def test_release_on_a_block_stacks_and_draws_on_top():
    w = scene()
    w.gripper = w.blocks[2].copy()
    w.step([0, 0, 1])
    w.gripper = w.blocks[0] + [0.02, 0.0] - w.offset      # teleport the held block over the red one
    w.step([0, 0, 1])
    w.step([0, 0, -1])
    assert w.z[2] == 1 and w.z[0] == 0
    w.gripper = np.array([0.85, 0.85])                     # out of the way
    frame = w.render()
    col, row = ((w.blocks[2] * [1, -1] + 1) / 2 * CFG.frame_size).astype(int)
    np.testing.assert_array_equal(frame[row, col], world.BLOCK_RGB[2])


def test_actions_are_clipped_and_bad_actions_refused():
    w = scene()
    w.gripper = np.zeros(2)
    w.step([5, -7, 0])
    np.testing.assert_allclose(w.gripper, [CFG.max_step, -CFG.max_step])
    with pytest.raises(ValueError, match="3 finite numbers"):
        w.step([0, 0])
    with pytest.raises(ValueError, match="3 finite numbers"):
        w.step([np.nan, 0, 0])
    with pytest.raises(ValueError, match="unknown task 'fly'"):
        World("fly")


def test_time_limit_truncates_and_the_episode_then_refuses_steps():
    w = scene()
    for t in range(CFG.time_limit):
        _, reward, terminated, truncated, _ = w.step([0, 0, -1])
    assert truncated and not terminated and reward == 0
    with pytest.raises(RuntimeError, match="reset"):
        w.step([0, 0, -1])


@settings(max_examples=25)
@given(st.integers(0, 10**6), st.lists(st.tuples(*[st.floats(-3, 3)] * 3), min_size=1, max_size=30))
def test_state_stays_on_the_table(seed, actions):
    w = World("stack_red_on_green")
    w.reset(seed)
    for a in actions:
        if w.done:
            break
        w.step(a)
        assert np.abs(w.gripper).max() <= w.cfg.gripper_limit
        assert np.abs(w.blocks).max() <= w.cfg.block_limit + 1e-12
        if w.held >= 0:
            np.testing.assert_allclose(w.blocks[w.held],
                                       np.clip(w.gripper + w.offset, -w.cfg.block_limit, w.cfg.block_limit))

# ----------------------------------------------------------------------------- rendering


def pixel(xy):
    col, row = ((np.asarray(xy) * [1, -1] + 1) / 2 * CFG.frame_size).astype(int)
    return row, col


def test_each_object_shows_its_colour_and_the_gripper_its_state():
    w = scene(seed=4)
    w.gripper = np.array([0.85, -0.85])          # a corner away from the objects of this scene
    frame = w.render()
    for i in range(3):
        np.testing.assert_array_equal(frame[pixel(w.blocks[i])], world.BLOCK_RGB[i])
    np.testing.assert_array_equal(frame[pixel(w.pad)], world.PAD_RGB)
    open_centre = frame[pixel(w.gripper)]
    np.testing.assert_array_equal(open_centre, world.TABLE_RGB)          # hollow when open
    w.closed = True
    np.testing.assert_array_equal(w.render()[pixel(w.gripper)], world.GRIPPER_RGB)   # solid when closed

# ----------------------------------------------------------------------------- success checks


def test_success_checks_on_hand_built_states():
    w = scene("pick_green")
    assert not w.success()
    w.held = 1
    assert w.success()
    w.held = 0
    assert not w.success()

    w = scene("place_red")
    w.blocks[0] = w.pad + [CFG.pad_half - 0.01, -CFG.pad_half + 0.01]
    assert w.success()
    w.held = 0                                  # still in the hand: not placed
    assert not w.success()
    w.held = -1
    w.blocks[0] = w.pad + [CFG.pad_half + 0.01, 0]
    assert not w.success()

    w = scene("push_blue")
    w.blocks[2, 0] = CFG.edge_x
    assert w.success()
    w.blocks[2, 0] = CFG.edge_x + 0.01
    assert not w.success()

    w = scene("stack_blue_on_red")
    w.blocks[2] = w.blocks[0] + [0.1, -0.1]
    w.z[2] = 1
    assert w.success()
    w.z[2] = 0                                  # side by side on the table, not on top
    assert not w.success()
    w.z[2] = 1
    w.blocks[2] = w.blocks[0] + [CFG.block_half + 0.01, 0]
    assert not w.success()
