"""`data: {type: table}` end to end: the real tables (../shared/datasets/tables) through train, evaluate, predict
(CSV rows and JSON records by column name), k-fold and inspect-shapes, and bad input refused with exit 2, one
line naming the file, line and column, and nothing written."""
import json
import shutil
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

import dlcli
from dlcli.cli import app
from dlcli.data import Dataset
from dlcli.trainer import _sample_weights, balanced_class_weight

from tests.conftest import require_dataset

CONFIGS = __import__("pathlib").Path(__file__).resolve().parents[2] / "configs"
runner = CliRunner()


@pytest.fixture
def tables(monkeypatch, isolated):
    folder = require_dataset("tables")
    monkeypatch.setenv("DLCLI_DATA_DIR", str(folder.parent))
    return folder


@pytest.fixture
def penguins_run(tables, tmp_path):
    run = dlcli.train(CONFIGS / "penguins.yaml", ["train.epochs=40"], runs_dir=tmp_path / "runs")
    return run


def test_penguins_reaches_97_percent_and_stores_its_preprocessing(penguins_run):
    run = penguins_run
    assert run.test["accuracy"] >= 0.97
    state = json.loads((run.dir / "feature_space.json").read_text())
    assert state["classes"] == ["Adelie", "Chinstrap", "Gentoo"]
    assert state["features"]["island"]["vocabulary"] == ["Biscoe", "Dream", "Torgersen"]  # the 275 training rows
    assert state["width"] == run.model.inputs[0].shape[0]
    assert json.loads((run.dir / "meta.json").read_text())["classes"] == state["classes"]


def test_predict_reads_rows_by_column_name_and_sends_unseen_categories_to_oov(penguins_run, tmp_path):
    run = penguins_run
    rows = tmp_path / "rows.csv"  # columns reordered, an extra one, the label absent
    rows.write_text("note,sex,year,body_mass_g,flipper_length_mm,bill_depth_mm,bill_length_mm,island\n"
                    "x,male,2008,5700,230,15.0,49.0,Biscoe\n"
                    "y,female,2007,3400,190,18.0,38.5,Atlantis\n")
    out = tmp_path / "p.csv"
    result = runner.invoke(app, ["predict", str(run.dir), str(rows), "--output", str(out)])
    assert result.exit_code == 0, result.output
    lines = out.read_text().splitlines()
    assert lines[1].startswith("rows.csv:2,Gentoo") and lines[2].startswith("rows.csv:3,Adelie")
    records = tmp_path / "r.json"
    records.write_text(json.dumps([{"island": "Biscoe", "sex": "male", "year": 2008, "body_mass_g": 5700,
                                    "flipper_length_mm": 230, "bill_depth_mm": 15.0, "bill_length_mm": 49.0},
                                   {"island": "Atlantis", "sex": None, "year": 2031, "body_mass_g": 3400,
                                    "flipper_length_mm": 190, "bill_depth_mm": 18.0, "bill_length_mm": None}]))
    result = runner.invoke(app, ["predict", str(run.dir), str(records), "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_text().splitlines()[1].startswith("r.json:1,Gentoo")
    rows.write_text("island,sex,year\nBiscoe,male,2008\n")
    result = runner.invoke(app, ["predict", str(run.dir), str(rows)])
    assert result.exit_code == 2 and "no column 'bill_depth_mm'" in result.output


def test_evaluate_and_predict_use_the_stored_state_not_the_file_again(penguins_run, tmp_path):
    run = penguins_run
    state = json.loads((run.dir / "feature_space.json").read_text())
    state["features"]["bill_length_mm"]["mean"] += 1000.0  # a different stored state must change the answers
    (run.dir / "feature_space.json").write_text(json.dumps(state))
    from dlcli.experiment import evaluation_report

    result = evaluation_report(run.dir)
    assert result["metrics"]["accuracy"] < run.test["accuracy"]


def test_cars_regression_beats_the_mean_and_kfold_adapts_per_fold(tables, tmp_path):
    run = dlcli.train(CONFIGS / "cars_mpg.yaml", ["train.epochs=30"], runs_dir=tmp_path / "runs")
    extra = run.data.extra
    assert run.test["mae"] < 0.5 * extra["baseline"]["test_mae"]
    assert extra["label_rows_dropped"] == 8  # rows without Miles_per_Gallon
    folds = dlcli.train(CONFIGS / "cars_mpg_kfold.yaml", ["train.epochs=2"], runs_dir=tmp_path / "runs")
    means = [json.loads((folds.dir / "folds" / str(i) / "feature_space.json").read_text())
             ["features"]["Weight_in_lbs"]["mean"] for i in (1, 2, 3, 4)]
    assert len(set(means)) == 4  # each fold adapted on its own training part
    whole = json.loads((run.dir / "feature_space.json").read_text())["features"]["Weight_in_lbs"]["mean"]
    assert whole not in means


def test_inspect_shapes_shows_each_features_width(tables):
    result = runner.invoke(app, ["inspect-shapes", str(CONFIGS / "cars_mpg.yaml")], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "input features (total width 22)" in result.output
    assert "integer_categorical (5 values + 1 OOV)" in result.output and "ignored columns" in result.output


def test_balanced_class_weight_is_sklearns_formula():
    labels = np.array([0, 0, 0, 1, 2, 2])
    assert balanced_class_weight(labels) == {0: 6 / 9, 1: 6 / 3, 2: 6 / 6}
    np.testing.assert_allclose(_sample_weights(Dataset(None, labels), 6, "balanced", None), [2 / 3] * 3 + [2.0, 1.0, 1.0])


def _bad(tmp_path, name: str, content: bytes):
    path = tmp_path / name
    path.write_bytes(content)
    return path


PENGUINS_HEAD = (b"species,island,bill_length_mm,bill_depth_mm,flipper_length_mm,body_mass_g,sex,year\n"
                 + (b"Adelie,Torgersen,39.1,18.7,181,3750,male,2007\n"
                    b"Gentoo,Biscoe,46.1,13.2,211,4500,female,2007\n") * 3)


@pytest.mark.parametrize("content, overrides, expected", [
    (PENGUINS_HEAD, ["data.features.bill_lenght_mm=float"], "no column 'bill_lenght_mm' (did you mean "
                                                            "'bill_length_mm'?)"),
    (PENGUINS_HEAD.replace(b"Gentoo", b"Adelie"), [], "the label has one class ('Adelie') in 6 rows"),
    (PENGUINS_HEAD.replace(b"Gentoo", b"Adelie"), ["data.stream=true"], "the label has one class ('Adelie') in 6 rows"),
    (PENGUINS_HEAD + b"Adelie,Dream,4x.1,18.7,181,3750,male,2007\n", [],
     "line 8, column 'bill_length_mm': '4x.1' is not a number"),
    (PENGUINS_HEAD.replace(b"2007", b"NA"), [], "column 'year': every cell is missing"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", [], "line 3: binary data (a NUL byte): not a CSV"),
    (PENGUINS_HEAD.replace(b"Torgersen", b"Torg\xe9rsen"), [], "line 2: byte 0xe9 is not UTF-8"),
    (PENGUINS_HEAD + b"Adelie;Dream;39;18;181;3750;male;2007\n", [], "line 8: 1 fields, the header has 8 (it holds "
                                                                     "';': mixed delimiters?"),
])
def test_bad_tables_exit_2_naming_file_line_and_column_and_write_nothing(tables, tmp_path, content, overrides,
                                                                        expected):
    path = _bad(tmp_path, "bad.csv", content)
    args = ["train", str(CONFIGS / "penguins.yaml"), "--runs-dir", str(tmp_path / "runs"),
            "--set", f"data.path={path}", "--set", "data.test_split=0.3"]
    for o in overrides:
        args += ["--set", o]
    result = runner.invoke(app, args, env={"COLUMNS": "300"})
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert expected in text and (str(path) in text or "penguins.csv" not in text)
    assert "Traceback" not in result.output
    assert not (tmp_path / "runs").exists()


def test_class_weight_takes_balanced_or_a_mapping_and_suggests_the_name(tmp_path):
    args = ["train", str(CONFIGS / "seattle_weather.yaml"), "--runs-dir", str(tmp_path / "runs")]
    result = runner.invoke(app, [*args, "--set", "train.class_weight=balancd"], env={"COLUMNS": "300"})
    assert result.exit_code == 2 and "(1 error)" in result.output
    assert "train.class_weight: expected one of 'balanced', found 'balancd' (did you mean 'balanced'?)" in result.output
    result = runner.invoke(app, [*args, "--set", "train.class_weight={0: -1.0}"], env={"COLUMNS": "300"})
    assert result.exit_code == 2 and "train.class_weight.0: expected a value >= 0.0, found -1.0" in result.output


def test_parquet_trains_and_predicts_as_the_same_csv_does(tables, tmp_path):
    pa_csv = pytest.importorskip("pyarrow.csv")
    pq = pytest.importorskip("pyarrow.parquet")
    typed = pa_csv.read_csv(tables / "penguins.csv", convert_options=pa_csv.ConvertOptions(
        null_values=["NA"], strings_can_be_null=True))  # numbers as double/int64, NA as null
    pq.write_table(typed, tmp_path / "penguins.parquet")
    runs = []
    for path in (tables / "penguins.csv", tmp_path / "penguins.parquet"):
        runs.append(dlcli.train(CONFIGS / "penguins.yaml", [f"data.path={path}", "train.epochs=3"],
                                runs_dir=tmp_path / "runs"))
    states = [json.loads((r.dir / "feature_space.json").read_text()) for r in runs]
    assert states[0]["features"] == states[1]["features"]
    assert runs[0].history[-1]["loss"] == runs[1].history[-1]["loss"]
    pq.write_table(typed.slice(0, 5), tmp_path / "rows.parquet")
    result = runner.invoke(app, ["predict", str(runs[1].dir), str(tmp_path / "rows.parquet")])
    assert result.exit_code == 0 and "rows.parquet:5" in result.output


def test_parquet_without_pyarrow_names_the_extra(tables, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if not installed: importing it raises ImportError
    (tmp_path / "t.parquet").write_bytes(b"PAR1")
    result = runner.invoke(app, ["train", str(CONFIGS / "penguins.yaml"), "--set", f"data.path={tmp_path / 't.parquet'}",
                                 "--runs-dir", str(tmp_path / "runs")], env={"COLUMNS": "300"})
    assert result.exit_code == 1 and "error: reading Parquet needs pyarrow: pip install 'dlcli[tables]'" in result.output


def test_features_auto_infers_the_types_and_prints_a_pasteable_section(tables, tmp_path):
    result = runner.invoke(app, ["inspect-shapes", str(CONFIGS / "cars_mpg.yaml"), "--set", "data.features=auto"],
                           env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    section = result.output[result.output.index("features:\n"):result.output.index("Total params")]
    import yaml

    inferred = yaml.safe_load(section)["features"]
    assert inferred == {"Cylinders": "integer_categorical", "Displacement": "float_normalized",
                        "Horsepower": "float_normalized", "Weight_in_lbs": "float_normalized",
                        "Acceleration": "float_normalized", "Year": "date", "Origin": "string_categorical"}
    assert "# Name: left out (311 distinct values in 406 rows" in section
    run = dlcli.train(CONFIGS / "cars_mpg.yaml", ["data.features=auto", "train.epochs=1"], runs_dir=tmp_path / "r")
    state = json.loads((run.dir / "feature_space.json").read_text())
    assert {k: f["type"] for k, f in state["features"].items()} == inferred


def test_a_text_column_trains_and_predicts_with_unseen_words(tables, tmp_path):
    run = dlcli.train(CONFIGS / "cars_mpg.yaml", ["data.features.Name={type: text, max_tokens: 40}",
                                                  "train.epochs=1"], runs_dir=tmp_path / "runs")
    state = json.loads((run.dir / "feature_space.json").read_text())
    assert state["features"]["Name"]["width"] == 40 and state["width"] == 22 + 40
    assert "ford" in state["features"]["Name"]["vocabulary"]["words"]
    rows = tmp_path / "rows.csv"
    rows.write_text("Name,Cylinders,Displacement,Horsepower,Weight_in_lbs,Acceleration,Year,Origin\n"
                    "zorblax hypercar,4,97,,2130,14.5,1982-01-01,Japan\n")
    result = runner.invoke(app, ["predict", str(run.dir), str(rows)])
    assert result.exit_code == 0 and "rows.csv:2" in result.output, result.output


def test_output_mode_dict_feeds_a_functional_graph_one_input_per_feature(tables, tmp_path):
    run = dlcli.train(CONFIGS / "penguins_functional.yaml", ["train.epochs=40"], runs_dir=tmp_path / "runs")
    assert run.test["accuracy"] >= 0.95
    state = json.loads((run.dir / "feature_space.json").read_text())
    assert state["output_mode"] == "dict"
    widths = {n: f["width"] for n, f in state["features"].items()} | {"island_X_sex": 16}
    assert {n: t.shape[0] for n, t in zip(run.model.input_names, run.model.inputs)} == widths  # filled in
    rows = tmp_path / "rows.csv"
    rows.write_text("sex,year,body_mass_g,flipper_length_mm,bill_depth_mm,bill_length_mm,island\n"
                    "male,2008,5700,230,15.0,49.0,Biscoe\nfemale,2007,3400,190,18.0,38.5,Atlantis\n")
    result = runner.invoke(app, ["predict", str(run.dir), str(rows), "--output", str(tmp_path / "p.csv")])
    assert result.exit_code == 0, result.output
    lines = (tmp_path / "p.csv").read_text().splitlines()
    assert lines[1].startswith("rows.csv:2,Gentoo") and lines[2].startswith("rows.csv:3,Adelie")
    # a model input that is no feature: named, with a did-you-mean
    config = (CONFIGS / "penguins_functional.yaml").read_text().replace("{name: year}", "{name: yaer}") \
        .replace("island, sex, year,", "island, sex, yaer,")
    (tmp_path / "bad.yaml").write_text(config.replace("tables/penguins.csv", str(tables / "penguins.csv")))
    result = runner.invoke(app, ["train", str(tmp_path / "bad.yaml"), "--runs-dir", str(tmp_path / "r2")])
    assert result.exit_code == 2 and "'yaer' is not a table feature (did you mean 'year'?)" in result.output


def test_output_mode_dict_exports_each_feature_to_its_input(tables, tmp_path):
    pytest.importorskip("onnxruntime")
    config = (CONFIGS / "penguins_functional.yaml").read_text().replace(
        "  crosses: [{features: [island, sex], crossing_dim: 16}]\n", "").replace("    - {name: island_X_sex}\n", "") \
        .replace("island, sex, year, island_X_sex", "island, sex, year")
    (tmp_path / "c.yaml").write_text(config.replace("tables/penguins.csv", str(tables / "penguins.csv")))
    run = dlcli.train(tmp_path / "c.yaml", ["train.epochs=2"], runs_dir=tmp_path / "runs")
    result = runner.invoke(app, ["export", str(run.dir), "--output", str(tmp_path / "m.onnx")])
    assert result.exit_code == 0, result.output
    assert "largest difference" in result.output


def test_streamed_training_is_identical_to_in_memory_training(tables, tmp_path, monkeypatch):
    pytest.importorskip("pyarrow")
    from dlcli.data import features, table_stream

    monkeypatch.setattr(table_stream, "CHUNK_BYTES", 2048)  # penguins.csv in 9 chunks
    monkeypatch.setattr(features, "ADAPT_ROWS", 64)  # and adapted in 5 blocks, in memory and streamed alike
    runs = {}
    for stream in (False, True):
        runs[stream] = dlcli.train(CONFIGS / "penguins_functional.yaml",
                                   ["train.epochs=3", f"data.stream={str(stream).lower()}"],
                                   runs_dir=tmp_path / f"runs{stream}")
    states = [json.loads((runs[s].dir / "feature_space.json").read_text()) for s in (False, True)]
    assert states[0] == states[1]
    weights = [np.load(runs[s].dir / "weights" / "last.npz") for s in (False, True)]
    assert sorted(weights[0].files) == sorted(weights[1].files)
    for k in weights[0].files:
        np.testing.assert_array_equal(weights[0][k], weights[1][k])
    assert runs[True].test == runs[False].test


def test_a_streamed_bad_cell_names_its_line_and_column(tables, tmp_path, monkeypatch):
    pytest.importorskip("pyarrow")
    from dlcli.data import table_stream

    monkeypatch.setattr(table_stream, "CHUNK_BYTES", 2048)
    lines = (tables / "penguins.csv").read_text().splitlines()
    lines[300] = lines[300].replace("Biscoe", "Biscoe,extra") if "Biscoe" in lines[300] else lines[300] + ",extra"
    (tmp_path / "p.csv").write_text("\n".join(lines) + "\n")
    config = (CONFIGS / "penguins.yaml").read_text().replace("tables/penguins.csv", str(tmp_path / "p.csv"))
    (tmp_path / "c.yaml").write_text(config)
    result = runner.invoke(app, ["train", str(tmp_path / "c.yaml"), "--set", "data.stream=true", "--runs-dir",
                                 str(tmp_path / "runs")])
    assert result.exit_code == 2 and "p.csv, line 301: 9 fields, the header has 8" in result.output
    assert not (tmp_path / "runs").exists()
    lines[300] = lines[300].replace(",extra", "")
    lines[200] = lines[200].replace(lines[200].split(",")[2], "long", 1)
    (tmp_path / "p.csv").write_text("\n".join(lines) + "\n")
    result = runner.invoke(app, ["train", str(tmp_path / "c.yaml"), "--set", "data.stream=true", "--runs-dir",
                                 str(tmp_path / "runs")])
    assert result.exit_code == 2 and "p.csv, line 201, column 'bill_length_mm': 'long' is not a number" \
        in result.output, result.output
    lines[200] = lines[200].replace("long", "44.9")
    from dlcli.data import table_file

    monkeypatch.setattr(table_file, "HEAD_BYTES", 4096)  # the bad byte beyond the head: found by the chunked reader
    (tmp_path / "p.csv").write_bytes(("\n".join(lines[:250]) + "\n").encode() + "Adelie,Dream,1,2,3,4,m\xe2le,2008\n"
                                     .encode("latin-1") + ("\n".join(lines[250:]) + "\n").encode())
    result = runner.invoke(app, ["train", str(tmp_path / "c.yaml"), "--set", "data.stream=true", "--runs-dir",
                                 str(tmp_path / "runs")])
    assert result.exit_code == 2 and "p.csv, line 251: byte 0xe2 is not UTF-8" in result.output, result.output
