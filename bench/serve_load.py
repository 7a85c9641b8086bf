"""Load on `dlcli serve` from 127.0.0.1 only: CLIENTS concurrent clients, each posting one MNIST test image after
another for SECONDS (then they stop by themselves), against two servers of the same run: dynamic batching on
(--max-batch 64) and off (--max-batch 1). The modes take turns for ROUNDS rounds, so a machine shared with other
work loads both alike. Printed per mode: requests per second, p50/p99 latency, errors, the mean batch, the server's
CPU time per request split into its event-loop thread (HTTP, JSON, preprocessing, answers) and its other threads
(the model), the clients' own CPU time per request, and the load average. Then the event loop's parts measured
in-process on the same run: JSON decoding, preprocessing, the answer and its encoding, and the model's time per
image at batch 1 and at the mean batch.

The clients speak HTTP/1.1 on asyncio streams, one keep-alive connection each: httpx spent about 2 ms of CPU per
request here, more than the server it measured, and on 2 cores the client's CPU is the server's loss.

    DLCLI_DATA_DIR=../shared/datasets python bench/serve_load.py RUN_DIR [--clients 32] [--seconds 20] [--rounds 2]
"""
import argparse
import asyncio
import json
import os
import re
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from tests.test_serve import Server  # noqa: E402 (starts dlcli serve on a free loopback port, waits for /readyz)

MODES = {"batching on": ["--max-batch", "64"], "batching off": ["--max-batch", "1", "--max-delay-ms", "0"]}


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


def cpu_seconds(pid: int) -> tuple[float, float]:
    """User + system CPU time so far of a process' main thread (the server's event loop) and of its other threads
    (the model worker, BLAS; ended threads included), from Linux /proc."""
    def seconds(stat: str) -> float:
        fields = open(stat).read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    main = seconds(f"/proc/{pid}/task/{pid}/stat")
    return main, seconds(f"/proc/{pid}/stat") - main


def mean_batch(port: int) -> tuple[float, float]:
    """The batch-size histogram's sum and count from /metrics."""
    import httpx

    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    return tuple(float(re.search(rf"^dlcli_batch_size_{k} (\S+)$", text, re.M).group(1)) for k in ("sum", "count"))


def measured(port, pid, bodies, clients, seconds) -> dict:
    server, batches, wall, client = cpu_seconds(pid), mean_batch(port), time.perf_counter(), time.process_time()
    latencies, errors = asyncio.run(load(port, bodies, clients, seconds))
    client = time.process_time() - client
    wall = time.perf_counter() - wall
    server = [b - a for a, b in zip(server, cpu_seconds(pid))]
    batches = [b - a for a, b in zip(batches, mean_batch(port))]
    return {"latencies": latencies, "errors": errors, "seconds": wall, "loop": server[0], "model": server[1],
            "client": client, "rows": batches[0], "batches": batches[1]}


def report(name: str, rounds: list[dict], clients: int):
    n = sum(len(r["latencies"]) for r in rounds)
    ms = np.percentile([x for r in rounds for x in r["latencies"]], [50, 99]) * 1000
    per = {k: sum(r[k] for r in rounds) / n * 1000 for k in ("loop", "model", "client")}
    rate = n / sum(r["seconds"] for r in rounds)
    print(f"{name}: {rate:.0f} requests/s, p50 {ms[0]:.1f} ms, p99 {ms[1]:.1f} ms, "
          f"{sum(r['errors'] for r in rounds)} errors in {n} requests ({clients} clients); mean batch "
          f"{sum(r['rows'] for r in rounds) / max(sum(r['batches'] for r in rounds), 1):.1f}; server CPU "
          f"{per['loop'] + per['model']:.2f} ms per request (event loop {per['loop']:.2f}, model thread "
          f"{per['model']:.2f}); clients' CPU {per['client']:.2f} ms per request", flush=True)
    return rate


def parts(run_dir, bodies: list[bytes], batch: int):
    """The event loop's work per request measured in-process on the same run (median of many), and the model's."""
    import orjson

    from dlcli.engine import blas
    from dlcli.serve import ServedRun, parse_json

    served = ServedRun(run_dir)

    def per_call(f, n=300):
        times = []
        for _ in range(n):
            start = time.thread_time()
            f()
            times.append(time.thread_time() - start)
        return float(np.median(times)) * 1000

    payload = json.loads(bodies[0])
    inputs = served.inputs(payload["instances"])
    outputs = served.predict(inputs)
    answer = served.answer(outputs, 3)
    many = [np.concatenate([inputs[0]] * batch)]
    with blas.one_thread():
        model = {b: per_call(lambda: served.predict(x), 100) / b for b, x in ((1, inputs), (batch, many))}
    print(f"parts per request: JSON decode {per_call(lambda: parse_json(bodies[0])):.3f} ms, preprocessing "
          f"{per_call(lambda: served.inputs(payload['instances'])):.3f} ms, answer "
          f"{per_call(lambda: served.answer(outputs, 3)):.3f} ms, JSON encode "
          f"{per_call(lambda: orjson.dumps({'predictions': answer})):.3f} ms; "
          f"model per image {model[1]:.3f} ms at batch 1, {model[batch]:.3f} ms at batch {batch} (one BLAS "
          f"thread, as served)", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=20, help="per mode, split over the rounds")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    from dlcli.data import load_dataset

    x = load_dataset({"type": "mnist", "test_limit": 256, "limit": 1, "normalize": False}).x_test
    # raw pixels: the server scales them
    bodies = [json.dumps({"instances": [np.asarray(a, np.uint8).tolist()]}).encode() for a in x[:256]]
    print(f"load average at the start: {' '.join(f'{v:.1f}' for v in os.getloadavg())} on {os.cpu_count()} cores",
          flush=True)
    servers = {name: Server(args.run_dir, *flags) for name, flags in MODES.items()}
    rounds = {name: [] for name in MODES}
    try:
        for s in servers.values():
            asyncio.run(load(s.port, bodies, args.clients, 1.0))  # warm-up: connections, first batches
        for i in range(args.rounds):
            for name in (MODES if i % 2 == 0 else reversed(MODES)):  # on, off, off, on, ...
                s = servers[name]
                rounds[name].append(measured(s.port, s.process.pid, bodies, args.clients, args.seconds / args.rounds))
    finally:
        for s in servers.values():
            s.stop()
    rates = {name: report(name, r, args.clients) for name, r in rounds.items()}
    print(f"batching on / off: {rates['batching on'] / rates['batching off']:.2f}x; load average at the end: "
          f"{' '.join(f'{v:.1f}' for v in os.getloadavg())}", flush=True)
    on = rounds["batching on"]
    parts(args.run_dir, bodies, max(round(sum(r["rows"] for r in on) / max(sum(r["batches"] for r in on), 1)), 1))


if __name__ == "__main__":
    main()
