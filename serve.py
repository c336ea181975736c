"""A policy server that openpi's clients can talk to: any trained run (sample.VAMPolicy) behind openpi's websocket
protocol, several clients at once, their requests batched into one policy call.

    python serve.py --run out/libero                    # LIBERO's keys (openpi's LIBERO client), port 8000
    python serve.py --run out/world --mapping single    # one camera, the run's own actions
    curl http://localhost:8000/healthz                  # 200 OK while it serves

The protocol (openpi's websocket_policy_server and openpi_client, whose wire format openpi_wire.py implements):
  - one websocket per client, no compression, no message size limit; GET /healthz answers 200 "OK".
  - On connect the server sends one metadata dict: the run, the keys it reads, H_o, H_a, the action dimension.
  - Each binary message is an observation dict, answered with {"actions": (H_a, A) float32, "server_timing":
    {"infer_ms": the policy call, "wait_ms": queued before it, "batch_size", "batch": the call's serial number, "row":
    this request's row in it, "prev_total_ms": the previous request's time in the server}}.
  - {"__ctrl__": "episode_start"} (newer openpi clients send it before each episode) starts a new episode: the
    connection's frame history is cleared; answered {"__ack__": "episode_start"}. "episode_end" is acknowledged the
    same way, any other control {"__ack__": "ignored"}. A new connection is a new episode too.
  - A request the server cannot serve (a missing key, a wrong shape or dtype, a frame that is not msgpack) is answered
    by a text message "error: ..." naming the problem (openpi's clients raise it); the connection stays open and its
    history unchanged, and every other client is served as before.

History. The server sees a frame only when asked for a chunk, so each connection's history holds the frames of its
last H_o requests, the first one repeated before the episode's start (data.history_indices' padding): with a client
that replans every r steps, the policy sees frames r steps apart, as a run trained with --history_stride r expects.

Batching. One worker thread runs the policy; every request that arrives while it is busy waits, and the next call
takes all of them (up to --max-batch) as one batch. A lone client is never delayed to wait for company.

Not here: the wire format and a client (openpi_wire.py), LIBERO's conventions (libero_io.py), the LIBERO harness
(libero_eval.py).
"""
import argparse
import asyncio
import concurrent.futures
import http
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass

import numpy as np
import websockets
import websockets.asyncio.server

import libero_io
import openpi_wire


class BadRequest(ValueError):
    """A request this server cannot serve; its message names the problem."""

# ----------------------------------------------------------------------------- observations in, actions out


@dataclass(frozen=True)
class Mapping:
    """Which observation keys feed the policy, and what its chunks become in the environment's action space."""
    images: tuple         # camera keys, side by side (left to right) in the policy's frame, each (H, W / n)
    state: str            # the policy's proprioception
    prompt: str           # the instruction
    actions: str          # "as-is" | "relative6d" (10-D relative 6D -> LIBERO's 7-D) | "auto" (by the run's action dim)


MAPPINGS = {
    "libero": Mapping((libero_io.IMAGE, libero_io.WRIST), libero_io.STATE, libero_io.PROMPT, "auto"),
    "single": Mapping((libero_io.IMAGE,), libero_io.STATE, libero_io.PROMPT, "as-is"),
}
ACTIONS = ("as-is", "relative6d", "auto")


class ServedPolicy:
    """A VAMPolicy behind a Mapping: openpi observation dicts in, the environment's action chunks out. The server's
    core without the network; libero_eval.py runs the same code in process."""

    def __init__(self, policy, mapping, name=""):
        self.policy, self.name = policy, name
        self.frame_shape, self.history = tuple(policy.frame_shape), policy.spec.history
        self.state_dim, self.action_dim = policy.decoder.cfg.proprio_dim, policy.decoder.cfg.action_dim
        H, W, _ = self.frame_shape
        if W % len(mapping.images):
            raise ValueError(f"the run's frames are {H}x{W}: they do not split into {len(mapping.images)} cameras "
                             f"side by side")
        actions = mapping.actions
        if actions == "auto":
            actions = {libero_io.ACTION_DIM: "as-is", libero_io.RELATIVE6D_DIM: "relative6d"}.get(self.action_dim)
            if actions is None:
                raise ValueError(f"LIBERO takes 7-D actions (or 10-D relative 6D ones to convert); this run's are "
                                 f"{self.action_dim}-D: serve it with --mapping single")
        if actions == "relative6d" and (self.action_dim, self.state_dim) != (10, libero_io.STATE_DIM):
            raise ValueError(f"relative 6D actions need a run with 10-D actions and LIBERO's 8-D state, this one has "
                             f"{self.action_dim}-D actions and {self.state_dim}-D proprioception")
        self.mapping = Mapping(mapping.images, mapping.state, mapping.prompt, actions)
        self.env_action_dim = libero_io.ACTION_DIM if actions == "relative6d" else self.action_dim

    def metadata(self):
        m, spec = self.mapping, self.policy.spec
        return {"server": "mimic-video", "run": self.name, "images": list(m.images), "state": m.state,
                "prompt": m.prompt, "actions": m.actions, "frame_shape": list(self.frame_shape),
                "history": spec.history, "history_stride": spec.history_stride, "action_horizon": spec.horizon,
                "action_dim": self.env_action_dim, "state_dim": self.state_dim}

    def frame(self, images):
        """The policy's frame: the cameras side by side, each resized with padding to (H, W / n)."""
        H, W, _ = self.frame_shape
        return np.concatenate([libero_io.resize_with_pad(im, H, W // len(images)) for im in images], axis=1)

    def read(self, obs):
        """(frame, state, prompt) of one observation dict, checked: BadRequest names what is wrong."""
        if not isinstance(obs, dict):
            raise BadRequest(f"a request is a dict of observation keys, got {type(obs).__name__}")
        m = self.mapping
        missing = [k for k in (*m.images, m.state, m.prompt) if k not in obs]
        if missing:
            raise BadRequest(f"missing key(s) {missing}; this server reads {[*m.images, m.state, m.prompt]}")
        C = self.frame_shape[2]
        for key in m.images:
            im = obs[key]
            if not isinstance(im, np.ndarray) or im.ndim != 3 or im.shape[2] != C or im.dtype != np.uint8 or \
                    0 in im.shape:
                raise BadRequest(f"{key} must be an (H, W, {C}) uint8 image, got {_describe(im)}")
        state = obs[m.state]
        state = np.asarray(state) if isinstance(state, (list, np.ndarray)) else state
        if not isinstance(state, np.ndarray) or state.shape != (self.state_dim,) or state.dtype.kind not in "iuf":
            raise BadRequest(f"{m.state} must be ({self.state_dim},) numbers (this run's proprioception), got "
                             f"{_describe(obs[m.state])}")
        if not np.isfinite(state).all():
            raise BadRequest(f"{m.state} holds non-finite values: {state.tolist()}")
        if not isinstance(obs[m.prompt], str):
            raise BadRequest(f"{m.prompt} must be a string, got {_describe(obs[m.prompt])}")
        return self.frame([obs[k] for k in m.images]), state.astype(np.float64), obs[m.prompt]

    def act(self, histories, prompts, states):
        """(N, H_o, H, W, C) uint8 frames, N prompts, (N, P) states -> N chunks (H_a, A_env) float32."""
        chunks = self.policy.act_batch(histories, list(prompts), np.asarray(states, dtype=np.float32))
        if self.mapping.actions == "relative6d":
            chunks = [libero_io.relative6d_to_libero(c, s) for c, s in zip(chunks, states)]
        return [np.asarray(c, dtype=np.float32) for c in chunks]


def _describe(x):
    if isinstance(x, np.ndarray):
        return f"an array of shape {x.shape} and dtype {x.dtype}"
    return f"a {type(x).__name__}"


class Session:
    """One connection's episode: the frames of its last H_o requests."""

    def __init__(self, history):
        self.frames = deque(maxlen=history)

    def window(self, frame):
        """The H_o frames the policy sees if `frame` is the newest; the first frame repeats before the start."""
        past = list(self.frames) or [frame] * self.frames.maxlen
        return np.stack((past + [frame])[-self.frames.maxlen:])

    def push(self, frame):
        if not self.frames:
            self.frames.extend([frame] * (self.frames.maxlen - 1))
        self.frames.append(frame)

# ----------------------------------------------------------------------------- the server


@dataclass
class _Pending:
    window: np.ndarray
    prompt: str
    state: np.ndarray
    arrived: float
    future: asyncio.Future


class PolicyServer:
    """openpi's protocol over a ServedPolicy (module docstring). serve() runs it in the current event loop;
    start() runs it in a background thread and returns once it listens (tests, benchmarks)."""

    def __init__(self, served, host="0.0.0.0", port=8000, max_batch=8, log=print):
        self.served, self.host, self.port, self.max_batch, self.log = served, host, port, max_batch, log
        self.worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="policy")
        self.calls = 0
        self._connections = 0

    async def serve(self, started=None):
        self.queue = asyncio.Queue()
        batcher = asyncio.create_task(self._batcher())
        async with websockets.asyncio.server.serve(self._connection, self.host, self.port, compression=None,
                                                   max_size=None, process_request=_health) as server:
            self.port = server.sockets[0].getsockname()[1]
            self._stop = asyncio.get_running_loop().create_future()
            if started:
                started()
            await self._stop
        batcher.cancel()

    def start(self):
        ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self.serve(ready.set)), daemon=True)
        self._thread.start()
        if not ready.wait(60):
            raise RuntimeError("the policy server did not start within 60 s")
        return self

    def stop(self):
        loop = self._stop.get_loop()
        loop.call_soon_threadsafe(lambda: self._stop.done() or self._stop.set_result(None))
        self._thread.join(10)

    async def _connection(self, ws):
        self._connections += 1
        who = f"client {self._connections} ({ws.remote_address[0]})"
        self.log(f"{who}: connected")
        session, prev_total = Session(self.served.history), None
        await ws.send(openpi_wire.pack(self.served.metadata()))
        try:
            async for message in ws:
                start = time.monotonic()
                try:
                    reply = await self._answer(session, message, prev_total)
                except BadRequest as e:
                    self.log(f"{who}: error: {e}")
                    await ws.send(f"error: {e}")
                    continue
                await ws.send(openpi_wire.pack(reply))
                prev_total = (time.monotonic() - start) * 1e3
        except websockets.ConnectionClosed:
            pass
        self.log(f"{who}: disconnected")

    async def _answer(self, session, message, prev_total):
        if isinstance(message, str):
            raise BadRequest("expected a binary msgpack message, got a text message")
        try:
            obs = openpi_wire.unpack(message)
        except Exception as e:   # msgpack's and numpy's many exception types: all mean "not a valid message"
            raise BadRequest(f"not a valid msgpack message ({type(e).__name__}{': ' if str(e) else ''}{e})") from None
        if isinstance(obs, dict) and "__ctrl__" in obs:
            if obs["__ctrl__"] == "episode_start":
                session.frames.clear()
            return {"__ack__": obs["__ctrl__"] if obs["__ctrl__"] in ("episode_start", "episode_end") else "ignored"}
        frame, state, prompt = self.served.read(obs)
        pending = _Pending(session.window(frame), prompt, state, time.monotonic(),
                           asyncio.get_running_loop().create_future())
        await self.queue.put(pending)
        actions, timing = await pending.future
        session.push(frame)
        if prev_total is not None:
            timing["prev_total_ms"] = prev_total
        return {"actions": actions, "server_timing": timing}

    async def _batcher(self):
        """Forever: take every waiting request (up to max_batch), run them as one policy call in the worker."""
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            while len(batch) < self.max_batch and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            results = await loop.run_in_executor(self.worker, self._run, batch)
            for pending, result in zip(batch, results):
                if not pending.future.done():
                    if isinstance(result, Exception):
                        pending.future.set_exception(result)
                    else:
                        pending.future.set_result(result)

    def _run(self, batch):
        """One policy call on the batch (worker thread); if it fails, each request alone, so that only the one at
        fault gets the error."""
        start, self.calls = time.monotonic(), self.calls + 1
        try:
            chunks = self.served.act(np.stack([p.window for p in batch]), [p.prompt for p in batch],
                                     np.stack([p.state for p in batch]))
        except Exception as e:
            if len(batch) > 1:
                return [r for p in batch for r in self._run([p])]
            self.log(f"the policy failed on a request:\n{traceback.format_exc()}")
            return [BadRequest(f"the policy failed on this request: {type(e).__name__}: {e}")]
        infer_ms = (time.monotonic() - start) * 1e3
        return [(chunk, {"infer_ms": infer_ms, "wait_ms": (start - p.arrived) * 1e3, "batch_size": len(batch),
                         "batch": self.calls, "row": row}) for row, (p, chunk) in enumerate(zip(batch, chunks))]


def _health(connection, request):
    if request.path == "/healthz":
        return connection.respond(http.HTTPStatus.OK, "OK\n")
    return None

# ----------------------------------------------------------------------------- the command line


def main(argv=None):
    from sample import VAMPolicy   # torch and the models: only the server needs them, not the wire format
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="the train.py run directory (video and action checkpoints)")
    p.add_argument("--mapping", default="libero", choices=sorted(MAPPINGS),
                   help="observation keys and action conversion: libero (openpi's LIBERO client: two cameras, 8-D "
                        "state, 7-D or relative 6D actions) or single (one camera, the run's own actions)")
    p.add_argument("--images", default=None, help="comma-separated camera keys, overriding the mapping's")
    p.add_argument("--state", default=None, help="the state key, overriding the mapping's")
    p.add_argument("--prompt", default=None, help="the instruction key, overriding the mapping's")
    p.add_argument("--actions", default=None, choices=ACTIONS,
                   help="as-is, relative6d (10-D relative 6D -> LIBERO's 7-D commands) or auto (by the run's "
                        "action dimension), overriding the mapping's")
    p.add_argument("--host", default="0.0.0.0", help="interface to listen on (0.0.0.0: all)")
    p.add_argument("--port", type=int, default=8000, help="port (openpi's default 8000; 0: any free port)")
    p.add_argument("--max-batch", type=int, default=8, help="most requests in one policy call (1: no batching)")
    p.add_argument("--seed", type=int, default=0, help="seed of the policy's noise")
    p.add_argument("--device", default="cpu", help="torch device of the policy")
    args = p.parse_args(argv)
    if args.max_batch < 1:
        raise SystemExit(f"--max-batch must be >= 1, got {args.max_batch}")
    m = MAPPINGS[args.mapping]
    m = Mapping(tuple(args.images.split(",")) if args.images else m.images, args.state or m.state,
                args.prompt or m.prompt, args.actions or m.actions)
    try:
        policy, _ = VAMPolicy.load(args.run, args.device, seed=args.seed)
        served = ServedPolicy(policy, m, name=str(args.run))
    except (OSError, ValueError) as e:
        raise SystemExit(str(e)) from None
    meta = served.metadata()
    server = PolicyServer(served, args.host, args.port, args.max_batch, log=lambda s: print(s, flush=True))

    def started():
        print(f"serving {args.run} on ws://{args.host}:{server.port} (health: /healthz): reads "
              f"{[*m.images, m.state, m.prompt]}, frames {meta['frame_shape']}, H_o {meta['history']}, answers "
              f"({meta['action_horizon']}, {meta['action_dim']}) actions ({meta['actions']}); batches of up to "
              f"{args.max_batch}", flush=True)
        if meta["history"] > 1:
            print(f"note: the run was trained on history frames {meta['history_stride']} steps apart; the server "
                  f"holds one frame per request, so a client should replan every {meta['history_stride']} steps",
                  flush=True)
    try:
        asyncio.run(server.serve(started))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
