"""`dlcli export` of a run trained on a table: the preprocessing in the ONNX graph, raw columns in by name, equal to
dlcli's own preprocessing and model (unseen categories and missing cells included); what ONNX cannot express
(hashing, crosses, dates) refused with the reason, and --preprocessed-inputs exporting the model alone."""
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import dlcli
from dlcli.cli import app
from dlcli.data import features as fs
from dlcli.data.table import read_state
from dlcli.data.table_file import parse_columns, read_csv

from tests.conftest import require_shared

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
CONFIGS = Path(__file__).resolve().parents[2] / "configs"
runner = CliRunner()
EVERY_EXPRESSIBLE_TYPE = ["data.crosses=null", "data.features.year=integer_categorical",
                          "data.features.bill_depth_mm={type: float_rescaled, scale: 0.5, offset: -3}",
                          "data.features.flipper_length_mm=float", "train.epochs=2"]


@pytest.fixture
def table_run(tmp_path, monkeypatch):
    monkeypatch.setenv("DLCLI_DATA_DIR", str(require_shared("tables").parent))
    return dlcli.train(CONFIGS / "penguins.yaml", EVERY_EXPRESSIBLE_TYPE, runs_dir=tmp_path / "runs")


def test_exported_graph_takes_raw_columns_and_matches_dlcli(table_run, tmp_path):
    result = runner.invoke(app, ["export", str(table_run.dir), "--output", str(tmp_path / "m.onnx")])
    assert result.exit_code == 0, result.output
    assert "test rows: largest difference" in result.output
    rows = tmp_path / "rows.csv"
    rows.write_text("island,sex,year,body_mass_g,flipper_length_mm,bill_depth_mm,bill_length_mm\n"
                    "Biscoe,male,2008,5700,230,15.0,49.0\n"
                    "Atlantis,NA,2031,NA,190,18.0,\n"  # unseen island and year, missing sex, mass, bill length
                    "Dream,female,2007,3400,NA,18.5,38.5\n")
    state = read_state(table_run.dir)
    table = read_csv(rows)
    columns = parse_columns(table, state, state["missing"])
    feeds = {}
    for name, f in state["features"].items():
        col = columns[name]
        feeds[name] = (np.where(col.missing, "", col.values.astype(str)).astype(object) if f["type"] ==
                       "string_categorical" else np.where(col.missing, np.nan, col.values).astype(np.float32))
        feeds[name] = feeds[name].reshape(-1, 1)
    got = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, feeds)[0]
    want = table_run.model.predict(fs.transform(state, columns))
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert json.loads(ort.InferenceSession(str(tmp_path / "m.onnx")).get_modelmeta().custom_metadata_map
                      ["dlcli.classes"]) == ["Adelie", "Chinstrap", "Gentoo"]


def test_inexpressible_features_are_refused_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("DLCLI_DATA_DIR", str(require_shared("tables").parent))
    run = dlcli.train(CONFIGS / "penguins.yaml", ["train.epochs=1", "data.features.sex={type: string_hashed, "
                                                  "num_bins: 4}", "data.crosses=null"], runs_dir=tmp_path / "runs")
    result = runner.invoke(app, ["export", str(run.dir), "--output", str(tmp_path / "m.onnx")], env={"COLUMNS": "300"})
    assert result.exit_code == 2 and "sex (string_hashed: ONNX has no FarmHash operator)" in result.output
    assert not (tmp_path / "m.onnx").exists()
    result = runner.invoke(app, ["export", str(run.dir), "--output", str(tmp_path / "m.onnx"),
                                 "--preprocessed-inputs"])
    assert result.exit_code == 0, result.output
    inputs = ort.InferenceSession(str(tmp_path / "m.onnx")).get_inputs()
    assert len(inputs) == 1 and inputs[0].shape[1] == run.model.inputs[0].shape[0]
