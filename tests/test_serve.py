"""serve.py and openpi_wire.py: openpi's protocol on localhost, spoken by a client written here from the protocol
facts (openpi's own client runs in tests/test_libero.py): the metadata, actions equal to the in-process policy's, the
history and its reset, bad requests answered while every other client is served, 8 clients x 50 requests at once."""
import re
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import msgpack
import numpy as np
import pytest
import websockets.sync.client

import libero_io
import openpi_wire
import serve
import tiny_runs
from sample import VAMPolicy

ROOT = Path(__file__).resolve().parent.parent

# ----------------------------------------------------------------------------- openpi's wire format, from the facts


def pack(obj):
    """openpi's msgpack_numpy: an array is {b"__ndarray__": True, b"data", b"dtype": dtype.str, b"shape"}."""
    def default(o):
        return {b"__ndarray__": True, b"data": o.tobytes(), b"dtype": o.dtype.str, b"shape": o.shape}
    return msgpack.packb(obj, default=default)


def unpack(message):
    def hook(d):
        if b"__ndarray__" in d:
            return np.ndarray(buffer=d[b"data"], dtype=np.dtype(d[b"dtype"]), shape=d[b"shape"])
        return d
    return msgpack.unpackb(message, object_hook=hook)


class Raw:
    """A client from the protocol facts: a websocket, no compression, no size limit, metadata first."""

    def __init__(self, port):
        connect = websockets.sync.client.connect(f"ws://127.0.0.1:{port}", compression=None, max_size=None)
        self.ws = connect.__enter__()            # closed when the test's server stops
        self.metadata = unpack(self.ws.recv())

    def ask(self, message):
        self.ws.send(message)
        reply = self.ws.recv(timeout=60)
        return reply if isinstance(reply, str) else unpack(reply)


def obs(rng, prompt=tiny_runs.INSTRUCTIONS[0], size=224):
    return {"observation/image": rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
            "observation/wrist_image": rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
            "observation/state": rng.uniform(-1, 1, 8), "prompt": prompt}


def frame(o):
    """The policy frame the server documents: the two cameras resized to 32x32 each, side by side."""
    return np.concatenate([libero_io.resize_with_pad(o[k], 32, 32) for k in ("observation/image",
                                                                            "observation/wrist_image")], axis=1)


@pytest.fixture
def server(libero_run):
    servers = []

    def start(seed=0, max_batch=8):
        policy, _ = VAMPolicy.load(libero_run, seed=seed)
        s = serve.PolicyServer(serve.ServedPolicy(policy, serve.MAPPINGS["libero"], "tiny"), "127.0.0.1", 0,
                               max_batch, log=lambda _: None).start()
        servers.append(s)
        return s
    yield start
    for s in servers:
        s.stop()


def test_the_wire_format_is_openpis():
    rng = np.random.default_rng(0)
    message = {"image": rng.integers(0, 256, (4, 5, 3), dtype=np.uint8), "state": rng.normal(size=8),
               "nested": {"ids": np.arange(3, dtype=np.int32), "flag": np.array([True, False])}, "prompt": "hi"}
    assert openpi_wire.pack(message) == pack(message)        # byte for byte
    back = openpi_wire.unpack(pack(message))
    for key in ("image", "state"):
        np.testing.assert_array_equal(back[key], message[key])
        assert back[key].dtype == message[key].dtype
    np.testing.assert_array_equal(back["nested"]["ids"], message["nested"]["ids"])
    assert openpi_wire.unpack(openpi_wire.pack(np.float32(1.5))) == np.float32(1.5)
    with pytest.raises(TypeError, match="cannot send"):
        openpi_wire.pack(np.array([object()]))


def test_metadata_then_the_in_process_policys_actions_with_history_and_reset(server, libero_run):
    port = server(seed=0).port
    client = Raw(port)
    assert {k: client.metadata[k] for k in ("images", "state", "prompt", "actions", "history", "history_stride",
                                            "action_horizon", "action_dim", "frame_shape")} == {
        "images": ["observation/image", "observation/wrist_image"], "state": "observation/state", "prompt": "prompt",
        "actions": "as-is", "history": 2, "history_stride": 5, "action_horizon": 8, "action_dim": 7,
        "frame_shape": [32, 64, 3]}
    rng = np.random.default_rng(1)
    A, B, C, D = (obs(rng) for _ in range(4))
    answers = [client.ask(pack(o)) for o in (A, B, C)]
    assert client.ask(pack({"__ctrl__": "episode_start", "__task__": "x"})) == {"__ack__": "episode_start"}
    answers.append(client.ask(pack(D)))
    policy, _ = VAMPolicy.load(libero_run, seed=0)              # the same seed, the same calls in the same order
    for answer, (older, newer) in zip(answers, [(A, A), (A, B), (B, C), (D, D)]):
        expected = policy.act(np.stack([frame(older), frame(newer)]), newer["prompt"], newer["observation/state"])
        assert answer["actions"].shape == (8, 7) and answer["actions"].dtype == np.float32
        np.testing.assert_array_equal(answer["actions"], expected)
        assert answer["server_timing"]["batch_size"] == 1 and answer["server_timing"]["infer_ms"] > 0
    assert "prev_total_ms" in answers[1]["server_timing"]


BAD = [  # (what is sent, what the error must say)
    (lambda o: {k: v for k, v in o.items() if k != "observation/state"}, r"missing key\(s\) \['observation/state'\]"),
    (lambda o: {**o, "observation/image": o["observation/image"][..., 0]}, r"observation/image must be an \(H, W, 3\) "
                                                                           r"uint8 image, got .*shape \(224, 224\)"),
    (lambda o: {**o, "observation/wrist_image": o["observation/wrist_image"].astype(np.float32)},
     r"wrist_image .*float32"),
    (lambda o: {**o, "observation/state": np.zeros(7)}, r"observation/state must be \(8,\) numbers.*shape \(7,\)"),
    (lambda o: {**o, "observation/state": "up"}, r"observation/state must be \(8,\) numbers.*a str"),
    (lambda o: {**o, "observation/state": np.full(8, np.nan)}, r"non-finite"),
    (lambda o: {**o, "prompt": 3}, r"prompt must be a string"),
    (lambda o: {**o, "prompt": " ".join(["word"] * 40)}, r"the policy failed on this request.*40 words"),
    (lambda o: [1, 2], r"a request is a dict"),
]


@pytest.mark.parametrize("i", range(len(BAD)))
def test_a_bad_request_gets_its_error_and_everyone_is_still_served(server, i):
    port = server().port
    rng = np.random.default_rng(2)
    bad, other = Raw(port), Raw(port)
    make, expected = BAD[i]
    reply = bad.ask(pack(make(obs(rng))))
    assert isinstance(reply, str) and reply.startswith("error: ") and re.search(expected, reply), reply
    assert bad.ask(pack(obs(rng)))["actions"].shape == (8, 7)        # the same connection, still open
    assert other.ask(pack(obs(rng)))["actions"].shape == (8, 7)      # and any other client


def test_frames_that_are_not_msgpack_or_not_arrays_get_their_error(server):
    port = server().port
    client = Raw(port)
    array = {b"__ndarray__": True, b"data": b"\x00" * 10, b"dtype": "<f8", b"shape": [8]}
    for message, expected in [(b"\xc1 not msgpack", "not a valid msgpack message"),
                              ("a text frame", "expected a binary msgpack message"),
                              (msgpack.packb({"observation/state": array}), "needs 64 bytes, the message holds 10"),
                              (msgpack.packb({"x": {**array, b"dtype": "|O"}}), "dtype object are not accepted")]:
        reply = client.ask(message)
        assert isinstance(reply, str) and expected in reply, reply
    assert Raw(port).ask(pack(obs(np.random.default_rng(3))))["actions"].shape == (8, 7)


def test_a_batch_with_a_failing_request_fails_only_that_one(libero_run):
    policy, _ = VAMPolicy.load(libero_run, seed=0)
    served = serve.ServedPolicy(policy, serve.MAPPINGS["libero"])
    rng = np.random.default_rng(4)
    good, bad = (served.read(obs(rng, prompt=p)) for p in (tiny_runs.INSTRUCTIONS[1], "word " * 40))
    batch = [serve._Pending(np.stack([f, f]), prompt, state, time.monotonic(), None)
             for f, state, prompt in (good, bad)]
    results = serve.PolicyServer(served, log=lambda _: None)._run(batch)
    assert results[0][0].shape == (8, 7) and isinstance(results[1], serve.BadRequest) and "40 words" in str(results[1])


def test_healthz(server):
    with urllib.request.urlopen(f"http://127.0.0.1:{server().port}/healthz", timeout=10) as r:
        assert r.status == 200 and r.read() == b"OK\n"


def test_8_clients_by_50_requests_at_once_are_each_answered_correctly(server, libero_run, capsys):
    n_clients, n_requests = 8, 50
    srv = server(seed=5)
    sent = [[obs(np.random.default_rng([c, r]), tiny_runs.INSTRUCTIONS[c % 2]) for r in range(n_requests)]
            for c in range(n_clients)]
    answers, latencies, errors = [[None] * n_requests for _ in range(n_clients)], [], []

    def client(c):
        try:
            conn = openpi_wire.Client(f"127.0.0.1:{srv.port}")
            for r in range(n_requests):
                start = time.perf_counter()
                answers[c][r] = conn.infer(sent[c][r])
                latencies.append(time.perf_counter() - start)
        except Exception as e:   # any failure is counted, and fails the test below
            errors.append(repr(e))
    threads = [threading.Thread(target=client, args=(c,)) for c in range(n_clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    assert errors == []
    # Correct: replay the server's batches, as it formed them, through the same policy in process
    batches = {}
    for c in range(n_clients):
        for r, a in enumerate(answers[c]):
            batches.setdefault(a["server_timing"]["batch"], []).append((a["server_timing"]["row"], c, r))
    policy, _ = VAMPolicy.load(libero_run, seed=5)
    for key in sorted(batches):
        rows = sorted(batches[key])
        assert [row for row, _, _ in rows] == list(range(len(rows)))
        windows = np.stack([[frame(sent[c][max(r - 1, 0)]), frame(sent[c][r])] for _, c, r in rows])
        expected = policy.act_batch(windows, [sent[c][r]["prompt"] for _, c, r in rows],
                                    np.stack([sent[c][r]["observation/state"] for _, c, r in rows]))
        for (_, c, r), e in zip(rows, expected):
            np.testing.assert_array_equal(answers[c][r]["actions"], e)
    sizes = [len(rows) for rows in batches.values()]
    with capsys.disabled():
        print(f"\n[serve load test] {n_clients} clients x {n_requests} requests on 127.0.0.1: 0 errors, "
              f"{n_clients * n_requests / wall:.0f} requests/s, latency p50 {np.percentile(latencies, 50) * 1e3:.0f} ms"
              f", p99 {np.percentile(latencies, 99) * 1e3:.0f} ms; {len(sizes)} policy calls, mean batch "
              f"{np.mean(sizes):.1f}")


def test_relative_6d_runs_are_converted_to_libero_commands(tmp_path, libero_run):
    run = tiny_runs.train_tiny_run(tmp_path, action_dim=10)
    policy, _ = VAMPolicy.load(run, seed=0)
    served = serve.ServedPolicy(policy, serve.MAPPINGS["libero"])
    assert served.mapping.actions == "relative6d" and served.metadata()["action_dim"] == 7
    frame_, state, prompt = served.read(obs(np.random.default_rng(6)))
    got = served.act(np.stack([[frame_, frame_]]), [prompt], state[None])[0]
    reference, _ = VAMPolicy.load(run, seed=0)
    chunk = reference.act(np.stack([frame_, frame_]), prompt, state)
    assert got.shape == (8, 7) and got.dtype == np.float32
    np.testing.assert_allclose(got, libero_io.relative6d_to_libero(chunk, state), rtol=1e-6, atol=1e-6)
    seven, _ = VAMPolicy.load(libero_run)
    with pytest.raises(ValueError, match="relative 6D actions need a run with 10-D actions"):
        serve.ServedPolicy(seven, serve.Mapping(("observation/image",), "observation/state", "prompt", "relative6d"))


@pytest.fixture(scope="module")
def world_run(tmp_path_factory):
    """A smoke run of the built-in world (32x32 frames, 3-D proprio and actions): not LIBERO-shaped."""
    tmp = tmp_path_factory.mktemp("world")
    proc = subprocess.run([sys.executable, "train.py", "--preset", "smoke", "--world_data", str(tmp / "data"), "--out",
                           str(tmp / "run"), "--threads", "1"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return tmp / "run"


def test_the_command_serves_any_run(world_run):
    command = [sys.executable, "serve.py", "--run", str(world_run)]
    refused = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "serve it with --mapping single" in refused.stderr
    help_ = subprocess.run([*command, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120).stdout
    assert all(flag in help_ for flag in ("--mapping", "--images", "--actions", "--max-batch", "/healthz"))
    proc = subprocess.Popen([*command, "--mapping", "single", "--host", "127.0.0.1", "--port", "0"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:          # the first line that says where it listens, after any warnings
            if line.startswith("serving"):
                break
        port = int(re.search(r"ws://127\.0\.0\.1:(\d+)", line).group(1))
        client = openpi_wire.Client(f"127.0.0.1:{port}")
        assert client.metadata["frame_shape"] == [32, 32, 3] and client.metadata["images"] == ["observation/image"]
        rng = np.random.default_rng(7)
        answer = client.infer({"observation/image": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
                               "observation/state": np.zeros(3, np.float32), "prompt": "pick up the green block"})
        assert answer["actions"].shape == (16, 3)
        with pytest.raises(openpi_wire.ServerError, match=r"observation/state must be \(3,\) numbers"):
            client.infer({"observation/image": np.zeros((32, 32, 3), np.uint8), "observation/state": np.zeros(8),
                          "prompt": "pick up the green block"})
    finally:
        proc.terminate()
        proc.wait(30)
