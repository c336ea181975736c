"""The built-in tabletop world: a 2-D top-down table, a gripper, three blocks and a pad, four families of language
goals, a scripted expert, dataset generation and closed-loop evaluation. Pure numpy; deterministic given a seed.

It plays the part of LIBERO-Goal at a size a 2-core CPU can learn in minutes: every episode draws the same kind of
scene, and only the instruction says what to do with it, so a policy that ignores the instruction fails most tasks.

Geometry. The table is [-1, 1]^2, x to the right, y up; a frame of S pixels maps x = -1 to column 0 and y = +1 to
row 0. Blocks are squares of side 2 * block_half; the yellow pad a square of side 2 * pad_half.

Mechanics, one control step with action a = (dx, dy, g):
    p <- clip(p + max_step * clip((dx, dy), -1, 1))          the gripper moves towards its relative target
    a held block moves with p (rigidly, at its grasp offset); it is lifted, so it touches nothing
    a closed, empty gripper is lowered onto the table, a square pusher: moving, it shoves every block it overlaps
        out of contact (a gripper that closes beside a block and opens again on the spot leaves it where it is)
    g > 0 while open closes it: it grasps the topmost block within grasp_radius of p, if any
    g <= 0 while closed opens it: the held block is put down, on top of any block it overlaps (stacking)

Observations: {"frame": (S, S, 3) uint8, "proprio": (x, y, +1 closed / -1 open) float32, "instruction": str}.
Proprio and actions both live in [-1, 1]: a model needs no further normalisation.
"""
import argparse
import copy
import math
import tempfile
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

import data

# ----------------------------------------------------------------------------- configuration

COLORS = ("red", "green", "blue")
BLOCK_RGB = np.array([[230, 40, 40], [40, 200, 60], [50, 100, 255]], dtype=np.float32)
PAD_RGB = np.array([235, 205, 40], dtype=np.float32)
TABLE_RGB = np.array([70, 70, 70], dtype=np.float32)
GRIPPER_RGB = np.array([255, 255, 255], dtype=np.float32)
OPEN_GRIPPER = (0.19, 0.125)    # outer and inner half side of the hollow square drawn for an open gripper

EVAL_SEED_BASE = 2**31   # evaluation scenes use seeds from here on; generated datasets draw theirs below it


@dataclass(frozen=True)
class WorldConfig:
    frame_size: int = 32          # pixels per side of the rendered frame
    max_step: float = 0.1         # table units moved per control step at |dx| = 1 (1.6 px at 32 px)
    time_limit: int = 60          # control steps before truncation, about 2x the expert's typical episode
    control_hz: float = 10.0      # nominal rate, recorded in datasets
    block_half: float = 0.125     # blocks are 0.25 wide: 4 px at 32 px
    pad_half: float = 0.25
    grasp_radius: float = 0.15    # closing within this distance of a block's centre (about over it) grasps it
    pusher_half: float = 0.1      # a closed gripper is a square pusher of this half side (and is drawn so)
    edge_x: float = -0.7          # "the left edge": a block centre at x <= edge_x
    gripper_limit: float = 0.9    # the gripper's centre stays within [-0.9, 0.9]^2, so it stays in view

    @property
    def block_limit(self):
        return 1 - self.block_half

# ----------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class Task:
    family: str        # "pick" | "place" | "push" | "stack"
    block: int         # index into COLORS of the block the instruction names first
    other: int = -1    # "stack": the block to put it on
    instruction: str = ""


def _make_tasks():
    tasks = {}
    for b, c in enumerate(COLORS):
        tasks[f"pick_{c}"] = Task("pick", b, instruction=f"pick up the {c} block")
        tasks[f"place_{c}"] = Task("place", b, instruction=f"put the {c} block on the yellow pad")
        tasks[f"push_{c}"] = Task("push", b, instruction=f"push the {c} block to the left edge")
        for o, c2 in enumerate(COLORS):
            if o != b:
                tasks[f"stack_{c}_on_{c2}"] = Task("stack", b, o, f"stack the {c} block on the {c2} block")
    return tasks


TASKS = _make_tasks()
# Named task sets. goal4, the default, has one task per family, and no task's goal is reached on the way to
# another's (picking up the green block is no step of placing red or stacking blue), so a competent policy that
# ignores the instruction succeeds about one time in four.
TASK_SETS = {
    "goal4": ("pick_green", "place_red", "push_blue", "stack_blue_on_red"),
    "all": tuple(TASKS),
}

# ----------------------------------------------------------------------------- the simulator


class World:
    """One episode at a time of one task; Gymnasium-style reset / step."""

    def __init__(self, task, config=WorldConfig()):
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")
        self.task_name, self.task, self.cfg = task, TASKS[task], config
        self.done = True

    def reset(self, seed):
        """A fresh scene drawn from `seed` alone: the same seed gives the same scene under every task."""
        rng = np.random.default_rng(seed)
        self.seed, self.t, self.done = seed, 0, False
        self.pad, self.blocks = _sample_scene(rng, self.cfg)
        self.gripper = rng.uniform(-0.8, 0.8, 2)
        self.closed = False
        self.held = -1                            # index of the held block, -1 for none
        self.offset = np.zeros(2)                 # held block centre - gripper, fixed at the grasp
        self.z = np.zeros(len(COLORS), int)       # stacking height; also the drawing order
        return self._obs(), self._info()

    def step(self, action):
        if self.done:
            raise RuntimeError("the episode is over: call reset(seed) first")
        a = np.asarray(action, dtype=np.float64)
        if a.shape != (3,) or not np.isfinite(a).all():
            raise ValueError(f"action must be 3 finite numbers (dx, dy, gripper), got {action!r}")
        a = np.clip(a, -1, 1)
        cfg = self.cfg
        self.gripper = np.clip(self.gripper + cfg.max_step * a[:2], -cfg.gripper_limit, cfg.gripper_limit)
        if self.held >= 0:
            self.blocks[self.held] = np.clip(self.gripper + self.offset, -cfg.block_limit, cfg.block_limit)
        elif self.closed and a[:2].any():
            self._shove(a[:2])
        close = a[2] > 0
        if close and not self.closed:
            self._grasp()
        elif not close and self.closed:
            self._release()
        self.closed = close
        self.t += 1
        success = self.success()
        truncated = not success and self.t >= cfg.time_limit
        self.done = success or truncated
        return self._obs(), float(success), success, truncated, self._info()

    def success(self):
        """The task's goal, checked on the current state."""
        task, cfg = self.task, self.cfg
        b = self.blocks[task.block]
        if task.family == "pick":
            return self.held == task.block
        if self.held == task.block:          # the other goals need the block put down
            return False
        if task.family == "place":
            return bool(np.abs(b - self.pad).max() <= cfg.pad_half)
        if task.family == "push":
            return bool(b[0] <= cfg.edge_x)
        # stack: within half a block of the other block's centre, and on top of it
        o = self.blocks[task.other]
        return bool(np.abs(b - o).max() <= cfg.block_half and self.z[task.block] > self.z[task.other])

    def proprio(self):
        return np.array([*self.gripper, 1.0 if self.closed else -1.0], dtype=np.float32)

    def render(self):
        return render(self)

    def _shove(self, motion):
        """Square pusher against square blocks: an overlapped block is pushed out along the axis it overlaps
        least (the shortest way out), so a block pushed flat-on moves straight, even if a little off-centre."""
        reach = self.cfg.block_half + self.cfg.pusher_half
        for i, b in enumerate(self.blocks):
            d = b - self.gripper
            overlap = reach - np.abs(d)
            if (overlap > 0).all():
                axis = int(np.argmin(overlap))
                side = np.sign(d[axis]) if d[axis] != 0 else np.sign(motion[axis])
                self.blocks[i, axis] = np.clip(self.gripper[axis] + side * reach, -self.cfg.block_limit,
                                               self.cfg.block_limit)

    def _grasp(self):
        dist = np.linalg.norm(self.blocks - self.gripper, axis=1)
        near = np.flatnonzero(dist <= self.cfg.grasp_radius)
        if len(near):
            self.held = min(near, key=lambda i: (-self.z[i], dist[i]))   # topmost, then nearest
            self.offset = self.blocks[self.held] - self.gripper

    def _release(self):
        if self.held < 0:
            return
        i = self.held
        under = [j for j in range(len(COLORS))
                 if j != i and np.abs(self.blocks[j] - self.blocks[i]).max() < 2 * self.cfg.block_half]
        self.z[i] = 1 + max(self.z[j] for j in under) if under else 0
        self.held = -1

    def _obs(self):
        return {"frame": self.render(), "proprio": self.proprio(), "instruction": self.task.instruction}

    def _info(self):
        return {"success": self.success(), "task": self.task_name, "t": self.t}


def _sample_scene(rng, cfg):
    """Pad and block centres, redrawn until the blocks are apart, none is on the pad, and no task is solved at
    the start: blocks start right of x = -0.35 (so "push to the left edge" has a way to go) and left of x = 0.6,
    and no block lies where another is pushed from (just right of it), so each one can be pushed."""
    while True:
        pad = rng.uniform(-0.7, 0.7, 2)
        blocks = np.stack([rng.uniform(-0.35, 0.6, len(COLORS)), rng.uniform(-0.75, 0.75, len(COLORS))], axis=1)
        pairs = [(i, j) for i in range(len(COLORS)) for j in range(len(COLORS)) if i != j]
        apart = min(np.abs(blocks[i] - blocks[j]).max() for i, j in pairs)
        behind = min(np.linalg.norm(blocks[i] + [push_start(cfg), 0] - blocks[j]) for i, j in pairs)
        off_pad = np.abs(blocks - pad).max(axis=1).min()
        if apart >= 0.4 and behind > cfg.grasp_radius + 0.05 and off_pad >= cfg.pad_half + cfg.block_half + 0.05:
            return pad, blocks


def push_start(cfg):
    """How far right of a block the gripper closes to push it left: just out of contact."""
    return cfg.block_half + cfg.pusher_half + 0.05

# ----------------------------------------------------------------------------- rendering


def _coverage(lo, hi, px):
    """How much of each unit pixel in `px` the interval [lo, hi] covers: anti-aliasing, so that sub-pixel
    positions stay visible."""
    return np.clip(np.minimum(hi, px + 1) - np.maximum(lo, px), 0, 1)


def _pixels(center, half, size):
    """(row, col, half side) of a square given in table units, in pixels, and the slices of its bounding box."""
    row, col, h = (1 - center[1]) / 2 * size, (center[0] + 1) / 2 * size, half / 2 * size
    box = tuple(slice(max(int(c - h), 0), min(math.ceil(c + h), size)) for c in (row, col))
    return row, col, h, box


def _square(row, col, h, box):
    """Coverage of the square centred at (row, col) with half side h over the pixels of `box`."""
    rows, cols = (np.arange(s.start, s.stop) for s in box)
    return np.outer(_coverage(row - h, row + h, rows), _coverage(col - h, col + h, cols))


def render(world):
    """The RGB frame: grey table, yellow pad, blocks by height (a held block drawn 25% larger: lifted), then the
    gripper, a white hollow square when open and a small solid white square when closed."""
    cfg, s = world.cfg, world.cfg.frame_size
    img = np.empty((s, s, 3), np.float32)
    img[:] = TABLE_RGB

    def paint(box, alpha, rgb):
        img[box] += alpha[..., None] * (rgb - img[box])

    def square(center, half, rgb):
        row, col, h, box = _pixels(center, half, s)
        paint(box, _square(row, col, h, box), rgb)

    square(world.pad, cfg.pad_half, PAD_RGB)
    height = world.z + 100 * (np.arange(len(COLORS)) == world.held)
    for i in np.argsort(height, kind="stable"):
        square(world.blocks[i], cfg.block_half * (1.25 if i == world.held else 1), BLOCK_RGB[i])
    if world.closed:
        square(world.gripper, cfg.pusher_half, GRIPPER_RGB)
    else:
        outer, inner = OPEN_GRIPPER
        row, col, h, box = _pixels(world.gripper, outer, s)
        paint(box, _square(row, col, h, box) - _square(row, col, h * inner / outer, box), GRIPPER_RGB)
    return np.round(img).astype(np.uint8)


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
        source={"generator": "world.generate_dataset", "tasks": list(tasks), "episodes_per_task": episodes_per_task,
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
        chunks = []
        for i, world in enumerate(self.worlds):
            if world.done:
                continue
            if world.t == 0:
                self.plans[i] = (0, [self._expert(world)])
            start, experts = self.plans[i]
            sim, expert = copy.deepcopy(world), copy.deepcopy(experts[world.t - start])
            actions, experts = [], [copy.deepcopy(expert)]
            for _ in range(self.horizon):
                a = np.clip(expert.act(sim), -1, 1) if not sim.done else np.array([0, 0, actions[-1][2]])
                if not sim.done:
                    sim.step(a)
                actions.append(a), experts.append(copy.deepcopy(expert))
            self.plans[i] = (world.t, experts)
            chunks.append(actions)
        return np.array(chunks)

# ----------------------------------------------------------------------------- closed-loop evaluation


def rollout(policy, worlds, seeds, replan_every=4, history=1, history_stride=1, record=()):
    """One episode in each world, all in lockstep: every `replan_every` steps the policy plans a chunk for all
    unfinished episodes at once, and each executes its chunk's first `replan_every` actions.

    The policy offers act_batch(frames (N, H_o, S, S, 3) uint8, instructions [N], proprio (N, 3)) -> (N, >= r, 3),
    or else act(frames (H_o, S, S, 3), instruction, proprio (3,)) -> (>= r, 3); the H_o frames are the last ones
    with stride history_stride, padded at the start as data.Windows pads them.
    A privileged policy (ExpertPolicy) is first handed the worlds through its bind(worlds).
    Returns per world {"success", "steps"}, plus, for the worlds listed in `record`, "frames", "plans" (for each
    step, the proprio and the rest of the chunk in force) and "contexts" (the history frames of each replan).
    """
    if hasattr(policy, "bind"):
        policy.bind(worlds)
    results = []
    for world, seed in zip(worlds, seeds):
        obs, _ = world.reset(seed)
        results.append({"success": False, "steps": 0, "frames": [obs["frame"]], "proprio": obs["proprio"],
                        "plans": [], "contexts": []})
    while not all(w.done for w in worlds):
        active = [i for i, w in enumerate(worlds) if not w.done]
        frames = np.stack([np.stack([results[i]["frames"][j] for j in
                                     data.history_indices(worlds[i].t, history, history_stride)]) for i in active])
        proprio = np.stack([results[i]["proprio"] for i in active])
        instructions = [worlds[i].task.instruction for i in active]
        chunks = _plan(policy, frames, instructions, proprio)
        if chunks.ndim != 3 or chunks.shape[0] != len(active) or chunks.shape[1] < replan_every or chunks.shape[2] != 3:
            raise ValueError(f"the policy returned chunks of shape {chunks.shape}; expected ({len(active)}, "
                             f">= {replan_every} (replan_every), 3)")
        for n, (i, chunk) in enumerate(zip(active, chunks)):
            r = results[i]
            if i in record:
                r["contexts"].append(frames[n])
            for k, a in enumerate(chunk[:replan_every]):
                if i in record:
                    r["plans"].append((r["proprio"], chunk[k:]))
                obs, _, _, _, info = worlds[i].step(a)
                r["frames"].append(obs["frame"])
                r["proprio"], r["success"], r["steps"] = obs["proprio"], info["success"], worlds[i].t
                if worlds[i].done:
                    break
    for i, r in enumerate(results):
        if i not in record:
            del r["frames"], r["plans"], r["contexts"]
        del r["proprio"]
    return results


def _plan(policy, frames, instructions, proprio):
    if hasattr(policy, "act_batch"):
        return np.asarray(policy.act_batch(frames, instructions, proprio), dtype=np.float64)
    return np.stack([np.asarray(policy.act(f, s, p), dtype=np.float64)
                     for f, s, p in zip(frames, instructions, proprio)])


def wilson_interval(successes, n, z=1.96):
    """The Wilson score interval of a success rate (95% for z = 1.96): unlike p +- z sqrt(p (1 - p) / n) it stays
    inside [0, 1] and is not empty at 0 or n successes.

        center = (p + z^2 / 2n) / (1 + z^2 / n),   half = z sqrt(p (1 - p) / n + z^2 / 4n^2) / (1 + z^2 / n)
    """
    if n == 0:
        return 0.0, 1.0
    p, zz = successes / n, z * z
    center = (p + zz / (2 * n)) / (1 + zz / n)
    half = z * math.sqrt(p * (1 - p) / n + zz / (4 * n * n)) / (1 + zz / n)
    return max(0.0, center - half), min(1.0, center + half)


@dataclass
class EvalResult:
    successes: dict    # task -> successful episodes
    episodes: dict     # task -> episodes run
    mean_steps: dict   # task -> mean episode length (control steps)

    @property
    def mean(self):
        """Success over all episodes; with equal episodes per task, the mean of the per-task rates."""
        return sum(self.successes.values()) / sum(self.episodes.values())

    @property
    def interval(self):
        return wilson_interval(sum(self.successes.values()), sum(self.episodes.values()))

    def summary(self):
        lines = []
        for task, n in self.episodes.items():
            k = self.successes[task]
            lo, hi = wilson_interval(k, n)
            lines.append(f"{task:22s} {k:4d}/{n:<4d} = {k / n:6.1%}  95% CI [{lo:.1%}, {hi:.1%}]  "
                         f"mean length {self.mean_steps[task]:.1f}")
        lo, hi = self.interval
        lines.append(f"{'mean':22s} {sum(self.successes.values()):4d}/{sum(self.episodes.values()):<4d} = "
                     f"{self.mean:6.1%}  95% CI [{lo:.1%}, {hi:.1%}]")
        return "\n".join(lines)

    def to_json(self):
        return {"mean": self.mean, "interval": list(self.interval),
                "tasks": {t: {"successes": self.successes[t], "episodes": n, "rate": self.successes[t] / n,
                              "interval": list(wilson_interval(self.successes[t], n)),
                              "mean_steps": self.mean_steps[t]} for t, n in self.episodes.items()}}


def evaluate(policy, tasks=TASK_SETS["goal4"], episodes_per_task=25, *, replan_every=4, history=1,
             history_stride=1, config=WorldConfig(), seed_base=EVAL_SEED_BASE, gif_path=None, gif_tasks=4,
             imagine=None):
    """Closed-loop success of `policy` on `episodes_per_task` held-out scenes (seeds seed_base, seed_base + 1, ...;
    generated datasets never use seeds >= EVAL_SEED_BASE), all episodes of all tasks run in one lockstep batch.
    Optionally writes a GIF of the first episode of each of the first `gif_tasks` tasks; with
    imagine(frames (N, H_o, S, S, 3), instructions) -> future frames (N, F, S, S, 3), each replan's imagined future
    is shown under its episode (a video model's "visual plan")."""
    names = [t for t in tasks for _ in range(episodes_per_task)]
    worlds = [World(t, config) for t in names]
    seeds = [seed_base + j for _ in tasks for j in range(episodes_per_task)]
    record = [k * episodes_per_task for k in range(min(gif_tasks, len(tasks)))] if gif_path else []
    results = rollout(policy, worlds, seeds, replan_every, history, history_stride, record)
    if gif_path:
        episodes = [dict(results[i], instruction=worlds[i].task.instruction) for i in record]
        if imagine is not None:
            for ep in episodes:
                ep["imagined"] = imagine(np.stack(ep["contexts"]), [ep["instruction"]] * len(ep["contexts"]))
        save_gif(gif_path, episodes, config, replan_every=replan_every)
    by_task = {t: [r for n, r in zip(names, results) if n == t] for t in tasks}
    return EvalResult({t: int(sum(r["success"] for r in rs)) for t, rs in by_task.items()},
                      {t: len(rs) for t, rs in by_task.items()},
                      {t: float(np.mean([r["steps"] for r in rs])) for t, rs in by_task.items()})

# ----------------------------------------------------------------------------- GIFs


def save_gif(path, episodes, config=WorldConfig(), scale=8, ms_per_step=120, replan_every=4):
    """Episodes side by side, frames scaled up, the plan in force drawn over them: the gripper's planned path
    (cyan where the chunk keeps it open, magenta where closed); a green or red frame once an episode has succeeded
    or failed. `episodes` are rollout records with an "instruction" added, and optionally "imagined": per replan,
    the predicted future frames (F, S, S, 3), drawn as a strip under the episode while that plan is in force."""
    s = config.frame_size * scale
    caption = 14
    imagined = [ep["imagined"] for ep in episodes if "imagined" in ep]
    strip = s // len(imagined[0][0]) if imagined else 0      # F future frames side by side
    length = max(len(ep["frames"]) for ep in episodes) + 5      # hold the end a moment

    def pixel(xy):
        return (xy[0] + 1) / 2 * s, (1 - xy[1]) / 2 * s + caption

    images = []
    for t in range(length):
        canvas = Image.new("RGB", (s * len(episodes), s + caption + strip))
        for n, ep in enumerate(episodes):
            tile = Image.new("RGB", (s, s + caption + strip))
            if strip and t < len(ep["plans"]):
                future = ep["imagined"][t // replan_every]               # (F, S, S, 3)
                w = s // len(future)
                for j, f in enumerate(future):
                    tile.paste(Image.fromarray(f).resize((w, w), Image.NEAREST), (j * w, s + caption))
            frame = ep["frames"][min(t, len(ep["frames"]) - 1)]
            tile.paste(Image.fromarray(frame).resize((s, s), Image.NEAREST), (0, caption))
            draw = ImageDraw.Draw(tile)
            draw.text((2, 1), ep["instruction"], fill=(255, 255, 255))
            if t < len(ep["plans"]):
                proprio, chunk = ep["plans"][t]
                route = [np.asarray(proprio[:2], dtype=np.float64)]
                for a in np.clip(chunk, -1, 1):
                    route.append(np.clip(route[-1] + config.max_step * a[:2], -config.gripper_limit,
                                         config.gripper_limit))
                points = [pixel(p) for p in route]
                draw.line(points, fill=(0, 255, 255), width=1)
                for p, a in zip(points[1:], chunk):
                    draw.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2],
                                 fill=(255, 0, 255) if a[2] > 0 else (0, 255, 255))
            elif t >= len(ep["frames"]) - 1:
                draw.rectangle([0, caption, s - 1, s + caption - 1], outline=(0, 255, 0) if ep["success"]
                               else (255, 0, 0), width=3)
            canvas.paste(tile, (n * s, 0))
        images.append(canvas)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    images[0].save(path, save_all=True, append_images=images[1:], duration=ms_per_step, loop=0)


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
