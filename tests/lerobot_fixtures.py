"""Tiny LeRobot datasets written in the real layouts (v3.0: many episodes per parquet and per mp4; v2.1: one of
each per episode), with parquet (pyarrow) and mp4 (PyAV, h264 or AV1), so that lerobot.py is tested on files as
LeRobot writes them. Reusable by any test: write_lerobot(root, episodes, version=...)."""
import json

import numpy as np
import torch


def smooth_frames(n, height, width, seed):
    """n frames of smooth random colour (what a lossy codec keeps well), uint8 (n, H, W, 3)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g)
    frames = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    return (frames * 200 + 20).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def make_episodes(lengths, size=(32, 48), state_dim=8, action_dim=7, seed=0, tasks=("pick up the green block",
                                                                                      "push the blue block")):
    """Episodes as dicts of frames (N, H, W, 3), state (N, P), action (N, A), task; every value distinct."""
    rng = np.random.default_rng(seed)
    return [{"frames": smooth_frames(n, *size, seed=seed * 1000 + e), "task": tasks[e % len(tasks)],
             "state": rng.normal(size=(n, state_dim)).astype(np.float32),
             "action": rng.normal(size=(n, action_dim)).astype(np.float32)} for e, n in enumerate(lengths)]


def write_mp4(path, frames, fps, codec="h264"):
    import av
    path.parent.mkdir(parents=True, exist_ok=True)
    options = {"qp": "0"} if codec == "h264" else {"crf": "10", "preset": "12"}
    with av.open(str(path), "w") as out:
        stream = out.add_stream({"h264": "libx264", "av1": "libsvtav1"}[codec], rate=fps, options=options)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def _write_parquet(path, columns):
    import pyarrow as pa
    import pyarrow.parquet as pq
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)


def _rows(episodes, ids, fps, task_index, start):
    """The data parquet columns of the episodes `ids`; `start` is the global index of their first row."""
    cols = {k: [] for k in ("observation.state", "action", "timestamp", "frame_index", "episode_index", "index",
                            "task_index")}
    for e in ids:
        ep = episodes[e]
        n = len(ep["frames"])
        cols["observation.state"] += ep["state"].tolist()
        cols["action"] += ep["action"].tolist()
        cols["timestamp"] += (np.arange(n) / fps).astype(np.float32).tolist()
        cols["frame_index"] += list(range(n))
        cols["episode_index"] += [e] * n
        cols["index"] += list(range(start, start + n))
        cols["task_index"] += [task_index[ep["task"]]] * n
        start += n
    return cols


def _info(version, episodes, fps, camera, codec):
    h, w = episodes[0]["frames"].shape[1:3]
    features = {camera: {"dtype": "video", "shape": [h, w, 3], "names": ["height", "width", "channels"],
                         "info": {"video.fps": fps, "video.codec": codec, "video.pix_fmt": "yuv420p"}},
                "observation.state": {"dtype": "float32", "shape": [episodes[0]["state"].shape[1]], "names": None},
                "action": {"dtype": "float32", "shape": [episodes[0]["action"].shape[1]], "names": None}}
    for key in ("timestamp", "frame_index", "episode_index", "index", "task_index"):
        features[key] = {"dtype": "float32" if key == "timestamp" else "int64", "shape": [1], "names": None}
    paths = ({"data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
              "video_path": "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"}
             if version == "v3.0" else
             {"data_path": "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
              "video_path": "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"})
    return {"codebase_version": version, "robot_type": "test", "fps": fps, "total_episodes": len(episodes),
            "total_frames": sum(len(ep["frames"]) for ep in episodes), "chunks_size": 1000, **paths,
            "features": features}


def write_lerobot(root, episodes, version="v3.0", fps=10, camera="observation.images.image", codec="h264",
                  episodes_per_file=2):
    """Write `episodes` (make_episodes) as a LeRobot dataset in `root`; v3.0 packs episodes_per_file episodes
    into each data parquet and each mp4."""
    tasks = list(dict.fromkeys(ep["task"] for ep in episodes))
    task_index = {t: i for i, t in enumerate(tasks)}
    meta = root / "meta"
    meta.mkdir(parents=True, exist_ok=True)
    (meta / "info.json").write_text(json.dumps(_info(version, episodes, fps, camera, codec), indent=1))
    if version == "v2.1":
        (meta / "tasks.jsonl").write_text("".join(json.dumps({"task_index": i, "task": t}) + "\n"
                                                  for i, t in enumerate(tasks)))
        (meta / "episodes.jsonl").write_text("".join(json.dumps({"episode_index": e, "tasks": [ep["task"]],
                                                                 "length": len(ep["frames"])}) + "\n"
                                                     for e, ep in enumerate(episodes)))
        start = 0
        for e, ep in enumerate(episodes):
            _write_parquet(root / f"data/chunk-000/episode_{e:06d}.parquet", _rows(episodes, [e], fps, task_index,
                                                                                   start))
            write_mp4(root / f"videos/chunk-000/{camera}/episode_{e:06d}.mp4", ep["frames"], fps, codec)
            start += len(ep["frames"])
        return root
    _write_parquet(meta / "tasks.parquet", {"task_index": list(range(len(tasks))), "task": tasks})
    rows = {k: [] for k in ("episode_index", "tasks", "length", "data/chunk_index", "data/file_index",
                            "dataset_from_index", "dataset_to_index", f"videos/{camera}/chunk_index",
                            f"videos/{camera}/file_index", f"videos/{camera}/from_timestamp",
                            f"videos/{camera}/to_timestamp")}
    start = 0
    for f, first in enumerate(range(0, len(episodes), episodes_per_file)):
        ids = list(range(first, min(first + episodes_per_file, len(episodes))))
        _write_parquet(root / f"data/chunk-000/file-{f:03d}.parquet", _rows(episodes, ids, fps, task_index, start))
        write_mp4(root / f"videos/{camera}/chunk-000/file-{f:03d}.mp4",
                  np.concatenate([episodes[e]["frames"] for e in ids]), fps, codec)
        offset = 0
        for e in ids:
            n = len(episodes[e]["frames"])
            for key, value in (("episode_index", e), ("tasks", [episodes[e]["task"]]), ("length", n),
                               ("data/chunk_index", 0), ("data/file_index", f), ("dataset_from_index", start),
                               ("dataset_to_index", start + n), (f"videos/{camera}/chunk_index", 0),
                               (f"videos/{camera}/file_index", f), (f"videos/{camera}/from_timestamp", offset / fps),
                               (f"videos/{camera}/to_timestamp", (offset + n) / fps)):
                rows[key].append(value)
            offset, start = offset + n, start + n
    _write_parquet(meta / "episodes/chunk-000/file-000.parquet", rows)
    return root
