"""How `dlcli train` talks to a person: the banner on a resume, the progress rate, a second Ctrl-C, --quiet's help,
plots without glyph warnings."""
import io
import signal
import time
import warnings

import pytest
from typer.testing import CliRunner

from dlcli.callbacks import ProgressLogger
from dlcli.cli import app
from dlcli.commands.train_output import StopOnSignal
from tests.runs_fixture import write_tiny_config

runner = CliRunner()


def test_the_resume_banner_names_the_run_and_its_config(tmp_path):
    config = write_tiny_config(tmp_path, epochs=1)
    first = runner.invoke(app, ["train", config, "--runs-dir", str(tmp_path / "runs"), "-q"])
    assert first.exit_code == 0, first.output
    run = first.output.strip().splitlines()[-1]
    result = runner.invoke(app, ["train", "--resume", run, "--set", "train.epochs=2", "--allow-config-change"],
                           env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    banner = " ".join(result.output.split())
    assert f"dlcli train --resume {run} (config {run}/config.yaml) -> {run}" in banner


def test_the_epoch_line_rate_is_the_bars_training_rate():
    stream = io.StringIO()
    progress = ProgressLogger(epochs=1, samples=200, stream=stream, bar=False)
    progress.on_epoch_begin(0)
    for _ in range(2):
        time.sleep(0.05)
        progress.on_train_batch_end(0, {"size": 100})
    training = progress.trained - progress.start
    progress.on_epoch_end(0, {"loss": 1.0, "seconds": 30.0})  # validation took most of the epoch
    rate = float(stream.getvalue().split("s, ")[1].split(" samples/s")[0].replace(",", ""))
    assert rate == pytest.approx(200 / training, rel=0.01) and rate > 200 / 30.0 * 10
    assert "samples/s training" in stream.getvalue()


class _Run:
    def __init__(self, tmp_path):
        self.dir, self.stopping, self.kfold_dir, self.world = tmp_path / "run", None, None, None
        self.position = {"epoch": 1, "batch": 7, "step": 19}

    def stop(self, status):
        self.stopping = status


def test_a_second_ctrl_c_says_nothing_more_was_saved(tmp_path, capsys):
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        run = _Run(tmp_path)
        StopOnSignal().on_run_begin(run)
        handler = signal.getsignal(signal.SIGINT)
        handler(signal.SIGINT, None)
        assert run.stopping == "interrupted" and "saving a checkpoint" in capsys.readouterr().err
        with pytest.raises(KeyboardInterrupt):
            handler(signal.SIGINT, None)
        err = capsys.readouterr().err
        assert "SIGINT again: stopping now; nothing more was saved" in err
        assert f"dlcli train --resume {run.dir}` continues from the last checkpoint, epoch 2, batch 7" in err
    finally:
        signal.signal(signal.SIGINT, before[0])
        signal.signal(signal.SIGTERM, before[1])


def test_quiet_help_is_truthful():
    text = " ".join(runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"}).output.split())
    assert "Print only the run directory" in text


def test_plots_of_names_the_font_lacks_do_not_warn():
    from dlcli.plots import curves_png

    rows = [{"epoch": 1, "loss": 1.0}, {"epoch": 2, "loss": 0.5}]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        png = curves_png([("训练运行", rows)], title="运行 \U0001F600")
    assert png.startswith(b"\x89PNG")


def test_the_banner_counts_one_epoch_in_the_singular(tmp_path):
    config = write_tiny_config(tmp_path, epochs=1)
    result = runner.invoke(app, ["train", config, "--runs-dir", str(tmp_path / "runs")], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert "train   1 epoch x batch 16" in result.output and "1 epochs" not in result.output
