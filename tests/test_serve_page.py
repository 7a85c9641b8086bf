"""The page of `dlcli serve` in a real browser: Debian's chromium (installed by .ci/run) driven by Playwright. A
stroke drawn on the canvas of a served MNIST run is sent, bars render, the top bar is the digit drawn, and the bars
are the labels the API gives for the canvas' own PNG. A screenshot is kept in the test's tmp_path."""
import os
import shutil

import httpx
import pytest
from typer.testing import CliRunner

from dlcli.cli import app
from tests.conftest import require_dataset
from tests.test_serve import Server

CHROMIUM = "/usr/bin/chromium"
pytest.importorskip("fastapi")
sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (it is in the test extra)")


@pytest.fixture(scope="module")
def mnist_run(tmp_path_factory):
    folder = require_dataset("mnist")
    out = tmp_path_factory.mktemp("page")
    configs = __import__("pathlib").Path(__file__).resolve().parents[1] / "configs"
    env = {"DLCLI_DATA_DIR": str(folder.parent)}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        done = CliRunner().invoke(app, ["train", str(configs / "mnist.yaml"), "--set", "train.epochs=1",
                                        "--set", "data.limit=3000", "--runs-dir", str(out), "-q"])
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    assert done.exit_code == 0, done.output
    return done.output.strip().splitlines()[-1]


@pytest.mark.slow  # a real chromium
def test_a_drawn_stroke_shows_top_k_bars(mnist_run, tmp_path):
    if not (os.path.exists(CHROMIUM) or shutil.which("chromium")):
        pytest.skip(f"no chromium at {CHROMIUM} (.ci/run installs Debian's package when run as root)")
    server = Server(mnist_run)
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
            page = browser.new_page(viewport={"width": 390, "height": 844})  # a phone-sized window
            offline = []
            page.on("request", lambda r: offline.append(r.url) if not r.url.startswith(server.url) else None)
            page.goto(server.url + "/")
            box = page.locator("#canvas").bounding_box()
            x, top, height = box["x"] + box["width"] / 2, box["y"], box["height"]
            page.mouse.move(x, top + 0.2 * height)
            page.mouse.down()
            for step in range(1, 11):  # a vertical stroke: a "1"
                page.mouse.move(x, top + (0.2 + 0.06 * step) * height)
            page.mouse.up()  # the page sends on pointerup
            page.wait_for_selector("#bars .bar")
            bars = page.locator("#bars .bar")
            assert bars.count() == 5  # top_k 5
            labels = [bars.nth(i).locator("span").inner_text() for i in range(5)]
            widths = [bars.nth(i).locator("div").bounding_box()["width"] for i in range(5)]
            assert widths == sorted(widths, reverse=True) and widths[0] > 0
            assert "latency" in page.locator("#latency").inner_text()
            png = page.evaluate("document.getElementById('canvas').toDataURL('image/png').split(',')[1]")
            page.screenshot(path=str(tmp_path / "page.png"))
            browser.close()
        answer = httpx.post(f"{server.url}/v1/predict", json={"instances": [png], "top_k": 5}).json()
        assert [t["label"] for t in answer["predictions"][0]["top_k"]] == labels
        assert labels[0] == "1"  # the stroke drawn is a one (0.81 against 0.05 for the runner-up, 6)
        assert not offline, f"the page fetched from elsewhere: {offline}"
    finally:
        assert server.stop() == 0
