"""Robot data in the LeRobot format (v3.0 and v2.1, what robot-learning users share, e.g. `lerobot/libero`) read as
this project's episodes (data.Episode), with the paper's preprocessing of actions. Read with pyarrow and PyAV: the
`lerobot` package itself cannot be installed beside this project's torch.

    python lerobot.py ~/lerobot/libero data/libero --camera observation.images.image --episodes 100
    python lerobot.py SRC OUT --rotation axis-angle --gripper binary      # actions as [dp, 6D rotation, gripper]

writes the frames, state and actions in the project's frame format (data.py), for the stand-in encoders and small
datasets (it holds a dataset in memory); preencode.py reads a LeRobot folder directly for the real models.

The two layouts (meta/info.json's codebase_version says which):
    v3.0  data/chunk-XXX/file-YYY.parquet (many episodes per file), meta/episodes/chunk-XXX/file-YYY.parquet,
          meta/tasks.parquet, videos/<camera>/chunk-XXX/file-YYY.mp4 (episodes back to back): frame i of an episode
          is at its videos/<camera>/from_timestamp + timestamp_i in that mp4
    v2.1  data/chunk-XXX/episode_NNNNNN.parquet and videos/chunk-XXX/<camera>/episode_NNNNNN.mp4 (one each per
          episode), meta/episodes.jsonl, meta/tasks.jsonl: frame i is at timestamp_i
A parquet row holds a frame's observation.state, the action taken at it, its timestamp and task_index; an episode
of N rows becomes an Episode of N frames and N - 1 actions (the last row's action has no frame after it). At
another `fps` than the dataset's, each step k / fps takes the row nearest in time (frame, state and action alike:
nothing is integrated between kept rows, so resample absolute actions, not deltas).

Not here: the project's formats (data.py, latent_data.py), rotation math (rotations.py), the real encoders
(encoders.py).
"""
import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

import data
import rotations

# ----------------------------------------------------------------------------- the paper's preprocessing

ROTATIONS = {"axis-angle": 3, "quaternion-xyzw": 4, "quaternion-wxyz": 4}   # encoding -> its number of values


def rotation_to_matrix(x, kind):
    """(..., 3) axis-angle or (..., 4) quaternion -> (..., 3, 3)."""
    if kind == "axis-angle":
        return rotations.axis_angle_to_matrix(x)
    return rotations.quaternion_to_matrix(x, order=kind.split("-")[1])


def matrix_to_rotation(R, kind):
    if kind == "axis-angle":
        return rotations.matrix_to_axis_angle(R)
    return rotations.matrix_to_quaternion(R, order=kind.split("-")[1])


def _split_pose(x, kind):
    """[position 3 | rotation (kind) | rest] -> (p, R, rest)."""
    n = ROTATIONS[kind]
    if x.shape[-1] < 3 + n:
        raise ValueError(f"a pose with a {kind} rotation needs >= {3 + n} values, got {x.shape[-1]}")
    return x[..., :3], rotation_to_matrix(x[..., 3:3 + n], kind), x[..., 3 + n:]


def actions_to_6d(actions, kind):
    """[position 3 | rotation (kind) | rest] -> [position 3 | 6D (first two rows of R) | rest], float64."""
    p, R, rest = _split_pose(np.asarray(actions, dtype=np.float64), kind)
    return np.concatenate([p, rotations.matrix_to_6d(R), rest], axis=-1)


def actions_from_6d(actions, kind):
    """The inverse of actions_to_6d (a policy's 6D output, any 6 values, becomes the nearest rotation)."""
    a = np.asarray(actions, dtype=np.float64)
    R = rotations.sixd_to_matrix(a[..., 3:9])
    return np.concatenate([a[..., :3], matrix_to_rotation(R, kind), a[..., 9:]], axis=-1)


def relative_actions(state, actions, state_kind, action_kind):
    """Absolute target poses [p_t | R_t (action_kind) | rest] relative to the state's pose [p | R (state_kind) | ...]:
    [dp = p_t - p | 6D of dR = R^T R_t | rest] (rotations.relative_pose)."""
    p, R, _ = _split_pose(np.asarray(state, dtype=np.float64), state_kind)
    p_t, R_t, rest = _split_pose(np.asarray(actions, dtype=np.float64), action_kind)
    dp, dR = rotations.relative_pose(p, R, p_t, R_t)
    return np.concatenate([dp, rotations.matrix_to_6d(dR), rest], axis=-1)


def absolute_actions(state, relative, state_kind, action_kind):
    """The inverse of relative_actions: [p + dp | R dR (action_kind) | rest], what a robot is sent."""
    p, R, _ = _split_pose(np.asarray(state, dtype=np.float64), state_kind)
    a = np.asarray(relative, dtype=np.float64)
    p_t, R_t = rotations.apply_relative_pose(p, R, a[..., :3], rotations.sixd_to_matrix(a[..., 3:9]))
    return np.concatenate([p_t, matrix_to_rotation(R_t, action_kind), a[..., 9:]], axis=-1)


def binary_gripper(g, threshold=0.0):
    """A gripper command as +1 (close) above the threshold, -1 (open) at or below it."""
    return np.where(np.asarray(g) > threshold, 1.0, -1.0)


@dataclass(frozen=True)
class Preprocess:
    """The preprocessing applied to every episode's actions (each part optional, all off by default):
    rotation    the actions' rotation encoding after their 3 position values; they become [p, 6D, rest]
    relative    the actions are absolute target poses: make them relative to the state's pose (needs rotation
                and state_rotation, the state's encoding after its first 3 values)
    gripper     "binary": the last action value -> +1 / -1 at gripper_threshold; "continuous": as recorded
    """
    rotation: str = ""
    relative: bool = False
    state_rotation: str = ""
    gripper: str = "continuous"
    gripper_threshold: float = 0.0

    def __post_init__(self):
        for name in ("rotation", "state_rotation"):
            if getattr(self, name) not in ("", *ROTATIONS):
                raise ValueError(f"--{name} must be one of {sorted(ROTATIONS)}, got {getattr(self, name)!r}")
        if self.relative and not (self.rotation and self.state_rotation):
            raise ValueError("--relative needs --rotation and --state_rotation (the poses' rotation encodings)")
        if self.gripper not in ("continuous", "binary"):
            raise ValueError(f"--gripper must be continuous or binary, got {self.gripper!r}")

    def __call__(self, state, actions):
        """state (N, P), actions (N, A) -> the preprocessed actions (N, A'), float32."""
        a = np.asarray(actions, dtype=np.float64)
        if self.relative:
            a = relative_actions(state, a, self.state_rotation, self.rotation)
        elif self.rotation:
            a = actions_to_6d(a, self.rotation)
        if self.gripper == "binary":
            a = np.concatenate([a[:, :-1], binary_gripper(a[:, -1:], self.gripper_threshold)], axis=1)
        return a.astype(np.float32)

# ----------------------------------------------------------------------------- the reader


def _read_json(path):
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a LeRobot dataset folder")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def _read_parquet(path, columns=None):
    import pyarrow.parquet as pq   # optional extra: requirements-real.txt
    if not path.is_file():
        raise FileNotFoundError(f"{path} is named by the dataset's metadata but missing")
    try:
        return pq.read_table(path, columns=columns).to_pydict()
    except Exception as e:         # pyarrow raises its own error types for broken or foreign files
        raise ValueError(f"{path}: not a readable parquet file with the columns {columns}: {e}") from None


class LeRobotReader:
    """A LeRobot dataset folder, read as the project's episodes: `len(reader)`, `reader.episode(e)` (decodes its
    frames), and `reader.manifest`, the same keys as a data.py manifest (frame_shape, proprio_dim, action_dim,
    control_hz, value ranges, action_pad, episodes with their instructions), from the parquet files alone."""

    def __init__(self, root, camera, state="observation.state", action="action", fps=None,
                 preprocess=Preprocess(), action_pad="hold"):
        self.root = Path(root)
        self.info = info = _read_json(self.root / "meta" / "info.json")
        self.version = info.get("codebase_version")
        if self.version not in ("v3.0", "v2.1"):
            raise ValueError(f"{self.root / 'meta/info.json'}: codebase_version {self.version!r}; this reader "
                             f"knows v3.0 and v2.1")
        features = info.get("features", {})
        videos = sorted(k for k, f in features.items() if f.get("dtype") == "video")
        for flag, key, present in (("--camera", camera, videos), ("--state", state, sorted(features)),
                                   ("--action", action, sorted(features))):
            if key not in present:
                raise ValueError(f"{flag} {key!r} is not a{' video' if flag == '--camera' else ''} feature of "
                                 f"{self.root}; present: {present}")
        self.camera, self.state_key, self.action_key, self.preprocess = camera, state, action, preprocess
        self.video_fps = float(info["fps"])
        self.fps = float(fps or info["fps"])
        shape = dict(zip(features[camera].get("names") or ["height", "width", "channels"], features[camera]["shape"]))
        self.frame_shape = (shape["height"], shape["width"], shape["channels"])
        self.tasks = self._tasks()
        self._episodes = self._episode_table()
        self._rows = self._load_rows()
        self._build_manifest(action_pad)

    # -- metadata

    def _tasks(self):
        meta = self.root / "meta"
        if self.version == "v3.0":
            table = _read_parquet(meta / "tasks.parquet")
            names = table.get("task") or table.get("__index_level_0__")   # pandas writes the task as the index
            return dict(zip(table["task_index"], names))
        lines = (meta / "tasks.jsonl").read_text().splitlines()
        return {row["task_index"]: row["task"] for row in map(json.loads, filter(None, lines))}

    def _episode_table(self):
        """[{episode_index, length, and for v3.0 where its rows and frames are}] in episode order."""
        meta = self.root / "meta"
        if self.version == "v2.1":
            lines = (meta / "episodes.jsonl").read_text().splitlines()
            return sorted(map(json.loads, filter(None, lines)), key=lambda e: e["episode_index"])
        episodes = []
        for path in sorted((meta / "episodes").glob("chunk-*/file-*.parquet")):
            table = _read_parquet(path)
            episodes += [dict(zip(table, row)) for row in zip(*table.values())]
        if not episodes:
            raise FileNotFoundError(f"{meta / 'episodes'} holds no episode files")
        return sorted(episodes, key=lambda e: e["episode_index"])

    def _load_rows(self):
        """Per episode (timestamps (N,), state (N, P), action (N, A), task index), from its parquet rows."""
        columns = ["episode_index", "timestamp", "task_index", self.state_key, self.action_key]
        tables = {}
        for ep in self._episodes:
            path = self._data_path(ep)
            if path not in tables:
                tables[path] = _read_parquet(path, columns)
        by_episode = {}
        for path, t in tables.items():
            index = np.asarray(t["episode_index"])
            for e in np.unique(index):
                rows = np.flatnonzero(index == e)
                by_episode[int(e)] = (np.asarray(t["timestamp"], dtype=np.float64)[rows],
                                      np.asarray([t[self.state_key][i] for i in rows], dtype=np.float32),
                                      np.asarray([t[self.action_key][i] for i in rows], dtype=np.float32),
                                      int(t["task_index"][rows[0]]), path)
        missing = [ep["episode_index"] for ep in self._episodes if ep["episode_index"] not in by_episode]
        if missing:
            raise ValueError(f"{self.root}: episodes {missing[:5]} have no rows in their data files")
        return by_episode

    def _data_path(self, ep):
        if self.version == "v2.1":
            chunk = ep["episode_index"] // self.info["chunks_size"]
            return self.root / self.info["data_path"].format(episode_chunk=chunk, episode_index=ep["episode_index"])
        return self.root / self.info["data_path"].format(chunk_index=ep["data/chunk_index"],
                                                         file_index=ep["data/file_index"])

    def _video(self, ep):
        """(mp4 path, the episode's start time in it)."""
        if self.version == "v2.1":
            chunk = ep["episode_index"] // self.info["chunks_size"]
            return self.root / self.info["video_path"].format(episode_chunk=chunk, video_key=self.camera,
                                                              episode_index=ep["episode_index"]), 0.0
        key = f"videos/{self.camera}"
        path = self.info["video_path"].format(video_key=self.camera, chunk_index=ep[f"{key}/chunk_index"],
                                              file_index=ep[f"{key}/file_index"])
        return self.root / path, float(ep[f"{key}/from_timestamp"])

    def _steps(self, timestamps):
        """The rows taken at steps k / fps (all rows at the dataset's own fps): the nearest in time to each."""
        t = timestamps - timestamps[0]
        if len(t) == 1:
            return np.zeros(1, dtype=np.int64)
        times = np.arange(int(np.floor(t[-1] * self.fps + 1e-6)) + 1) / self.fps
        after = np.clip(np.searchsorted(t, times), 1, len(t) - 1)              # the first row at or after each time
        return np.where(times - t[after - 1] <= t[after] - times, after - 1, after)

    def _build_manifest(self, action_pad):
        episodes, proprio, actions, self._kept = [], [], [], []
        for ep in self._episodes:
            timestamps, state, action, task, _ = self._rows[ep["episode_index"]]
            rows = self._steps(timestamps)
            if len(rows) < 2:   # an episode needs an action with a frame after it
                continue
            a = self.preprocess(state[rows], action[rows])[:-1]
            proprio.append(state[rows]), actions.append(a), self._kept.append((ep, rows))
            instruction = self.tasks[task]
            episodes.append({"length": len(a), "instruction": instruction, "task": instruction,
                             "info": {"lerobot_episode": ep["episode_index"]}})
        if not episodes:
            raise ValueError(f"{self.root}: no episode has two or more steps at {self.fps} fps")
        proprio, actions = np.concatenate(proprio), np.concatenate(actions)
        pad = action_pad.split(",") if "," in action_pad else [action_pad] * actions.shape[1]
        self.manifest = {
            "frame_shape": list(self.frame_shape), "proprio_dim": proprio.shape[1], "action_dim": actions.shape[1],
            "control_hz": self.fps, "action_pad": pad,
            "proprio_range": np.stack([proprio.min(0), proprio.max(0)], 1).tolist(),
            "action_range": np.stack([actions.min(0), actions.max(0)], 1).tolist(),
            "description": f"LeRobot {self.version} {self.root.name}: frames {self.camera}, proprio "
                           f"{self.state_key}, actions {self.action_key} ({self.describe_actions()})",
            "source": {"lerobot": str(self.root), "codebase_version": self.version, "camera": self.camera,
                       "state": self.state_key, "action": self.action_key, "fps": self.fps,
                       "preprocess": asdict(self.preprocess)},
            "episodes": episodes}
        self.lengths = np.array([e["length"] for e in episodes], dtype=np.int64)
        self.instructions = [e["instruction"] for e in episodes]

    def describe_actions(self):
        p = self.preprocess
        parts = ["relative to the state's pose" if p.relative else "",
                 f"rotation as 6D from {p.rotation}" if p.rotation else "",
                 f"binary gripper at {p.gripper_threshold}" if p.gripper == "binary" else ""]
        return ", ".join(filter(None, parts)) or "as recorded"

    # -- episodes

    def __len__(self):
        return len(self._kept)

    def episode(self, e):
        """The e-th episode (of those with >= 2 steps) as a data.Episode, its frames decoded from the mp4."""
        ep, rows = self._kept[e]
        timestamps, state, action, _, _ = self._rows[ep["episode_index"]]
        path, start = self._video(ep)
        frames = decode_frames(path, start + timestamps[rows], self.video_fps, self.frame_shape,
                               f"episode {ep['episode_index']}, camera {self.camera}")
        m = self.manifest["episodes"][e]
        return data.Episode(frames, state[rows], self.preprocess(state[rows], action[rows])[:-1], m["instruction"],
                            m["task"], m["info"])


def decode_frames(path, times, fps, frame_shape, what):
    """The frames of the video at `path` shown at `times` (seconds; each within half a frame period of one),
    (len(times), H, W, C) uint8. `what` names the episode and camera in errors."""
    import av   # optional extra: requirements-real.txt
    half = 0.5 / fps
    stamps, frames = [], []
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            container.seek(int(max(0.0, times.min() - half) / stream.time_base), stream=stream)   # a keyframe before
            for frame in container.decode(stream):
                if frame.time > times.max() + half:
                    break
                if frame.time >= times.min() - half:
                    stamps.append(frame.time), frames.append(frame.to_ndarray(format="rgb24"))
    except (av.error.FFmpegError, IndexError) as e:   # IndexError: no video stream in the file
        raise ValueError(f"{path} ({what}): not a readable video: {e}") from None
    if not frames:
        raise ValueError(f"{path} ({what}): no frames between {times.min():.3f} s and {times.max():.3f} s")
    stamps = np.asarray(stamps)
    nearest = np.abs(stamps[None] - times[:, None]).argmin(1)
    off = np.abs(stamps[nearest] - times)
    if off.max() > half + 1e-6:
        k = int(off.argmax())
        raise ValueError(f"{path} ({what}): no frame within half a frame of t = {times[k]:.4f} s (the nearest is at "
                         f"{stamps[nearest[k]]:.4f} s)")
    if frames[0].shape != tuple(frame_shape):
        raise ValueError(f"{path} ({what}): frames are {'x'.join(map(str, frames[0].shape))}, but meta/info.json "
                         f"says {'x'.join(map(str, frame_shape))}")
    return np.stack([frames[i] for i in nearest])

# ----------------------------------------------------------------------------- the command line


def add_arguments(p):
    """The reader's flags (shared with preencode.py)."""
    p.add_argument("--camera", default="observation.images.image", help="the video feature to read frames from")
    p.add_argument("--state", default="observation.state", help="the feature that becomes the proprioception")
    p.add_argument("--action", default="action", help="the feature that becomes the actions")
    p.add_argument("--fps", type=float, default=None, help="steps per second to resample to (nearest row; "
                   "default: the dataset's own)")
    p.add_argument("--rotation", default="", choices=["", *ROTATIONS], help="the actions' rotation encoding after "
                   "their 3 position values: convert it to 6D (first two rows of the rotation matrix)")
    p.add_argument("--relative", action="store_true", help="the actions are absolute target poses: make them "
                   "relative to the state's pose (needs --rotation and --state_rotation)")
    p.add_argument("--state_rotation", default="", choices=["", *ROTATIONS], help="the state's rotation encoding "
                   "after its first 3 values (for --relative)")
    p.add_argument("--gripper", default="continuous", choices=["continuous", "binary"], help="the last action value: "
                   "as recorded, or +1 / -1 at --gripper_threshold")
    p.add_argument("--gripper_threshold", type=float, default=0.0)
    p.add_argument("--action_pad", default="hold", help="how to fill a chunk past an episode's end: zero or hold, "
                   "one for all action values or one per value, comma-separated")


def reader_from_args(root, args):
    try:
        return LeRobotReader(root, args.camera, args.state, args.action, args.fps,
                             Preprocess(args.rotation, args.relative, args.state_rotation, args.gripper,
                                        args.gripper_threshold), args.action_pad)
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"{root}: {e}") from None


def main(argv=None):
    from tqdm import tqdm
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="a LeRobot dataset folder (v3.0 or v2.1)")
    p.add_argument("out", help="the dataset folder to write (data.py's frame format)")
    p.add_argument("--episodes", type=int, default=0, help="convert only the first N episodes (0: all)")
    add_arguments(p)
    args = p.parse_args(argv)
    reader = reader_from_args(args.src, args)
    ids = range(min(args.episodes or len(reader), len(reader)))
    m = reader.manifest
    episodes = (reader.episode(e) for e in tqdm(ids, desc="episodes", unit="ep"))
    try:
        data.write_dataset(args.out, episodes, control_hz=m["control_hz"], proprio_range=m["proprio_range"],
                           action_range=m["action_range"], action_pad=m["action_pad"], description=m["description"],
                           source=m["source"])
    except (OSError, ValueError) as e:
        raise SystemExit(str(e)) from None
    print(f"wrote {len(ids)} episodes to {args.out}")


if __name__ == "__main__":
    main()
