"""The built-in world's scripted expert, the demonstrations every dataset of the world is made of, and the policies
a learned one is measured against: the expert behind the chunking-policy interface (the ceiling), the same expert
ignoring the instruction (what a competent but instruction-blind policy gets), random actions (the floor).

    python expert.py          # success of the three reference policies per task, dataset generation time and size

Not here: the world itself (world.py), the dataset format (data.py), the evaluation harness (evaluation.py).
"""
import argparse
import copy
import tempfile
import time
import zlib
from dataclasses import asdict
from pathlib import Path

import numpy as np
from PIL import Image

import data
from world import EVAL_SEED_BASE, TASK_SETS, TASKS, World, WorldConfig, evaluate, push_start

# ----------------------------------------------------------------------------- the scripted expert


class Expert:
    """A privileged scripted policy: it reads the world's state, not its frames.

    Demonstrations vary: each episode draws a speed, where on the pad (or the lower block) to put the block down,
    and, for every leg of the motion, possibly a via-point off the straight line; far from a target the motion gets
    a little noise. Near a target it is exact, so it grasps and places precisely.
    """
    SPEED = (0.7, 1.0)    # range of the per-episode speed, in action units
    VIA_PROB = 0.7        # chance that a leg longer than 0.4 bends through a via-point
    VIA_SPREAD = 0.3      # sideways offset of the via-point: std, in units of the leg's length
    NOISE = 0.15          # std of the action noise more than 3 steps from a target

    def __init__(self, task, seed, config=WorldConfig()):
        self.task, self.cfg = TASKS[task], config
        self.rng = np.random.default_rng([seed, zlib.crc32(task.encode())])
        self.speed = self.rng.uniform(*self.SPEED)
        self.place_offset = self.rng.uniform(-0.5, 0.5, 2) * config.pad_half
        self.stack_offset = self.rng.uniform(-0.4, 0.4, 2) * config.block_half
        self.leg, self.via = None, None

    def act(self, world):
        task, cfg = self.task, self.cfg
        b = world.blocks[task.block]
        if world.held not in (-1, task.block):
            return self._gripper(-1.0)                        # holding the wrong block: put it down
        if world.held == task.block:
            if task.family == "pick":
                return self._gripper(1.0)                     # done: hold on
            if task.family == "push":
                return self._gripper(-1.0)                    # pushing, not carrying
            dest = (world.pad + self.place_offset if task.family == "place"
                    else world.blocks[task.other] + self.stack_offset)
            return self._go(world, "carry", dest - world.offset)
        if task.family == "push":
            g = world.gripper
            if world.closed and g[0] > b[0] + 0.1 and abs(g[1] - b[1]) < 0.1:
                # lined up behind the block: shove it left, steering onto its row
                return np.array([-self.speed, np.clip((b[1] - g[1]) / cfg.max_step, -0.5, 0.5), 1.0])
            if world.closed:
                return self._gripper(-1.0)                    # lost contact: lift, and go round again
            return self._go(world, "behind", b + [push_start(cfg), 0.0])
        if world.closed:
            return self._gripper(-1.0)                        # closed on nothing: open before reaching
        return self._go(world, "reach", b)

    @staticmethod
    def _gripper(command):
        return np.array([0.0, 0.0, command])

    def _go(self, world, leg, target):
        """Move towards `target` keeping the gripper as it is; once there, flip it (grasp, or put down)."""
        cfg, p = self.cfg, world.gripper
        target = np.clip(target, -cfg.gripper_limit, cfg.gripper_limit)
        grip = 1.0 if world.closed else -1.0
        if leg != self.leg:
            self.leg, self.via = leg, self._via_point(p, target)
        if self.via is not None and np.linalg.norm(self.via - p) < self.speed * cfg.max_step:
            self.via = None
        delta = ((target if self.via is None else self.via) - p) / cfg.max_step   # in action units
        dist = np.linalg.norm(delta)
        if dist < 1e-6:
            return self._gripper(-grip)
        move = delta * min(1.0, self.speed / dist)
        if dist > 3:                                          # far from the target: a little noise
            move = move + self.rng.normal(0, self.NOISE, 2)
        return np.array([*np.clip(move, -1, 1), grip])

    def _via_point(self, start, target):
        """Sometimes (VIA_PROB), a point between start and target, off the straight line."""
        dist = np.linalg.norm(target - start)
        if dist < 0.4 or self.rng.random() >= self.VIA_PROB:
            return None
        along = (target - start) / dist
        normal = np.array([-along[1], along[0]])
        via = start + along * dist * self.rng.uniform(0.3, 0.7) + normal * dist * self.rng.normal(0, self.VIA_SPREAD)
        return np.clip(via, -0.85, 0.85)

# ----------------------------------------------------------------------------- demonstrations and datasets

DESCRIPTION = ("built-in tabletop world (world.py). frames: top-down RGB of the table [-1, 1]^2. proprio: gripper "
               "x, y in table units, gripper state +1 closed / -1 open. action: dx, dy in units of max_step, the "
               "gripper's target relative to its current position (p' = p + max_step * clip(a, -1, 1)), then a "
               "gripper command (> 0 close, <= 0 open).")


def demonstrate(task, seed, config=WorldConfig()):
    """One expert episode on the scene `seed`: (data.Episode, whether it succeeded)."""
    world, expert = World(task, config), Expert(task, seed, config)
    obs, info = world.reset(seed)
    frames, proprio, actions = [obs["frame"]], [obs["proprio"]], []
    while not world.done:
        a = np.clip(expert.act(world), -1, 1)
        obs, _, _, _, info = world.step(a)
        frames.append(obs["frame"]), proprio.append(obs["proprio"]), actions.append(a)
    episode = data.Episode(np.stack(frames), np.stack(proprio), np.array(actions, dtype=np.float32),
                           world.task.instruction, task, {"seed": int(seed)})
    return episode, info["success"]


# the manifest's source.generator of the built-in world's datasets; "world.generate_dataset" before expert.py existed
GENERATOR, FORMER_GENERATORS = "expert.generate_dataset", ("world.generate_dataset",)


def generate_dataset(root, tasks=TASK_SETS["goal4"], episodes_per_task=100, seed=0, config=WorldConfig(),
                     episodes_per_shard=100):
    """Write `episodes_per_task` successful expert demonstrations of each task to `root` (data.py's format).

    Every episode has its own scene (seeds drawn from `seed`, all below EVAL_SEED_BASE, so never an evaluation
    scene): a policy has to generalise to new tables, and distinct tables teach it more than the same tables shown
    under several instructions. The rare scene the expert fails on is skipped. Same arguments, same bytes.
    """
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; known tasks: {', '.join(TASKS)}")
    rng = np.random.default_rng(seed)

    def episodes():
        for task in tasks:
            kept = 0
            for scene in rng.integers(0, EVAL_SEED_BASE, size=2 * episodes_per_task + 10):
                if kept == episodes_per_task:
                    break
                episode, success = demonstrate(task, int(scene), config)
                if success:
                    kept += 1
                    yield episode
            if kept < episodes_per_task:
                raise RuntimeError(f"the expert failed {task} on too many scenes ({kept} successes)")

    return data.write_dataset(
        root, episodes(), control_hz=config.control_hz, proprio_range=[[-1, 1]] * 3, action_range=[[-1, 1]] * 3,
        action_pad=["zero", "zero", "hold"], description=DESCRIPTION, episodes_per_shard=episodes_per_shard,
        source={"generator": GENERATOR, "tasks": list(tasks), "episodes_per_task": episodes_per_task,
                "seed": seed, "config": asdict(config)})

# ----------------------------------------------------------------------------- policies for reference


class RandomPolicy:
    """Uniformly random actions: the floor a learned policy has to beat."""

    def __init__(self, horizon=16, seed=0):
        self.horizon, self.rng = horizon, np.random.default_rng(seed)

    def act_batch(self, frames, instructions, proprio):
        return self.rng.uniform(-1, 1, (len(frames), self.horizon, 3))


class ExpertPolicy:
    """The scripted expert behind the chunking policy interface: the ceiling, and a check of the evaluation loop.

    It is privileged: `rollout` hands it the worlds it runs (bind), its rows are their unfinished episodes in order,
    and it plans each chunk by running the expert on a copy of the world. It keeps the expert as it was after each
    planned step, so that however many of the chunk's actions were executed, the next plan continues from there.
    After each call, `ahead` (N, horizon, H, W, C) holds the frames the copies rendered after each planned action
    (past the end of an episode, its last frame): the future the expert would make, the oracle's plan.

    With `tasks` it is instruction-blind: each episode follows the expert of a task drawn from `tasks` (by its
    scene seed) instead of its own, a competent policy that ignores the instruction.
    """

    def __init__(self, horizon=16, tasks=None):
        self.horizon, self.tasks = horizon, tasks

    def bind(self, worlds):
        self.worlds = worlds
        self.plans = {}    # world index -> (step the plan started at, the expert after 0, 1, ... of its actions)

    def _expert(self, world):
        task = world.task_name
        if self.tasks:
            task = self.tasks[np.random.default_rng([world.seed, 1]).integers(len(self.tasks))]
        return Expert(task, world.seed, world.cfg)

    def act_batch(self, frames, instructions, proprio):
        chunks, self.ahead = [], []
        for i, world in enumerate(self.worlds):
            if world.done:
                continue
            if world.t == 0:
                self.plans[i] = (0, [self._expert(world)])
            start, experts = self.plans[i]
            sim, expert = copy.deepcopy(world), copy.deepcopy(experts[world.t - start])
            actions, experts, rendered = [], [copy.deepcopy(expert)], []
            for _ in range(self.horizon):
                a = np.clip(expert.act(sim), -1, 1) if not sim.done else np.array([0, 0, actions[-1][2]])
                if not sim.done:
                    sim.step(a)
                actions.append(a), experts.append(copy.deepcopy(expert)), rendered.append(sim.render())
            self.plans[i] = (world.t, experts)
            chunks.append(actions), self.ahead.append(rendered)
        self.ahead = np.array(self.ahead)
        return np.array(chunks)

# ----------------------------------------------------------------------------- measuring the world


def main(argv=None):
    p = argparse.ArgumentParser(description="Measure the built-in world: success of the expert, of an "
                                "instruction-blind expert and of random actions per task; dataset generation time "
                                "and size; writes a GIF of the expert and a frame.")
    p.add_argument("--tasks", default="goal4", choices=TASK_SETS, help="task set")
    p.add_argument("--episodes", type=int, default=100, help="held-out episodes per task")
    p.add_argument("--data-episodes", type=int, default=100, help="demonstrations per task in the timed dataset")
    p.add_argument("--out", default="out/world", help="where the GIF and the frame go")
    args = p.parse_args(argv)
    tasks, out = TASK_SETS[args.tasks], Path(args.out)
    policies = {"expert": ExpertPolicy(), "instruction-blind expert": ExpertPolicy(tasks=tasks),
                "random actions": RandomPolicy()}
    for name, policy in policies.items():
        start = time.perf_counter()
        gif = out / "expert.gif" if name == "expert" else None
        result = evaluate(policy, tasks, args.episodes, gif_path=gif)
        print(f"{name} ({args.episodes} episodes per task, {time.perf_counter() - start:.1f} s):")
        print(result.summary())
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        manifest = generate_dataset(Path(tmp) / "data", tasks, args.data_episodes)
        seconds = time.perf_counter() - start
        size = sum(s["bytes"] for s in manifest["shards"])
        steps = sum(ep["length"] for ep in manifest["episodes"])
        print(f"dataset: {len(manifest['episodes'])} episodes, {steps} steps, {size / 1e6:.1f} MB in "
              f"{len(manifest['shards'])} shards, generated in {seconds:.1f} s")
    world = World(tasks[-1])
    world.reset(EVAL_SEED_BASE)
    Image.fromarray(world.render()).resize((256, 256), Image.NEAREST).save(out / "frame.png")
    print(f"wrote {out / 'expert.gif'} and {out / 'frame.png'}")


if __name__ == "__main__":
    main()
