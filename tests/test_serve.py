"""dlcli serve against a real uvicorn server on 127.0.0.1 (a subprocess on a free port), with a tiny trained run:
answers equal `dlcli predict`'s on the same inputs, concurrent requests are batched and each caller gets its own
rows, bad input gets a 4xx naming the problem while the server keeps serving, SIGTERM finishes what is in flight."""
import asyncio
import base64
import io
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from typer.testing import CliRunner

from dlcli.cli import app
from tests.runs_fixture import CLASSES, train_text_run, train_tiny

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

runner = CliRunner()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train_tiny(tmp_path_factory.mktemp("serve"), runner)


@pytest.fixture(scope="module")
def samples(run):
    """12 float samples of the tiny run's (4, 4) input and what `dlcli predict` answers for them."""
    x = np.random.default_rng(7).normal(size=(12, 4, 4)).astype(np.float32)
    folder = run.parent.parent
    np.save(folder / "samples.npy", x)
    done = runner.invoke(app, ["predict", str(run), str(folder / "samples.npy"), "--output",
                               str(folder / "expected.npy")])
    assert done.exit_code == 0, done.output
    return x, np.load(folder / "expected.npy")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`dlcli serve` in a subprocess; ready once /readyz answers 200."""

    def __init__(self, run, *args, env=None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen([sys.executable, "-m", "dlcli.cli", "serve", str(run), "--port",
                                         str(self.port), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True, env={**os.environ, **(env or {})})
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"dlcli serve exited {self.process.returncode}: {self.process.stderr.read()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise AssertionError("dlcli serve did not become ready in 60 s")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=30)
        finally:
            if self.process.poll() is None:
                self.process.kill()


@pytest.fixture(scope="module")
def server(run):
    s = Server(run, "--max-delay-ms", "50", "--max-batch", "64")
    yield s
    assert s.stop() == 0


def predict(server, instances, **extra):
    return httpx.post(f"{server.url}/v1/predict", json={"instances": instances, **extra}, timeout=30)


def test_answers_are_dlcli_predicts(server, samples):
    x, expected = samples
    r = predict(server, x[:5].tolist(), top_k=2)
    assert r.status_code == 200, r.text
    answer = r.json()["predictions"]
    got = np.array([a["probabilities"] for a in answer])
    np.testing.assert_allclose(got, expected[:5], rtol=1e-5, atol=1e-6)
    for a, row in zip(answer, expected[:5]):
        order = np.argsort(-row, kind="stable")
        assert a["label"] == CLASSES[order[0]]
        assert [t["label"] for t in a["top_k"]] == [CLASSES[i] for i in order[:2]]


def test_model_health_and_metrics(server, run):
    info = httpx.get(f"{server.url}/v1/model").json()
    assert info["name"] == "tiny" and info["inputs"] == [{"name": info["inputs"][0]["name"], "shape": [4, 4]}]
    assert info["outputs"][0]["shape"] == [3] and info["outputs"][0]["classes"] == CLASSES
    assert info["config_fingerprint"].startswith("sha256:") and info["dlcli_version"]
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok"}
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("dlcli_requests_total", "dlcli_request_errors_total", "dlcli_predict_latency_seconds_bucket",
                 "dlcli_batch_size_bucket", "dlcli_queue_depth"):
        assert f"\n{name}" in text or text.startswith(name), name


def batch_counts(server) -> tuple[int, int]:
    """(batches of one instance, all batches) from the /metrics batch-size histogram."""
    text = httpx.get(f"{server.url}/metrics").text
    ones = int(re.search(r'^dlcli_batch_size_bucket\{le="1"\} (\d+)$', text, re.M).group(1))
    return ones, int(re.search(r"^dlcli_batch_size_count (\d+)$", text, re.M).group(1))


def test_concurrent_requests_are_batched_and_each_gets_its_own_rows(server, samples):
    x, expected = samples
    sizes = [1, 2, 1, 3, 1, 2, 1, 1]  # 12 rows over 8 callers, each a different slice
    starts = np.cumsum([0, *sizes[:-1]])
    ones_before, count_before = batch_counts(server)

    async def call_all():
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            return await asyncio.gather(*[client.post("/v1/predict", json={"instances": x[s:s + n].tolist()})
                                          for s, n in zip(starts, sizes)])

    answers = asyncio.run(call_all())
    for response, s, n in zip(answers, starts, sizes):
        assert response.status_code == 200, response.text
        got = np.array([a["probabilities"] for a in response.json()["predictions"]])
        np.testing.assert_allclose(got, expected[s:s + n], rtol=1e-5, atol=1e-6)
    ones, count = batch_counts(server)
    batches = count - count_before
    assert batches < len(sizes), f"{len(sizes)} concurrent requests ran as {batches} batches: none were batched"
    assert count - ones > count_before - ones_before  # a batch of more than one instance


def png_base64(pixels: np.ndarray) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_a_png_is_read_as_dlcli_predict_reads_the_file(server, run, tmp_path):
    pixels = np.random.default_rng(3).integers(0, 256, size=(4, 4), dtype=np.uint8)
    from PIL import Image

    Image.fromarray(pixels).save(tmp_path / "x.png")
    done = runner.invoke(app, ["predict", str(run), str(tmp_path / "x.png"), "--output", str(tmp_path / "p.npy")])
    assert done.exit_code == 0, done.output
    r = predict(server, [png_base64(pixels), {"b64": png_base64(pixels)}])
    assert r.status_code == 200, r.text
    got = np.array([a["probabilities"] for a in r.json()["predictions"]])
    np.testing.assert_allclose(got, np.repeat(np.load(tmp_path / "p.npy"), 2, axis=0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("body, status, reason", [
    (b'{"instances": [[1, 2', 400, "not JSON"),
    (b'{"rows": []}', 422, '"instances"'),
    (b'{"instances": [[1, 2, 3]]}', 422, "shape (4, 4)"),
    (b'{"instances": [[[1, 2, 3, 4], [1, 2]]]}', 422, "rectangular"),
    (b'{"instances": [[[NaN, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]]}', 422, "NaN"),
    (b'{"instances": [[["a", "b", "c", "d"]]]}', 422, "expected real numbers"),
    (b'{"instances": ["not base64!"]}', 422, "not base64"),
    (b'{"instances": ["' + base64.b64encode(b"GIF? no, plain text") + b'"]}', 422, "not an image"),
    (b'{"instances": []}', 422, "non-empty"),
    (b'{"instances": [[0]], "top_k": 0}', 422, "top_k"),
])
def test_bad_input_is_a_4xx_naming_the_problem(server, samples, body, status, reason):
    r = httpx.post(f"{server.url}/v1/predict", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert reason in r.json()["error"] and "\n" not in r.json()["error"]
    assert predict(server, samples[0][:1].tolist()).status_code == 200  # still serving


def test_too_many_instances_and_too_large_a_body_get_413(server):
    r = predict(server, [[[0.0] * 4] * 4] * 10_000)
    assert r.status_code == 413 and "limit is 1,024" in r.json()["error"]
    r = httpx.post(f"{server.url}/v1/predict", content=b" " * (17 * 2**20), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_a_png_decompression_bomb_is_refused(server):
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (20_000, 20_000)).save(buffer, format="PNG")  # 400 Mpixels: over Pillow's bomb limit x 2
    r = predict(server, [base64.b64encode(buffer.getvalue()).decode()])
    assert r.status_code == 422 and "decompression bomb" in r.json()["error"]


def test_api_key(run):
    s = Server(run, "--api-key-env", "DLCLI_TEST_KEY", env={"DLCLI_TEST_KEY": "s3cret"})
    try:
        assert httpx.get(f"{s.url}/v1/model").status_code == 401
        assert httpx.get(f"{s.url}/v1/model", headers={"X-API-Key": "wrong"}).status_code == 401
        assert httpx.get(f"{s.url}/v1/model", headers={"X-API-Key": "s3cret"}).status_code == 200
        assert httpx.get(f"{s.url}/v1/model", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert httpx.get(f"{s.url}/healthz").status_code == 200  # probes need no key
    finally:
        assert s.stop() == 0


def test_sigterm_finishes_the_request_in_flight_and_exits_0(run, samples):
    s = Server(run, "--max-delay-ms", "1500")  # the batcher holds the request 1.5 s waiting for company
    answers = []
    caller = threading.Thread(target=lambda: answers.append(predict(s, samples[0][:2].tolist())))
    caller.start()
    time.sleep(0.5)
    s.process.send_signal(signal.SIGTERM)
    caller.join(30)
    assert s.process.wait(timeout=30) == 0, s.process.stderr.read()
    assert answers and answers[0].status_code == 200, answers
    np.testing.assert_allclose([a["probabilities"] for a in answers[0].json()["predictions"]], samples[1][:2],
                               rtol=1e-5, atol=1e-6)


def test_a_bad_run_dir_or_an_edited_config_refuses_to_start(run, tmp_path):
    done = runner.invoke(app, ["serve", str(tmp_path / "nothing")])
    assert done.exit_code == 2 and "not a dlcli run directory" in done.output
    assert len(done.output.strip().splitlines()) == 1
    edited = tmp_path / "edited"
    import shutil

    shutil.copytree(run, edited)
    config = edited / "config.yaml"
    config.write_text(config.read_text().replace("units: 8", "units: 9"))
    done = runner.invoke(app, ["serve", str(edited)])
    assert done.exit_code == 2, done.output
    assert "edited" in done.output or "changed" in done.output or "units" in done.output


def test_a_missing_extra_names_the_pip_install(run, monkeypatch):
    monkeypatch.setitem(sys.modules, "fastapi", None)  # import fastapi raises ImportError
    done = runner.invoke(app, ["serve", str(run)])
    assert done.exit_code == 1 and "pip install 'dlcli[serve]'" in done.output  # as every missing extra
    assert len(done.output.strip().splitlines()) == 1


def test_the_page_is_self_contained(server):
    r = httpx.get(f"{server.url}/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    assert "<script>" in page and "v1/predict" in page and "tiny" in page
    assert not re.search(r'(src|href)="https?://', page)  # nothing from a CDN


def served_client(run):
    """The app in-process (FastAPI's TestClient runs its lifespan, so the batcher too)."""
    from fastapi.testclient import TestClient

    from dlcli.serve import ServedRun, create_app

    return TestClient(create_app(ServedRun(run), max_batch=8, max_delay=0.001))


def test_table_rows_by_column_name_as_dlcli_predict_reads_records(monkeypatch, tmp_path):
    import json

    import dlcli
    from tests.conftest import require_dataset

    folder = require_dataset("tables")
    monkeypatch.setenv("DLCLI_DATA_DIR", str(folder.parent))
    monkeypatch.setenv("DLCLI_CACHE_DIR", str(tmp_path / "cache"))
    configs = __import__("pathlib").Path(__file__).resolve().parents[1] / "configs"
    run = dlcli.train(configs / "penguins.yaml", ["train.epochs=2"], runs_dir=tmp_path / "runs", verbose=0).dir
    rows = [{"island": "Biscoe", "bill_length_mm": 48.6, "bill_depth_mm": 16.0, "flipper_length_mm": 230,
             "body_mass_g": 5800, "sex": "male", "year": 2009, "note": "ignored"},
            {"island": "Dream", "bill_length_mm": None, "bill_depth_mm": 18.1, "flipper_length_mm": 190,
             "body_mass_g": 3700, "sex": None, "year": 2008}]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    done = runner.invoke(app, ["predict", str(run), str(tmp_path / "rows.json"), "-o", str(tmp_path / "p.npy")])
    assert done.exit_code == 0, done.output
    with served_client(run) as client:
        info = client.get("/v1/model").json()
        assert info["kind"] == "table" and "island" in [f["name"] for f in info["features"]]
        r = client.post("/v1/predict", json={"instances": rows})
        assert r.status_code == 200, r.text
        got = np.array([a["probabilities"] for a in r.json()["predictions"]])
        np.testing.assert_allclose(got, np.load(tmp_path / "p.npy"), rtol=1e-5, atol=1e-6)
        assert {a["label"] for a in r.json()["predictions"]} <= {"Adelie", "Chinstrap", "Gentoo"}
        r = client.post("/v1/predict", json={"instances": [{k: v for k, v in rows[0].items() if k != "island"}]})
        assert r.status_code == 422 and "no column 'island'" in r.json()["error"]
        r = client.post("/v1/predict", json={"instances": [{**rows[0], "bill_depth_mm": "deep"}]})
        assert r.status_code == 422 and "bill_depth_mm" in r.json()["error"]
        assert 'INFO.kind === "table"' in client.get("/").text and '"name": "island"' in client.get("/").text


def test_texts_are_encoded_with_the_runs_vocabulary(tmp_path):
    from dlcli.data.text import encode_texts
    from dlcli.experiment import load_run_model

    run, vocabulary = train_text_run(tmp_path, runner)
    _, model = load_run_model(run)
    said = ["good great", "awful words never seen"]
    with served_client(run) as client:
        assert client.get("/v1/model").json()["kind"] == "text"
        r = client.post("/v1/predict", json={"instances": said})
        assert r.status_code == 200, r.text
        got = np.array([a["probabilities"] for a in r.json()["predictions"]])
        np.testing.assert_allclose(got, model.predict(encode_texts(said, vocabulary)), rtol=1e-6)
        r = client.post("/v1/predict", json={"instances": [[1, 2, 3, 4, 5]]})
        assert r.status_code == 422 and "expected a text" in r.json()["error"]
        assert 'INFO.kind === "text"' in client.get("/").text


def test_a_multipart_upload_is_read_as_the_same_image_in_json(server):
    pixels = np.random.default_rng(5).integers(0, 256, size=(4, 4), dtype=np.uint8)
    # a batch of two each way: BLAS may round a product's rows by their count (OpenBLAS's Haswell kernels do)
    as_json = predict(server, [png_base64(pixels)] * 2).json()["predictions"]
    files = [("file", ("a.png", base64.b64decode(png_base64(pixels)), "image/png"))] * 2
    r = httpx.post(f"{server.url}/v1/predict", files=files, data={"top_k": "2"})
    assert r.status_code == 200, r.text
    assert [a["probabilities"] for a in r.json()["predictions"]] == [a["probabilities"] for a in as_json]
    assert len(r.json()["predictions"][0]["top_k"]) == 2
    r = httpx.post(f"{server.url}/v1/predict", files=[("file", ("notes.txt", b"not an image", "text/plain"))])
    assert r.status_code == 422 and "instance 0: not an image" in r.json()["error"]


def test_an_image_is_resized_as_the_runs_training_images_were(tmp_path):
    """An image_folder run's interpolation and crop_to_aspect_ratio apply to served images too: a sent image
    becomes exactly what `dlcli predict` (the training decoder) makes of the same file."""
    from PIL import Image

    from dlcli import layers, models
    from dlcli.data.inputs import instance_inputs, read_inputs

    wide = np.random.default_rng(3).integers(0, 256, (12, 30), dtype=np.uint8)
    Image.fromarray(wide).save(tmp_path / "wide.png")
    model = models.Sequential([layers.Flatten(input_shape=(5, 5, 1)), layers.Dense(2)])
    model.build()
    data = {"type": "image_folder", "directory": str(tmp_path), "image_size": [5, 5], "color_mode": "grayscale",
            "interpolation": "nearest", "crop_to_aspect_ratio": True}
    sent = base64.b64encode((tmp_path / "wide.png").read_bytes()).decode()
    served = instance_inputs([sent], tmp_path, data, model)[0]
    predicted, _ = read_inputs([tmp_path / "wide.png"], tmp_path, data, model)
    np.testing.assert_array_equal(served, predicted.take(np.arange(1))[0])
    squeezed = instance_inputs([sent], tmp_path, {**data, "crop_to_aspect_ratio": False}, model)[0]
    assert not np.array_equal(served, squeezed)  # the crop matters for this image
