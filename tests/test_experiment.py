"""experiment: the time-series report compares the model with the common-sense baseline in original units."""
import pytest

from dlcli.experiment import baseline_comparison, classification_report


def test_baseline_comparison_in_original_units():
    extra = {"target": "co2", "target_std": 10.0, "baseline": {"test_mae": 0.5, "validation_mae": 0.4}}
    report = baseline_comparison({"loss": 0.1, "mae": 0.03}, extra, "test")
    assert report["model_mae"] == pytest.approx(0.3) and report["baseline_mae"] == 0.5
    assert report["beats_baseline"] and report["improvement"] == pytest.approx(0.4)
    worse = baseline_comparison({"mae": 0.05}, extra, "validation")
    assert not worse["beats_baseline"]
    assert baseline_comparison({"loss": 1.0}, extra, "test") is None


def test_classification_report_counts():
    import numpy as np

    y = np.array([0, 1, 1, 2])
    p = np.eye(3)[[0, 1, 2, 2]]
    report = classification_report(y, p, ["a", "b", "c"])
    assert report["confusion_matrix"] == [[1, 0, 0], [0, 1, 1], [0, 0, 1]]
    assert report["per_class_accuracy"] == {"a": 1.0, "b": 0.5, "c": 1.0}
    assert classification_report(y, np.ones((4, 1))) is None
