"""Load on `dlcli serve` from 127.0.0.1 only: CLIENTS concurrent clients, each posting one MNIST test image after
another for SECONDS (then they stop by themselves), against the server with dynamic batching (--max-batch 64) and
without (--max-batch 1). Reports requests per second, p50/p99 latency, errors and the server's CPU time per request.

The clients speak HTTP/1.1 on asyncio streams, one keep-alive connection each: httpx spent about 2 ms of CPU per
request here, more than the server it measured (0.8 ms), and on 2 cores the client's CPU is the server's loss.

    DLCLI_DATA_DIR=../shared/datasets python bench/serve_load.py RUN_DIR [--clients 32] [--seconds 20]
"""
import argparse
import asyncio
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from tests.test_serve import Server  # noqa: E402 (starts dlcli serve on a free loopback port, waits for /readyz)


async def client(port: int, bodies: list[bytes], first: int, step: int, stop: float, latencies: list) -> int:
    """Post bodies[first], bodies[first + step], ... until `stop`; the count of answers that were not 200."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    errors, k = 0, first
    try:
        while time.perf_counter() < stop:
            body = bodies[k % len(bodies)]
            start = time.perf_counter()
            writer.write(b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - start)
            errors += not head.startswith(b"HTTP/1.1 200 ")
            k += step
    finally:
        writer.close()
    return errors


async def load(port: int, bodies: list[bytes], clients: int, seconds: float) -> tuple[list[float], int]:
    latencies, stop = [], time.perf_counter() + seconds
    errors = await asyncio.gather(*[client(port, bodies, i, clients, stop, latencies) for i in range(clients)])
    return latencies, sum(errors)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=20)
    args = parser.parse_args()
    from dlcli.data import load_dataset

    x = load_dataset({"type": "mnist", "test_limit": 256, "limit": 1, "normalize": False}).x_test
    # raw pixels: the server scales them
    bodies = [json.dumps({"instances": [np.asarray(a, np.uint8).tolist()]}).encode() for a in x[:256]]
    for name, flags in (("batching on (--max-batch 64)", ["--max-batch", "64"]),
                        ("batching off (--max-batch 1)", ["--max-batch", "1", "--max-delay-ms", "0"])):
        server = Server(args.run_dir, *flags)
        try:
            asyncio.run(load(server.port, bodies, args.clients, 1.0))  # warm-up: connections, first batches
            cpu = cpu_seconds(server.process.pid)
            latencies, errors = asyncio.run(load(server.port, bodies, args.clients, args.seconds))
            cpu = cpu_seconds(server.process.pid) - cpu
        finally:
            server.stop()
        ms = np.percentile(latencies, [50, 99]) * 1000
        print(f"{name}: {len(latencies) / args.seconds:.0f} requests/s, p50 {ms[0]:.1f} ms, p99 {ms[1]:.1f} ms, "
              f"{errors} errors, server CPU {cpu / len(latencies) * 1000:.2f} ms per request ({len(latencies)} "
              f"requests, {args.clients} clients, {args.seconds:g} s)", flush=True)


if __name__ == "__main__":
    main()
