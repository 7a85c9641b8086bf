"""Load on `dlcli serve` from 127.0.0.1 only: CLIENTS concurrent httpx clients, each posting one MNIST test image
after another for SECONDS (then they stop by themselves), against the server with dynamic batching (--max-batch 64)
and without (--max-batch 1). Reports requests per second, p50/p99 latency and errors for each.

    DLCLI_DATA_DIR=../shared/datasets python bench/serve_load.py RUN_DIR [--clients 32] [--seconds 20]
"""
import argparse
import asyncio
import os
import sys
import time

import httpx
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from tests.test_serve import Server  # noqa: E402 (starts dlcli serve on a free loopback port, waits for /readyz)


async def load(url: str, images: list, clients: int, seconds: float) -> tuple[list[float], int]:
    latencies, errors = [], 0
    stop = time.perf_counter() + seconds

    async def client(i):
        nonlocal errors
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            k = i
            while time.perf_counter() < stop:
                start = time.perf_counter()
                r = await c.post("/v1/predict", json={"instances": [images[k % len(images)]]})
                latencies.append(time.perf_counter() - start)
                errors += r.status_code != 200
                k += clients

    await asyncio.gather(*[client(i) for i in range(clients)])
    return latencies, errors


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=20)
    args = parser.parse_args()
    from dlcli.data import load_dataset

    x = load_dataset({"type": "mnist", "test_limit": 256, "limit": 1, "normalize": False}).x_test
    images = [np.asarray(a, np.uint8).tolist() for a in x[:256]]  # raw pixels: the server scales them
    for name, flags in (("batching on (--max-batch 64)", ["--max-batch", "64"]),
                        ("batching off (--max-batch 1)", ["--max-batch", "1", "--max-delay-ms", "0"])):
        server = Server(args.run_dir, *flags)
        try:
            latencies, errors = asyncio.run(load(server.url, images, args.clients, args.seconds))
        finally:
            server.stop()
        ms = np.percentile(latencies, [50, 99]) * 1000
        print(f"{name}: {len(latencies) / args.seconds:.0f} requests/s, p50 {ms[0]:.1f} ms, p99 {ms[1]:.1f} ms, "
              f"{errors} errors ({len(latencies)} requests, {args.clients} clients, {args.seconds:g} s)")


if __name__ == "__main__":
    main()
