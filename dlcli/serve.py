"""`dlcli serve`: a trained run behind HTTP (FastAPI + uvicorn, the `serve` extra) with dynamic batching.

Requests are preprocessed as `dlcli predict` preprocesses files (dlcli.data.inputs.instance_inputs), queued, and run
as one model batch (up to max_batch instances, waiting at most max_delay seconds for more) on one worker thread, so
the event loop keeps accepting; each caller gets its own rows back. /metrics is Prometheus' text format.
"""
import asyncio
import hmac
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dlcli import runs
from dlcli.errors import DlcliError

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
    queue_depth: int = 0  # instances waiting for a batch

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
                  "# TYPE dlcli_queue_depth gauge", f"dlcli_queue_depth {self.queue_depth}"]
        return "\n".join(lines) + "\n"


@dataclass
class _Job:
    inputs: list  # model-ready arrays, one per model input, `size` rows each
    size: int
    future: asyncio.Future


class Batcher:
    """Dynamic batching: jobs queued by concurrent requests run as one model call of up to `max_batch` rows,
    collected for at most `max_delay` seconds after the first arrives; the model runs on one worker thread. A job
    larger than max_batch runs alone (requests are capped at MAX_INSTANCES)."""

    def __init__(self, run, max_batch: int, max_delay: float, metrics: Metrics):
        self.run, self.max_batch, self.max_delay, self.metrics = run, max_batch, max_delay, metrics
        self.queue: list[_Job] = []
        self.arrived = asyncio.Event()
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="dlcli-model")

    async def submit(self, inputs: list, size: int):
        job = _Job(inputs, size, asyncio.get_running_loop().create_future())
        self.queue.append(job)
        self.metrics.queue_depth += size
        self.arrived.set()
        return await job.future

    def _take(self) -> list[_Job]:
        """Jobs from the queue's head while they fit in max_batch (the first always)."""
        taken, rows = [], 0
        while self.queue and (not taken or rows + self.queue[0].size <= self.max_batch):
            job = self.queue.pop(0)
            taken.append(job)
            rows += job.size
        return taken

    async def loop(self):
        loop = asyncio.get_running_loop()
        while True:
            while not self.queue:
                self.arrived.clear()
                await self.arrived.wait()
            deadline = loop.time() + self.max_delay
            while sum(j.size for j in self.queue) < self.max_batch and (left := deadline - loop.time()) > 0:
                self.arrived.clear()
                try:
                    await asyncio.wait_for(self.arrived.wait(), left)
                except TimeoutError:
                    break
            jobs = self._take()
            rows = sum(j.size for j in jobs)
            self.metrics.queue_depth -= rows
            self.metrics.batch_size.observe(rows)
            inputs = [np.concatenate([j.inputs[i] for j in jobs]) for i in range(len(jobs[0].inputs))]
            try:
                outputs = await loop.run_in_executor(self.worker, self.run, inputs)
            except Exception as e:  # the model failed on this batch: every caller in it hears why
                for j in jobs:
                    if not j.future.done():
                        j.future.set_exception(e)
                continue
            start = 0
            for j in jobs:
                if not j.future.done():  # a caller that went away has a cancelled future
                    j.future.set_result([o[start:start + j.size] for o in outputs])
                start += j.size

    def close(self):
        self.worker.shutdown(wait=True)


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
        if runs.RunDir(self.run_dir).vocabulary.is_file():
            return "text"
        shape = tuple(self.model.inputs[0].shape)
        return "image" if len(self.model.inputs) == 1 and (self.dataset.pictures or len(shape) == 3 and shape[2] in (1, 3)) \
            else "array"

    def inputs(self, instances: list, invert: bool = False) -> list[np.ndarray]:
        import warnings

        from dlcli.data.inputs import instance_inputs

        with warnings.catch_warnings():  # predict's --invert hint is for files on a terminal, not a server log
            warnings.simplefilter("ignore")
            return instance_inputs(instances, self.run_dir, self.data, self.model, invert)

    def predict(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        preds = self.model.predict(inputs if len(inputs) > 1 else inputs[0], batch_size=len(inputs[0]))
        return preds if isinstance(preds, list) else [preds]

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
    """The FastAPI application around a loaded run."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
    from starlette.concurrency import run_in_threadpool

    metrics = Metrics()
    state = {"batcher": None}

    @asynccontextmanager
    async def lifespan(app):
        batcher = Batcher(served.predict, max_batch, max_delay, metrics)
        task = asyncio.create_task(batcher.loop())
        state["batcher"] = batcher
        yield
        task.cancel()
        batcher.close()

    app = FastAPI(title=f"dlcli serve {served.info['name']}", version=served.info["dlcli_version"],
                  lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Guard, metrics=metrics, api_key=api_key)

    def error(status: int, message: str):
        return JSONResponse({"error": message}, status_code=status)

    async def uploaded(request) -> dict | str:
        """A multipart/form-data upload as a payload: every file field is one image instance (its bytes); form
        fields top_k and invert as in JSON. A string says what is wrong."""
        try:
            form = await request.form(max_files=MAX_INSTANCES)
        except Exception as e:  # python-multipart's parse errors have no common base class in Starlette's API
            return f"not a valid multipart/form-data body ({e})"
        files = [await v.read() for _, v in form.multi_items() if not isinstance(v, str)]
        if not files:
            return "a multipart/form-data request needs at least one file field (an image)"
        payload = {"instances": files, "invert": form.get("invert", "") in ("1", "true", "on")}
        if form.get("top_k"):
            payload["top_k"] = int(form["top_k"]) if form["top_k"].isdigit() else form["top_k"]
        return payload

    @app.post("/v1/predict")
    async def predict(request: Request):
        from dlcli.data.image_folder import BadImage  # noqa: F401 (a DlcliError, answered like the others)

        started = time.perf_counter()
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:  # a chunked body without Content-Length
            return error(413, f"request body over the limit of {MAX_BODY_BYTES:,} bytes")
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            payload = await uploaded(request)
            if isinstance(payload, str):
                return error(400, payload)
        else:
            try:
                import json

                payload = json.loads(body)
            except (ValueError, UnicodeDecodeError) as e:
                return error(400, f"the body is not JSON ({e})")
        if not isinstance(payload, dict) or "instances" not in payload:
            return error(422, 'expected a JSON object {"instances": [...]}')
        instances = payload["instances"]
        top_k = payload.get("top_k", 3)
        if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
            return error(422, f"top_k must be a positive integer; found {top_k!r}")
        if isinstance(instances, list) and len(instances) > MAX_INSTANCES:
            return error(413, f"{len(instances):,} instances in one request; the limit is {MAX_INSTANCES:,} "
                              f"(split the request)")
        # a small body is cheaper to handle on the event loop than to hand to a thread and back
        small = len(body) <= INLINE_BYTES and isinstance(instances, list) and len(instances) <= INLINE_INSTANCES
        try:
            invert = bool(payload.get("invert", False))
            inputs = served.inputs(instances, invert) if small else \
                await run_in_threadpool(served.inputs, instances, invert)
        except DlcliError as e:
            return error(422, e.message)
        outputs = await state["batcher"].submit(inputs, len(inputs[0]))
        answer = served.answer(outputs, top_k) if small else await run_in_threadpool(served.answer, outputs, top_k)
        latency = time.perf_counter() - started
        metrics.latency.observe(latency)
        return JSONResponse({"predictions": answer, "model": served.info["name"],
                             "latency_ms": round(latency * 1000, 3)})

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

    return app


KNOWN_PATHS = ("/", "/v1/predict", "/v1/model", "/healthz", "/readyz", "/metrics")


class Guard:
    """The API key, the body size limit (from Content-Length, before the body is read) and the request count by
    path and status, as plain ASGI middleware: Starlette's BaseHTTPMiddleware runs each request through an extra task
    and stream, which cost more server time per small request than the model's share of a batch."""

    def __init__(self, app, metrics: Metrics, api_key: str | None):
        self.app, self.metrics, self.key = app, metrics, None if api_key is None else api_key.encode()

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
            from starlette.responses import JSONResponse

            self.metrics.count(path, status)
            return await JSONResponse({"error": message}, status_code=status)(scope, receive, send)

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
    from dlcli.interop import require

    require("fastapi", "serve")
    uvicorn = require("uvicorn", "serve")
    if max_batch < 1 or max_delay_ms < 0:
        raise DlcliError("--max-batch must be at least 1 and --max-delay-ms at least 0", exit_code=2)
    served = ServedRun(run_dir, weights)
    app = create_app(served, max_batch, max_delay_ms / 1000, api_key)
    log(f"serving {served.info['name']} ({served.run_dir}, {weights} weights) on http://{host}:{port}/ "
        f"(max batch {max_batch}, max delay {max_delay_ms:g} ms)")
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                           timeout_graceful_shutdown=30))
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
