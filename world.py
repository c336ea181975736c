"""The built-in tabletop world: a 2-D top-down table, a gripper, three blocks and a pad, four families of language
goals, rendering, and its binding to the evaluation harness (evaluation.py). Pure numpy; deterministic given a seed.

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

Not here: its scripted expert, the datasets made with it and the reference policies (expert.py), the evaluation
harness (evaluation.py).
"""
import functools
import math
from dataclasses import dataclass

import numpy as np

import evaluation

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


# ----------------------------------------------------------------------------- evaluation


def make_env(config=WorldConfig()):
    """make_env(task) -> World(task, config), what evaluation.evaluate builds its environments with."""
    return functools.partial(World, config=config)


def evaluate(policy, tasks=TASK_SETS["goal4"], episodes_per_task=25, config=WorldConfig(), gif_path=None, **kwargs):
    """evaluation.evaluate in this world, on held-out scenes (seeds from EVAL_SEED_BASE, which generated datasets
    never use), the planned gripper path drawn over the GIF's frames."""
    return evaluation.evaluate(policy, make_env(config), tasks, episodes_per_task, seed_base=EVAL_SEED_BASE,
                               gif_path=gif_path, overlay=functools.partial(draw_plan, config=config), **kwargs)


def draw_plan(draw, proprio, chunk, size, top, config=WorldConfig()):
    """The gripper's path under the rest of a chunk, on a frame drawn at (0, top) with side `size`: a line from
    where it is, a dot per planned step, cyan where the chunk keeps the gripper open and magenta where closed."""
    def pixel(xy):
        return (xy[0] + 1) / 2 * size, (1 - xy[1]) / 2 * size + top

    route = [np.asarray(proprio[:2], dtype=np.float64)]
    for a in np.clip(chunk, -1, 1):
        route.append(np.clip(route[-1] + config.max_step * a[:2], -config.gripper_limit, config.gripper_limit))
    points = [pixel(p) for p in route]
    draw.line(points, fill=(0, 255, 255), width=1)
    for p, a in zip(points[1:], chunk):
        draw.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], fill=(255, 0, 255) if a[2] > 0 else (0, 255, 255))
