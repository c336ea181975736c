"""LIBERO evaluation with the protocol openpi and OpenVLA-OFT report, on evaluation.py's lockstep rollouts: a trained
run in process, or any policy behind a server that speaks openpi's protocol (serve.py, or openpi's own).

    python libero_eval.py --run out/libero --out out/libero-eval                 # all four suites, 50 trials a task
    python libero_eval.py --server localhost:8000 --suites goal --trials 5       # a policy served elsewhere
    python libero_eval.py --run out/libero --out out/libero-eval                 # again: resumes where it stopped

The protocol: suites spatial, object, goal, 10 (LIBERO's libero_spatial, ...), ten tasks each; trial k of a task
starts from the benchmark's fixed initial state k; 10 settle steps of the no-op action [0, 0, 0, 0, 0, 0, -1]
(objects drop into place), then at most 220 / 280 / 300 / 520 policy steps; the policy replans every 5 steps; an
episode succeeds when LIBERO reports its goal reached. Cameras render at 256x256; what the policy is sent is
libero_io.observation's (both images flipped and resized to 224, the 8-D state), the frame a policy sees is the
two side by side, as serve.py builds it. Per-task and per-suite success with 95% Wilson intervals.

Results live in --out: episodes.jsonl (one line per finished episode, flushed to disk as each group of episodes
ends), results.json (the summary, rewritten whole after each group), settings.json (what the results are of: a
rerun with other settings is refused), videos/ (GIFs of chosen episodes). A rerun skips the episodes already there.

Needs LIBERO, which cannot share the project's environment (numpy 1.26, mujoco 2.3.7): README "Evaluate on LIBERO".
Not here: LIBERO's observation and action conventions (libero_io.py), the server (serve.py).
"""
import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

import evaluation
import libero_io
import openpi_wire
import serve

SUITES = {"spatial": ("libero_spatial", 220), "object": ("libero_object", 280), "goal": ("libero_goal", 300),
          "10": ("libero_10", 520)}     # suite -> (LIBERO's name, max policy steps: its longest demo plus some)
SETTLE_STEPS, SETTLE_ACTION = 10, [0.0] * 6 + [-1.0]
REPLAN, TRIALS, RESOLUTION, ENV_SEED = 5, 50, 256, 7      # openpi's LIBERO client's, its seed included

# ----------------------------------------------------------------------------- the environment


class LiberoEnv:
    """One LIBERO task behind evaluation.py's environment interface. reset(k) starts from the benchmark's initial
    state k and runs the settle steps; the episode ends at success (terminated) or after max_steps policy steps
    (truncated). obs["frame"]: the two 224x224 images side by side (what GIFs show, and split, what a policy is
    sent); obs["proprio"]: the 8-D state."""

    def __init__(self, suite, task_id, max_steps=None, resolution=RESOLUTION, seed=ENV_SEED):
        os.environ.setdefault("MUJOCO_GL", "osmesa")          # before robosuite imports mujoco: render on the CPU
        os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])
        from libero.libero import benchmark, get_libero_path
        from libero.libero.envs import OffScreenRenderEnv
        name, self.max_steps = SUITES[suite][0], max_steps or SUITES[suite][1]
        bench = benchmark.get_benchmark_dict()[name]()
        task = bench.get_task(task_id)
        self.instruction, self.init_states = task.language, bench.get_task_init_states(task_id)
        self.env = OffScreenRenderEnv(bddl_file_name=os.path.join(get_libero_path("bddl_files"), task.problem_folder,
                                                                  task.bddl_file),
                                      camera_heights=resolution, camera_widths=resolution)
        self.env.seed(seed)
        self.done = True
        self.cost = {"resets": 0, "reset_s": 0.0, "steps": 0, "step_s": 0.0}   # LIBERO's own time, settling included

    def reset(self, trial):
        if not 0 <= trial < len(self.init_states):
            raise ValueError(f"trial {trial}: the benchmark has {len(self.init_states)} initial states for this task")
        start = time.perf_counter()
        self.env.reset()
        raw = self.env.set_init_state(self.init_states[trial])
        self._count("reset", start)
        for _ in range(SETTLE_STEPS):
            raw = self._step(SETTLE_ACTION)[0]
        self.t, self.done = 0, False
        return self._obs(raw), {"success": False}

    def step(self, action):
        raw, reward, success, _ = self._step(np.asarray(action, dtype=np.float64).tolist())
        self.t += 1
        truncated = not success and self.t >= self.max_steps
        self.done = bool(success or truncated)
        return self._obs(raw), reward, bool(success), truncated, {"success": bool(success)}

    def _step(self, action):
        start = time.perf_counter()
        out = self.env.step(action)
        self._count("step", start)
        return out

    def _count(self, what, start):
        self.cost[what + "s"] += 1
        self.cost[what + "_s"] += time.perf_counter() - start

    def _obs(self, raw):
        o = libero_io.observation(raw, self.instruction)
        return {"frame": np.concatenate([o[libero_io.IMAGE], o[libero_io.WRIST]], axis=1),
                "proprio": o[libero_io.STATE], "instruction": self.instruction}

    def close(self):
        self.env.close()


def cameras(frame):
    """The two images of a LiberoEnv frame, by their keys."""
    half = frame.shape[1] // 2
    return {libero_io.IMAGE: np.ascontiguousarray(frame[:, :half]),
            libero_io.WRIST: np.ascontiguousarray(frame[:, half:])}


def request(frame, proprio, instruction):
    """The observation dict a LiberoEnv's observation is sent as (libero_io.observation's keys and values)."""
    return {**cameras(frame), libero_io.STATE: np.asarray(proprio, dtype=np.float64), libero_io.PROMPT: instruction}

# ----------------------------------------------------------------------------- the policy: in process or served


class LocalPolicy:
    """A run in process, through serve.py's ServedPolicy (the server's own mapping, without the network). It sees
    the history rollout gives it, frames `history_stride` steps apart as the run was trained."""

    def __init__(self, run, mapping, seed=0, device="cpu"):
        from sample import VAMPolicy
        policy, _ = VAMPolicy.load(run, device, seed=seed)
        self.served = serve.ServedPolicy(policy, mapping, name=str(run))
        self.metadata, self.seconds, self.calls = self.served.metadata(), 0.0, 0

    def act_batch(self, frames, instructions, proprio):
        start = time.perf_counter()
        keys = self.served.mapping.images
        histories = np.stack([[self.served.frame([cameras(f)[k] for k in keys]) for f in ep] for ep in frames])
        chunks = self.served.act(histories, instructions, proprio)
        self.seconds, self.calls = self.seconds + time.perf_counter() - start, self.calls + 1
        return np.stack(chunks)


class RemotePolicy:
    """A policy server, one connection per environment, every request of a replan in flight at once (so that the
    server can batch them). The server keeps each connection's history, so every episode gets a new connection
    (bind(): what any openpi-protocol server takes as a new episode). Its rows are the unfinished environments, in
    order (rollout's contract with a policy that binds)."""

    def __init__(self, address):
        self.address, self.clients, self.seconds, self.calls = address, [], 0.0, 0
        first = self._client()
        self.metadata = first.metadata
        first.close()

    def _client(self):
        try:
            return openpi_wire.Client(self.address)
        except OSError as e:
            raise SystemExit(f"--server {self.address}: cannot connect ({e})") from None

    def bind(self, envs):
        for client in self.clients:
            client.close()
        self.envs, self.clients = envs, [self._client() for _ in envs]

    def act_batch(self, frames, instructions, proprio):
        start = time.perf_counter()
        clients = [c for c, env in zip(self.clients, self.envs) if not env.done]
        for c, f, s, p in zip(clients, frames, instructions, proprio):
            c.send(request(f[-1], p, s))
        chunks = np.stack([c.receive()["actions"] for c in clients])
        self.seconds, self.calls = self.seconds + time.perf_counter() - start, self.calls + 1
        return chunks

# ----------------------------------------------------------------------------- results on disk


class Results:
    """The finished episodes of an evaluation in `out` (the module docstring lists its files)."""

    def __init__(self, out, settings):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / "settings.json"
        if path.exists():
            old = json.loads(path.read_text())
            changed = [f"{k}: {old.get(k)!r} there, {v!r} now" for k, v in settings.items() if old.get(k) != v]
            if changed:
                raise SystemExit(f"{self.out} holds an evaluation with other settings ({'; '.join(changed)}): "
                                 f"choose another --out")
        else:
            _write_atomic(path, settings)
        self.episodes = self._load(self.out / "episodes.jsonl")

    @staticmethod
    def _load(path):
        """The complete lines of episodes.jsonl; a line cut short by a crash is dropped from the file."""
        if not path.exists():
            return []
        text = path.read_text()
        complete = text[:text.rfind("\n") + 1]
        if complete != text:
            with open(path, "r+") as f:
                f.truncate(len(complete.encode()))
        return [json.loads(line) for line in complete.splitlines()]

    def done(self, suite, task_id):
        return {e["trial"] for e in self.episodes if (e["suite"], e["task_id"]) == (suite, task_id)}

    def add(self, records):
        with open(self.out / "episodes.jsonl", "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
            f.flush()
            os.fsync(f.fileno())
        self.episodes += records
        summary = {suite: r.to_json() for suite, r in self.by_suite().items()}
        rates = [s["mean"] for s in summary.values()]
        _write_atomic(self.out / "results.json", {"average_of_suites": float(np.mean(rates)), "suites": summary})

    def by_suite(self):
        """{suite: evaluation.EvalResult over its tasks (named by their instructions)}."""
        results = {}
        for suite in dict.fromkeys(e["suite"] for e in self.episodes):
            eps = [e for e in self.episodes if e["suite"] == suite]
            tasks = list(dict.fromkeys(e["task"] for e in eps))
            results[suite] = evaluation.EvalResult(
                {t: sum(e["success"] for e in eps if e["task"] == t) for t in tasks},
                {t: sum(e["task"] == t for e in eps) for t in tasks},
                {t: float(np.mean([e["steps"] for e in eps if e["task"] == t])) for t in tasks})
        return results


def _write_atomic(path, obj):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)

# ----------------------------------------------------------------------------- the evaluation


def evaluate_task(policy, results, suite, task_id, args, video=False):
    """The task's missing trials, args.batch at a time in lockstep, each group written as it ends; with `video`, a
    GIF of trial 0."""
    todo = [k for k in range(args.trials) if k not in results.done(suite, task_id)]
    if not todo:
        return
    history, stride = (1, 1) if args.server else (policy.metadata["history"], policy.metadata["history_stride"])
    envs = [LiberoEnv(suite, task_id, args.max_steps, args.resolution, args.seed)
            for _ in range(min(args.batch, len(todo)))]
    try:
        for g in range(0, len(todo), len(envs)):
            trials = todo[g:g + len(envs)]
            record = [i for i, k in enumerate(trials) if k == 0 and video]
            start = time.perf_counter()
            eps = evaluation.rollout(policy, envs[:len(trials)], trials, args.replan, history, stride, record)
            seconds = time.perf_counter() - start
            results.add([{"suite": suite, "task_id": task_id, "task": envs[0].instruction, "trial": k,
                          "success": ep["success"], "steps": ep["steps"], "seconds": seconds / len(trials)}
                         for k, ep in zip(trials, eps)])
            for i in record:
                name = f"{suite}-task{task_id}-trial0-{'success' if eps[i]['success'] else 'failure'}.gif"
                evaluation.save_gif(results.out / "videos" / name, [eps[i]], args.replan, scale=1, ms_per_step=50)
            _progress(results, suite, task_id, trials, eps, seconds, envs, policy)
    finally:
        for env in envs:
            env.close()


def _progress(results, suite, task_id, trials, eps, seconds, envs, policy):
    cost = {k: sum(e.cost[k] for e in envs) for k in envs[0].cost}
    r = results.by_suite()[suite]
    print(f"[{suite} task {task_id}] trials {trials[0]}..{trials[-1]}: {sum(e['success'] for e in eps)}/{len(eps)} "
          f"succeeded, {seconds:.0f} s; suite so far {sum(r.successes.values())}/{sum(r.episodes.values())}; "
          f"LIBERO {cost['step_s'] / max(cost['steps'], 1) * 1e3:.0f} ms per step, "
          f"{cost['reset_s'] / max(cost['resets'], 1):.1f} s per reset; policy "
          f"{policy.seconds / max(policy.calls, 1) * 1e3:.0f} ms per call", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--run", help="a train.py run directory, run in process")
    where.add_argument("--server", help="host:port of a policy server speaking openpi's protocol")
    p.add_argument("--out", default="out/libero-eval", help="results folder; rerunning resumes it")
    p.add_argument("--suites", default="spatial,object,goal,10", help="comma-separated, from spatial, object, goal, 10")
    p.add_argument("--tasks", default=None, help="comma-separated task ids 0..9 (default: all ten)")
    p.add_argument("--trials", type=int, default=TRIALS, help="trials per task, from initial state 0 on (protocol: 50)")
    p.add_argument("--batch", type=int, default=5, help="episodes of a task run in lockstep, each an environment")
    p.add_argument("--videos", type=int, default=0, help="write a GIF of trial 0 of each suite's first N tasks")
    p.add_argument("--replan", type=int, default=REPLAN, help="actions executed per chunk (protocol: 5)")
    p.add_argument("--max-steps", type=int, default=None, help="policy steps per episode (default: the suite's "
                   "protocol limit; fewer only for smoke tests)")
    p.add_argument("--images", default=None, help="with --run: comma-separated camera keys the policy reads "
                   f"(default: {libero_io.IMAGE},{libero_io.WRIST})")
    p.add_argument("--resolution", type=int, default=RESOLUTION, help="camera resolution LIBERO renders at")
    p.add_argument("--seed", type=int, default=ENV_SEED, help="LIBERO's environment seed")
    p.add_argument("--policy-seed", type=int, default=0, help="with --run: seed of the policy's noise")
    args = p.parse_args(argv)
    suites = args.suites.split(",")
    if any(s not in SUITES for s in suites):
        raise SystemExit(f"--suites: choose from {', '.join(SUITES)}, got {args.suites}")
    tasks = [int(t) for t in args.tasks.split(",")] if args.tasks else list(range(10))
    if any(not 0 <= t < 10 for t in tasks) or args.trials < 1 or args.batch < 1 or args.replan < 1:
        raise SystemExit("--tasks must lie in 0..9, --trials, --batch and --replan be >= 1")
    if args.server:
        policy = RemotePolicy(args.server)
    else:
        m = serve.MAPPINGS["libero"]
        m = serve.Mapping(tuple(args.images.split(",")), m.state, m.prompt, m.actions) if args.images else m
        try:
            policy = LocalPolicy(args.run, m, args.policy_seed)
        except (OSError, ValueError) as e:
            raise SystemExit(str(e)) from None
    meta = policy.metadata
    if meta.get("action_horizon", args.replan) < args.replan:
        raise SystemExit(f"the policy's chunks hold {meta['action_horizon']} actions, fewer than --replan "
                         f"{args.replan}")
    if args.server and meta.get("history", 1) > 1 and meta.get("history_stride") != args.replan:
        print(f"note: the run was trained on history frames {meta['history_stride']} steps apart; through a server it "
              f"sees one frame per request, {args.replan} steps apart", flush=True)
    results = Results(args.out, {"policy": meta.get("run", args.server), "server": bool(args.server),
                                 "replan": args.replan, "max_steps": args.max_steps, "resolution": args.resolution,
                                 "seed": args.seed, "policy_seed": None if args.server else args.policy_seed})
    for suite in suites:
        for n, task_id in enumerate(tasks):
            evaluate_task(policy, results, suite, task_id, args, video=n < args.videos)
    for suite, r in results.by_suite().items():
        print(f"\nlibero_{suite}:\n{r.summary()}")
    print(f"\nresults in {results.out / 'results.json'}")


if __name__ == "__main__":
    main()
