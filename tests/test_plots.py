import struct

import pytest
from typer.testing import CliRunner

from dlcli.cli import app
from dlcli.plots import curves_png, figure_pixels, grid, quantities
from tests.runs_fixture import train_tiny

runner = CliRunner()


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's signature and IHDR chunk."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    return struct.unpack(">II", data[16:24])


def test_quantities_fold_validation_and_skip_bookkeeping():
    rows = [{"epoch": 1, "accuracy": 0.5, "loss": 1.0, "val_loss": 1.1, "val_accuracy": 0.4, "val_auc": 0.6,
             "learning_rate": 0.1, "seconds": 2.0}]
    assert quantities(rows) == ["loss", "accuracy", "auc"]
    assert grid(1) == (1, 1) and grid(3) == (1, 3) and grid(4) == (2, 3)


@pytest.mark.parametrize("count", [1, 2, 4])
def test_png_has_the_expected_pixel_size(count):
    names = ["loss", "accuracy", "auc", "precision"][:count]
    rows = [{"epoch": e, **{n: 1.0 / e for n in names}, **{f"val_{n}": 1.2 / e for n in names}} for e in (1, 2, 3)]
    assert png_size(curves_png([("a", rows), ("b", rows[:2])])) == figure_pixels(count)
    assert figure_pixels(2) == (960, 360)


def test_empty_history_still_makes_a_png():
    assert png_size(curves_png([("empty", [])])) == figure_pixels(1)


def test_every_run_writes_curves_and_plot_overlays_runs(tmp_path):
    a = train_tiny(tmp_path, runner, name="a")
    b = train_tiny(tmp_path, runner, name="b", epochs=3)
    assert png_size((a / "curves.png").read_bytes()) == figure_pixels(2)  # loss, accuracy
    out = tmp_path / "both.png"
    result = runner.invoke(app, ["plot", str(a), str(b), "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert png_size(out.read_bytes()) == figure_pixels(2)
    result = runner.invoke(app, ["plot", str(a), str(tmp_path / "nothing")])
    assert result.exit_code == 2 and "nothing is not a dlcli run directory (it does not exist)" in result.output
    result = runner.invoke(app, ["plot", str(a), "--output", str(tmp_path / "x.jpg")])
    assert result.exit_code == 1 and ".png" in result.output
