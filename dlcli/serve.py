"""`dlcli serve`: a trained run behind HTTP (FastAPI + uvicorn, the `serve` extra) with dynamic batching.

Requests are preprocessed as `dlcli predict` preprocesses files (dlcli.data.inputs.instance_inputs), queued, and run
as one model batch (up to max_batch instances, waiting at most max_delay seconds for more) on one worker thread, so
the event loop keeps accepting; each caller gets its own rows back. /metrics is Prometheus' text format.
"""
import asyncio
import gc
import hmac
import json
import queue
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dlcli import run_files
from dlcli.engine import blas
from dlcli.errors import DlcliError, require

MAX_BODY_BYTES = 16 * 2**20  # larger bodies get 413 before they are parsed
MAX_INSTANCES = 1024  # per request: larger requests get 413 naming the limit (the client splits them)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
INLINE_BYTES, INLINE_INSTANCES = 32 * 2**10, 16  # requests up to this size skip the thread pool (one MNIST image
# as JSON is ~3 KiB and takes 0.1 ms to preprocess; a thread hop costs more)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Histogram:
    """A Prometheus histogram: cumulative bucket counts, sum and count."""

    def __init__(self, buckets):
        self.buckets, self.counts, self.sum, self.count = tuple(buckets), [0] * len(buckets), 0.0, 0

    def observe(self, value: float):
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{b:g}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        return out + [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum:.6f}",
                      f"{name}_count {self.count}"]


@dataclass
class Metrics:
    requests: dict = field(default_factory=dict)  # (path, status code) -> count
    latency: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    batch_size: Histogram = field(default_factory=lambda: Histogram(BATCH_BUCKETS))
    queued: int = 0  # instances given to the batcher (counted on the event loop)
    taken: int = 0  # instances the batcher took into batches (counted on its thread)

    def count(self, path: str, status: int):
        self.requests[path, status] = self.requests.get((path, status), 0) + 1

    def text(self) -> str:
        """Prometheus' text exposition format (version 0.0.4)."""
        lines = ["# HELP dlcli_requests_total HTTP requests answered, by path and status code.",
                 "# TYPE dlcli_requests_total counter"]
        lines += [f'dlcli_requests_total{{path="{p}",code="{c}"}} {n}' for (p, c), n in sorted(self.requests.items())]
        errors = sum(n for (_, c), n in self.requests.items() if c >= 400)
        lines += ["# HELP dlcli_request_errors_total Requests answered with a 4xx or 5xx status.",
                  "# TYPE dlcli_request_errors_total counter", f"dlcli_request_errors_total {errors}",
                  "# HELP dlcli_predict_latency_seconds Time from receiving a prediction request to its answer.",
                  "# TYPE dlcli_predict_latency_seconds histogram", *self.latency.lines("dlcli_predict_latency_seconds"),
                  "# HELP dlcli_batch_size Instances in each model batch the batcher ran.",
                  "# TYPE dlcli_batch_size histogram", *self.batch_size.lines("dlcli_batch_size"),
                  "# HELP dlcli_queue_depth Instances waiting for the next batch.",
                  "# TYPE dlcli_queue_depth gauge", f"dlcli_queue_depth {self.queued - self.taken}"]
        return "\n".join(lines) + "\n"


@dataclass
class _Job:
    inputs: list  # model-ready arrays, one per model input, `size` rows each
    size: int
    future: asyncio.Future
    arrived: float  # time.monotonic() when queued


class Batcher:
    """Dynamic batching on one worker thread: it takes queued jobs from the head while they fit in `max_batch` rows,
    waiting for company until `max_delay` after the oldest job arrived (so jobs that queued while the previous batch
    ran go at once), runs them as one model call, and hands all the answers back to the event loop in one callback.
    A job larger than max_batch runs alone (requests are capped at MAX_INSTANCES).

    The event loop's share per request is a queue put and a future: no batching task, timers or thread hop per
    request, which cost more event-loop time than the model's share of a batch."""

    def __init__(self, run, max_batch: int, max_delay: float, metrics: Metrics):
        self.run, self.max_batch, self.max_delay, self.metrics = run, max_batch, max_delay, metrics
        self.loop = asyncio.get_running_loop()
        self.jobs = queue.SimpleQueue()  # _Job, or None: stop after the jobs before it
        self.worker = threading.Thread(target=self._work, name="dlcli-model", daemon=True)
        self.worker.start()

    def submit(self, inputs: list, size: int) -> asyncio.Future:
        """A future of the model's outputs for these rows (called on the event loop)."""
        job = _Job(inputs, size, self.loop.create_future(), time.monotonic())
        self.metrics.queued += size
        self.jobs.put(job)
        return job.future

    def _batch(self, first: _Job) -> tuple[list[_Job], _Job | None]:
        """`first` and the jobs behind it that fit, and what comes next: the job that did not fit (it heads the
        next batch), None when the queue said stop, False for nothing yet."""
        jobs, rows = [first], first.size
        deadline = first.arrived + self.max_delay
        while rows < self.max_batch:
            left = deadline - time.monotonic()
            try:  # past the deadline, only what is already queued joins
                job = self.jobs.get(timeout=left) if left > 0 else self.jobs.get_nowait()
            except queue.Empty:
                return jobs, False
            if job is None or rows + job.size > self.max_batch:
                return jobs, job
            jobs.append(job)
            rows += job.size
        return jobs, False

    def _work(self):
        head = self.jobs.get()
        while head is not None:
            jobs, head = self._batch(head)
            rows = sum(j.size for j in jobs)
            self.metrics.taken += rows
            try:
                inputs = jobs[0].inputs if len(jobs) == 1 else \
                    [np.concatenate([j.inputs[i] for j in jobs]) for i in range(len(jobs[0].inputs))]
                result = self.run(inputs)
            except Exception as e:  # the model failed on this batch: every caller in it hears why
                result = e
            self.loop.call_soon_threadsafe(self._answer, jobs, rows, result)
            if head is False:
                head = self.jobs.get()

    def _answer(self, jobs: list[_Job], rows: int, outputs):
        """On the event loop: each caller's own rows (or the batch's exception)."""
        self.metrics.batch_size.observe(rows)
        start = 0
        for j in jobs:
            if not j.future.done():  # a caller that went away has a cancelled future
                if isinstance(outputs, Exception):
                    j.future.set_exception(outputs)
                else:
                    j.future.set_result([o[start:start + j.size] for o in outputs])
            start += j.size

    def close(self):
        """Finish the jobs queued so far, then stop the worker."""
        self.jobs.put(None)
        self.worker.join()


class ServedRun:
    """A run's model loaded once: preprocessing (`inputs`) and prediction (`predict`, on the worker thread)."""

    def __init__(self, run_dir, weights: str = "best"):
        import dlcli
        from dlcli import fingerprint
        from dlcli.data.dataset import dataset_type
        from dlcli.experiment import load_run_model
        from dlcli.prediction import class_names, probabilities

        self.run_dir = Path(run_dir)
        try:
            self.config, self.model = load_run_model(run_dir, weights)
        except DlcliError as e:
            raise DlcliError(e.message, exit_code=2) from None
        self.data = dict(self.config.data)
        self.dataset = dataset_type(self.data)
        vocabulary = run_files.RunDir(self.run_dir).vocabulary
        self.vocabulary = run_files.read_json(vocabulary) if vocabulary.is_file() else None  # a text run's
        self.pass_rows = self.model._inference_rows()  # a pass larger than this leaves the cache
        self.heads = []  # per output: (name, class names or None)
        for name, tensor in zip(self.model.output_names, self.model.outputs):
            width = int(np.prod(tensor.shape)) if tensor.shape else 1
            # probabilities() decides from the activation and output width, on one row of zeros of that shape
            is_classifier = probabilities(tensor, np.zeros((1, *tensor.shape), np.float32)) is not None
            count = 2 if is_classifier and width == 1 else width
            self.heads.append((name, class_names(run_dir, self.config, count) if is_classifier else None))
        self.info = {
            "name": self.model.name, "run": self.run_dir.name, "weights": weights,
            "data": self.data.get("type"), "kind": self.kind(),
            "inputs": [{"name": n, "shape": list(t.shape)} for n, t in zip(self.model.input_names, self.model.inputs)],
            "outputs": [{"name": n, "shape": list(t.shape), "classes": c}
                        for (n, c), t in zip(self.heads, self.model.outputs)],
            "config_fingerprint": fingerprint.record(self.config.to_dict())["config_fingerprint"],
            "dlcli_version": dlcli.__version__,
        }
        if self.kind() == "table":
            from dlcli.data.table import read_state

            from dlcli.data.features import describe

            state = read_state(self.run_dir)
            what = {name: text for name, text, _ in describe(state)}
            # the page's form: one field per column, a choice list where the vocabulary is short
            self.info["features"] = [{"name": n, "type": f["type"], "preprocessing": what[n],
                                      "values": f.get("vocabulary") if len(f.get("vocabulary", ())) <= 50 else None}
                                     for n, f in state["features"].items()]

    def kind(self) -> str:
        """What instances look like: table rows, texts, images or arrays (what the page offers)."""
        if self.dataset.rows:
            return "table"
        if self.vocabulary is not None:
            return "text"
        shape = tuple(self.model.inputs[0].shape)
        return "image" if len(self.model.inputs) == 1 and (self.dataset.pictures or len(shape) == 3 and shape[2] in (1, 3)) \
            else "array"

    def inputs(self, instances: list, invert: bool = False) -> list[np.ndarray]:
        from dlcli.data.inputs import instance_inputs

        return instance_inputs(instances, self.run_dir, self.data, self.model, invert, vocabulary=self.vocabulary)

    def predict(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        """The outputs for one batch of model-ready inputs, in passes of up to pass_rows rows one after another on
        one BLAS thread: the event loop needs the other core, and Model.predict's lanes for a batch of 17-64 rows
        (a graph replica and a thread pool per call) and its set-up cost more than they saved on a served batch."""
        from dlcli.engine.graph import inference_passes

        size, step = len(inputs[0]), self.pass_rows
        passes = [[x[i:i + step] for x in inputs] for i in range(0, size, step)]
        with blas.one_thread():  # so inference_passes runs the passes in turn
            outs = list(inference_passes(self.model.graph, passes))
        return outs[0] if len(outs) == 1 else [np.concatenate(o) for o in zip(*outs)]

    def answer(self, outputs: list[np.ndarray], top_k: int) -> list[dict]:
        """One JSON object per instance: label, probabilities and top-k (classes by name) for a classifier head,
        values otherwise; `outputs` by output name when the model has several."""
        from dlcli.prediction import probabilities

        per_output = []
        for (name, classes), tensor, values in zip(self.heads, self.model.outputs, outputs):
            probs = probabilities(tensor, values)
            if probs is None:
                per_output.append([{"values": v.tolist()} for v in values])
                continue
            order = np.argsort(-probs, axis=1, kind="stable")[:, :top_k]
            per_output.append([{"label": classes[idx[0]], "probabilities": [float(p) for p in row],
                                "top_k": [{"label": classes[i], "index": int(i), "probability": float(row[i])}
                                          for i in idx]} for row, idx in zip(probs, order)])
        if len(per_output) == 1:
            return per_output[0]
        return [{"outputs": {name: rows[i] for (name, _), rows in zip(self.heads, per_output)}}
                for i in range(len(per_output[0]))]


def create_app(served: ServedRun, max_batch: int = 64, max_delay: float = 0.005, api_key: str | None = None):
    """The ASGI application around a loaded run: POST /v1/predict as a plain ASGI handler (the hot path: FastAPI's
    routing, dependency solving and its seven middleware layers cost more per request than the model's share of a
    batch), the other routes on FastAPI, and the Guard in front of both."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI
    from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse

    metrics = Metrics()
    state = {"batcher": None}

    @asynccontextmanager
    async def lifespan(app):
        state["batcher"] = Batcher(served.predict, max_batch, max_delay, metrics)
        gc.collect()
        gc.freeze()  # the loaded model and libraries are never garbage: full collections skip them
        yield
        state["batcher"].close()

    app = FastAPI(title=f"dlcli serve {served.info['name']}", version=served.info["dlcli_version"],
                  lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    def error(status: int, message: str):
        return JSONResponse({"error": message}, status_code=status)

    @app.get("/v1/model")
    async def model_info():
        return served.info

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        if state["batcher"] is None:
            return error(503, "the model is not loaded yet")
        return {"status": "ready", "model": served.info["name"]}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.text(), media_type="text/plain; version=0.0.4")

    @app.get("/")
    async def page():
        from dlcli.serve_page import render

        return HTMLResponse(render(served.info))

    return Guard(app, Predictor(served, state, metrics), metrics, api_key)


class Predictor:
    """POST /v1/predict as a plain ASGI handler: JSON (or a multipart/form-data upload) in, each request's
    instances preprocessed as `dlcli predict` does, queued for the batcher, answered as JSON. Returns the status."""

    def __init__(self, served: ServedRun, state: dict, metrics: Metrics):
        self.served, self.state, self.metrics = served, state, metrics

    async def __call__(self, scope, receive, send) -> int:
        started = time.perf_counter()
        if scope["method"] != "POST":
            return await respond(send, 405, {"error": "use POST for /v1/predict"}, [(b"allow", b"POST")])
        body = await read_body(receive)
        if body is None:  # a chunked body without Content-Length
            return await respond(send, 413, {"error": f"request body over the limit of {MAX_BODY_BYTES:,} bytes"})
        if dict(scope["headers"]).get(b"content-type", b"").startswith(b"multipart/form-data"):
            payload = await uploaded(scope, body)
            if isinstance(payload, str):
                return await respond(send, 400, {"error": payload})
        else:
            try:
                payload = parse_json(body)
            except (ValueError, UnicodeDecodeError) as e:
                return await respond(send, 400, {"error": f"the body is not JSON ({e})"})
        if not isinstance(payload, dict) or "instances" not in payload:
            return await respond(send, 422, {"error": 'expected a JSON object {"instances": [...]}'})
        instances = payload["instances"]
        top_k = payload.get("top_k", 3)
        if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
            return await respond(send, 422, {"error": f"top_k must be a positive integer; found {top_k!r}"})
        if isinstance(instances, list) and len(instances) > MAX_INSTANCES:
            return await respond(send, 413, {"error": f"{len(instances):,} instances in one request; the limit is "
                                                      f"{MAX_INSTANCES:,} (split the request)"})
        # a small body is cheaper to handle on the event loop than to hand to a thread and back
        small = len(body) <= INLINE_BYTES and isinstance(instances, list) and len(instances) <= INLINE_INSTANCES
        try:
            invert = bool(payload.get("invert", False))
            inputs = self.served.inputs(instances, invert) if small else \
                await asyncio.to_thread(self.served.inputs, instances, invert)
        except DlcliError as e:
            return await respond(send, 422, {"error": e.message})
        outputs = await self.state["batcher"].submit(inputs, len(inputs[0]))
        answer = self.served.answer(outputs, top_k) if small else \
            await asyncio.to_thread(self.served.answer, outputs, top_k)
        latency = time.perf_counter() - started
        self.metrics.latency.observe(latency)
        return await respond(send, 200, {"predictions": answer, "model": self.served.info["name"],
                                         "latency_ms": round(latency * 1000, 3)})


async def read_body(receive) -> bytes | None:
    """The request body, or None once it passes MAX_BODY_BYTES (the Guard refuses a larger Content-Length before
    this; a chunked body is counted as it comes)."""
    chunks, size = [], 0
    while True:
        event = await receive()
        if event["type"] == "http.disconnect":
            return b""  # the client went away: whatever is answered goes nowhere
        chunk = event.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return None
        chunks.append(chunk)
        if not event.get("more_body", False):
            return b"".join(chunks)


async def uploaded(scope, body: bytes) -> dict | str:
    """A multipart/form-data upload as a payload: every file field is one image instance (its bytes); form fields
    top_k and invert as in JSON. A string says what is wrong."""
    from starlette.requests import Request

    async def replay():
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(scope, replay).form(max_files=MAX_INSTANCES)
    except Exception as e:  # python-multipart's parse errors have no common base class in Starlette's API
        return f"not a valid multipart/form-data body ({e})"
    files = [await v.read() for _, v in form.multi_items() if not isinstance(v, str)]
    if not files:
        return "a multipart/form-data request needs at least one file field (an image)"
    payload = {"instances": files, "invert": form.get("invert", "") in ("1", "true", "on")}
    if form.get("top_k"):
        payload["top_k"] = int(form["top_k"]) if form["top_k"].isdigit() else form["top_k"]
    return payload


def parse_json(body: bytes):
    """orjson (the serve extra; 4-5x faster than the standard library on an image's nested lists), or where it
    refuses, the standard library, which also reads NaN and Infinity, so that they are named as such (422)."""
    import orjson

    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return json.loads(body)


async def respond(send, status: int, content, headers=()) -> int:
    """A JSON response (orjson: UTF-8, compact, NaN as null); returns the status."""
    import orjson

    body = orjson.dumps(content)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body)),
                            *headers]})
    await send({"type": "http.response.body", "body": body})
    return status


KNOWN_PATHS = ("/", "/v1/predict", "/v1/model", "/healthz", "/readyz", "/metrics")


class Guard:
    """In front of every request: the API key, the body size limit (from Content-Length, before the body is read)
    and the request count by path and status; then /v1/predict to its handler and the rest to FastAPI. Plain ASGI:
    Starlette's BaseHTTPMiddleware runs each request through an extra task and stream, which cost more server
    time per small request than the model's share of a batch."""

    def __init__(self, app, predict: Predictor, metrics: Metrics, api_key: str | None):
        self.app, self.predict, self.metrics = app, predict, metrics
        self.key = None if api_key is None else api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"] if scope["path"] in KNOWN_PATHS else "other"  # bounded label values
        headers = dict(scope["headers"])
        status = 500
        if self.key is not None and scope["path"].startswith("/v1/"):
            given = headers.get(b"x-api-key") or headers.get(b"authorization", b"").removeprefix(b"Bearer ")
            if not hmac.compare_digest(given, self.key):
                status = 401
                message = "missing or wrong API key (send it as the X-API-Key header)"
        length = headers.get(b"content-length", b"")
        if status == 500 and length.isdigit() and int(length) > MAX_BODY_BYTES:
            status = 413
            message = f"request body of {int(length):,} bytes; the limit is {MAX_BODY_BYTES:,}"
        if status != 500:
            self.metrics.count(path, await respond(send, status, {"error": message}))
            return
        if path == "/v1/predict":
            try:
                status = await self.predict(scope, receive, send)
            finally:
                self.metrics.count(path, status)
            return

        async def counted(event):
            nonlocal status
            if event["type"] == "http.response.start":
                status = event["status"]
            await send(event)

        try:
            await self.app(scope, receive, counted)
        finally:
            self.metrics.count(path, status)


def serve(run_dir, host: str = "127.0.0.1", port: int = 8000, weights: str = "best", max_batch: int = 64,
          max_delay_ms: float = 5.0, api_key: str | None = None, log=print):
    """Load the run (a bad run: DlcliError, exit 2) and serve it until SIGTERM / Ctrl-C, which stop accepting,
    finish the requests in flight and return."""
    require("fastapi", "serve", "dlcli serve")
    require("orjson", "serve", "dlcli serve")
    uvicorn = require("uvicorn", "serve", "dlcli serve")
    if max_batch < 1 or max_delay_ms < 0:
        raise DlcliError("--max-batch must be at least 1 and --max-delay-ms at least 0", exit_code=2)
    served = ServedRun(run_dir, weights)
    app = create_app(served, max_batch, max_delay_ms / 1000, api_key)
    log(f"serving {served.info['name']} ({served.run_dir}, {weights} weights) on http://{host}:{port}/ "
        f"(max batch {max_batch}, max delay {max_delay_ms:g} ms)")
    # no access log (a log line per request) and no proxy headers (nothing sits in front of a loopback server)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                                           proxy_headers=False, timeout_graceful_shutdown=30))
    # uvicorn stops gracefully on SIGTERM / SIGINT, then raises the signal again for the handler it found; a no-op
    # one there makes a finished graceful stop exit 0 (the contract) instead of dying of the signal
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not server.started:  # e.g. the port is taken: uvicorn has logged why
        raise DlcliError(f"could not listen on {host}:{port}", exit_code=1)
