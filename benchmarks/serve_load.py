"""The policy server on localhost (serve.py, LIBERO's mapping): one client's round trip per request (batch 1), then
N clients at once with batching (--max-batch N) and without (--max-batch 1): requests per second, latency
percentiles, the batches formed. Clients send LIBERO-shaped observations (two 224x224 cameras, 8-D state).

    python benchmarks/serve_load.py --run RUN --clients 8 --requests 50

Numbers only, no assertions (tests/test_serve.py checks the answers).
"""
import argparse
import os
import sys
import threading
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import openpi_wire  # noqa: E402
import serve  # noqa: E402
from sample import VAMPolicy  # noqa: E402


def observation(rng, prompt):
    return {"observation/image": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
            "observation/wrist_image": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
            "observation/state": rng.uniform(-1, 1, 8), "prompt": prompt}


def load(run, clients, requests, max_batch, prompt):
    """(wall seconds, per-request latencies, batch sizes) of `clients` clients sending `requests` requests each."""
    policy, _ = VAMPolicy.load(run, seed=0)
    server = serve.PolicyServer(serve.ServedPolicy(policy, serve.MAPPINGS["libero"]), "127.0.0.1", 0, max_batch,
                                log=lambda _: None).start()
    latencies, sizes = [], []

    def client(c):
        conn, rng = openpi_wire.Client(f"127.0.0.1:{server.port}"), np.random.default_rng(c)
        conn.infer(observation(rng, prompt))       # warm-up, not counted
        barrier.wait()
        for _ in range(requests):
            start = time.perf_counter()
            answer = conn.infer(observation(rng, prompt))
            latencies.append(time.perf_counter() - start)
            sizes.append(answer["server_timing"]["batch_size"])
        conn.close()
    barrier = threading.Barrier(clients + 1)
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    server.stop()
    return wall, np.array(latencies), np.array(sizes)


def report(label, clients, requests, wall, latencies, sizes):
    p50, p90, p99 = np.percentile(latencies, [50, 90, 99]) * 1e3
    print(f"{label:34s} {clients * requests / wall:7.1f} req/s   latency p50 {p50:6.1f} ms  p90 {p90:6.1f}  p99 "
          f"{p99:6.1f}   mean batch {sizes.mean():.2f}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a train.py run with LIBERO's shapes")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=50, help="requests per client")
    ap.add_argument("--prompt", default="open the middle drawer of the cabinet")
    args = ap.parse_args()
    report("1 client (batch 1)", 1, args.requests, *load(args.run, 1, args.requests, 1, args.prompt))
    for max_batch in (args.clients, 1):
        report(f"{args.clients} clients, --max-batch {max_batch}", args.clients, args.requests,
               *load(args.run, args.clients, args.requests, max_batch, args.prompt))


if __name__ == "__main__":
    main()
