"""Metrics on crafted inputs, exact epoch averaging over uneven batches, and 'accuracy' resolution."""
import numpy as np
import pytest

from dlcli import losses, metrics
from dlcli.errors import ConfigError, DlcliError


def _result(metric, y_true, y_pred, sample_weight=None):
    metric.reset()
    metric.update(np.asarray(y_true), np.asarray(y_pred, float), sample_weight)
    return metric.result()


# Values from the examples in Keras' metric docstrings.
def test_keras_documented_values():
    y_true, y_pred = [[0, 0, 1], [0, 1, 0]], [[0.1, 0.9, 0.8], [0.05, 0.95, 0]]
    assert _result(metrics.get("categorical_accuracy"), y_true, y_pred) == 0.5
    assert _result(metrics.get("sparse_categorical_accuracy"), [[2], [1]], y_pred) == 0.5
    assert _result(metrics.get({"type": "top_k_categorical_accuracy", "k": 1}), y_true, y_pred) == 0.5
    assert _result(metrics.get({"type": "sparse_top_k_categorical_accuracy", "k": 1}), [2, 1], y_pred) == 0.5
    assert _result(metrics.get("binary_accuracy"), [[1], [1], [0], [0]], [[0.98], [1], [0], [0.6]]) == 0.75
    assert _result(metrics.get("categorical_accuracy"), y_true, y_pred, [0.7, 0.3]) == pytest.approx(0.3)


def test_binary_accuracy_threshold_and_last_axis_mean():
    # sample 1: 2 of 2 right, sample 2: 1 of 2 right -> 0.75
    assert _result(metrics.get("binary_accuracy"), [[1, 0], [1, 1]], [[0.6, 0.5], [0.4, 0.9]]) == 0.75
    strict = metrics.get({"type": "binary_accuracy", "threshold": 0.7})
    assert _result(strict, [[1, 0], [1, 1]], [[0.6, 0.5], [0.4, 0.9]]) == 0.5


def test_top_k_counts_ties_as_hits_like_keras_in_top_k():
    y_pred = [[0.4, 0.3, 0.3, 0.0], [0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4]]
    top2 = metrics.get({"type": "sparse_top_k_categorical_accuracy", "k": 2})
    # label 2 ties with the 2nd largest -> hit; label 2 is 2nd largest -> hit; label 0 is smallest -> miss
    assert _result(top2, [2, 2, 0], y_pred) == pytest.approx(2 / 3)
    assert _result(metrics.get("top_k_categorical_accuracy"), np.eye(4)[[0, 1, 2]], y_pred) == 1.0  # k=5 >= 4


def test_regression_metrics():
    y_true, y_pred = [[0, 1], [0, 0]], [[1, 1], [1, 0]]
    assert _result(metrics.get("mse"), y_true, y_pred) == 0.5
    assert _result(metrics.get("mae"), [[0.0], [0.0]], [[-3.0], [1.0]]) == 2.0
    assert metrics.get("mse").name == "mse" and metrics.get("mean_squared_error").name == "mean_squared_error"


def test_sequence_outputs_average_per_sample_first():
    # sample 0: 1 of 2 steps right; sample 1: 2 of 2 right -> (0.5 + 1) / 2; weights 3:1 -> (1.5 + 1) / 4
    y_pred = np.array([[[0.9, 0.1], [0.9, 0.1]], [[0.2, 0.8], [0.7, 0.3]]])
    labels = np.array([[0, 1], [1, 0]])
    assert _result(metrics.get("sparse_categorical_accuracy"), labels, y_pred) == 0.75
    assert _result(metrics.get("sparse_categorical_accuracy"), labels, y_pred, np.array([3.0, 1.0])) == 0.625


def test_epoch_average_is_exact_over_uneven_batches():
    acc = metrics.get("sparse_categorical_accuracy")
    acc.reset()
    acc.update(np.array([0, 0, 0]), np.array([[1, 0], [1, 0], [1, 0.0]]))  # 3 of 3
    acc.update(np.array([0]), np.array([[0, 1.0]]))  # 0 of 1
    assert acc.result() == 0.75  # not (1 + 0) / 2
    acc.update(np.array([1, 1]), np.array([[0, 1], [0, 1.0]]), sample_weight=np.array([0.5, 1.5]))
    assert acc.result() == pytest.approx((3 + 2) / (4 + 2))
    acc.reset()
    assert acc.result() == 0.0

    loss = metrics.Mean()
    loss.update(1.0, 3)
    loss.update(3.0, 1)
    assert loss.result() == 1.5


@pytest.mark.parametrize("loss,shape,expected", [
    ("binary_crossentropy", (3,), metrics.BinaryAccuracy),
    ("mse", (1,), metrics.BinaryAccuracy),
    ("sparse_categorical_crossentropy", (10,), metrics.SparseCategoricalAccuracy),
    ("sparse_categorical_crossentropy", (7, 10), metrics.SparseCategoricalAccuracy),
    ("categorical_crossentropy", (10,), metrics.CategoricalAccuracy),
    ("mse", (4,), metrics.CategoricalAccuracy),
])
def test_accuracy_resolution(loss, shape, expected):
    for loss_arg in (losses.get(loss), loss if loss != "mse" else "mean_squared_error"):
        metric = metrics.resolve("accuracy", loss_arg, shape)
        assert type(metric) is expected and metric.name == "accuracy"
    assert metrics.resolve("acc", losses.get(loss), shape).name == "acc"  # Keras shows the name it was given


def test_resolve_passes_other_metrics_through():
    metric = metrics.resolve("sparse_top_k_categorical_accuracy", losses.get("mse"), (10,))
    assert type(metric) is metrics.SparseTopKCategoricalAccuracy and metric.k == 5
    assert metric.name == "sparse_top_k_categorical_accuracy"
    given = metrics.BinaryAccuracy(threshold=0.3)
    assert metrics.resolve(given, None, (1,)) is given


def test_categorical_accuracy_accepts_sparse_labels():
    assert _result(metrics.get("categorical_accuracy"), [2, 1], [[0.1, 0.9, 0.8], [0.05, 0.95, 0]]) == 0.5


def test_unknown_names_and_bad_labels():
    with pytest.raises(ConfigError, match="did you mean 'mae'"):
        metrics.get("maee")
    with pytest.raises(ConfigError, match="did you mean 'accuracy'|did you mean 'binary_accuracy'"):
        metrics.resolve("acuracy", None, (3,))
    with pytest.raises(ConfigError, match="did you mean 'k'"):
        metrics.get({"type": "top_k_categorical_accuracy", "kk": 3})
    with pytest.raises(DlcliError, match="label 3"):
        metrics.get("sparse_categorical_accuracy").update(np.array([3]), np.zeros((1, 3)))


def test_get_accuracy_without_context_is_categorical():
    metric = metrics.get("accuracy")
    assert type(metric) is metrics.CategoricalAccuracy and metric.name == "accuracy"


def test_one_direction_rule_for_callbacks_sweeps_and_run_listings():
    from dlcli.callbacks import EarlyStopping
    from dlcli.errors import ConfigError
    from dlcli.metrics import metric_direction

    assert [metric_direction(m) for m in ("val_loss", "out_loss", "mae", "binary_crossentropy", "kl_divergence")] \
        == ["min"] * 5
    assert [metric_direction(m) for m in ("val_accuracy", "auc", "val_precision", "recall")] == ["max"] * 4
    assert [metric_direction(m) for m in ("val_f1_score", "fbeta_score", "r2_score", "val_true_positives",
                                          "true_negatives", "cosine_similarity")] == ["max"] * 6
    assert [metric_direction(m) for m in ("val_false_positives", "false_negatives", "root_mean_squared_error",
                                          "logcosh", "val_hinge", "mean_absolute_percentage_error")] == ["min"] * 6
    assert metric_direction("val_f00") is None
    assert EarlyStopping(monitor="val_mean_squared_error").sign == -1.0
    assert EarlyStopping(monitor="val_sparse_categorical_accuracy").sign == 1.0
    with pytest.raises(ConfigError, match="cannot tell whether 'val_f00'"):
        EarlyStopping(monitor="val_f00")


def _binary_problem(n=300, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, (n, 5)).astype(np.float32)
    y = ((x[:, 0] + 0.5 * x[:, 1] + rng.normal(0, 1, n)) > 0.8).astype(np.float32)[:, None]  # imbalanced, noisy
    return x, y


def test_epoch_metrics_come_from_the_epochs_confusion_counts_and_drive_callbacks():
    from dlcli import layers, models
    from dlcli.callbacks import EarlyStopping

    x, y = _binary_problem()
    model = models.Sequential([layers.Dense(8, activation="relu", input_shape=(5,)),
                               layers.Dense(1, activation="sigmoid")])
    model.build(rng=np.random.default_rng(0))
    model.compile(optimizer="adam", loss="binary_crossentropy",
                  metrics=["auc", {"type": "AUC", "curve": "PR", "name": "pr_auc"}, "precision", "recall",
                           {"type": "f1_score", "threshold": 0.5}, "true_positives"])
    stop = EarlyStopping(monitor="val_auc", patience=1)
    history = model.fit(x[:200], y[:200], epochs=3, batch_size=32, validation_data=(x[200:], y[200:]),
                        verbose=0, seed=0, callbacks=[stop])
    assert stop.sign == 1.0  # AUC: higher is better
    last = {k: v[-1] for k, v in history.history.items()}
    # batches of 32 over 100 validation samples: the epoch's value is the whole set's, not a mean of batch values
    p = model.predict(x[200:], verbose=0)
    for name, spec in [("val_auc", "auc"), ("val_pr_auc", {"type": "AUC", "curve": "PR"}),
                       ("val_precision", "precision"), ("val_recall", "recall"),
                       ("val_f1_score", {"type": "f1_score", "threshold": 0.5}), ("val_true_positives", "true_positives")]:
        whole = metrics.get(spec)
        whole.update(y[200:], p)
        assert last[name] == pytest.approx(whole.result(), rel=1e-6), name
    per_batch = []
    for start in range(0, 100, 32):
        m = metrics.get("auc")
        m.update(y[200 + start:232 + start], p[start:start + 32])
        per_batch.append(m.result())
    assert abs(np.mean(per_batch) - last["val_auc"]) > 1e-4  # what a per-batch mean would have reported


def test_running_logs_sums_continue_a_stateful_metric_exactly():
    from dlcli import layers, models

    x, y = _binary_problem(60)
    model = models.Sequential([layers.Dense(1, activation="sigmoid", input_shape=(5,))])
    model.build(rng=np.random.default_rng(0))
    model.compile(optimizer="sgd", loss="binary_crossentropy", metrics=["auc", "accuracy", "r2_score"])
    logs = metrics.RunningLogs(model)
    out = model.predict(x, verbose=0)
    logs.update(0.5, [], [y[:25]], [out[:25]])
    sums = logs.sums()
    assert all(isinstance(v, float) for v in sums) and len(sums) == 2 + 4 * 200 + 2 + 5
    logs.update(0.7, [], [y[25:]], [out[25:]])
    again = metrics.RunningLogs(model)
    again.set_sums(sums)
    again.update(0.7, [], [y[25:]], [out[25:]])
    assert again.results() == logs.results()
    model.compile(optimizer="sgd", loss="binary_crossentropy", metrics=["accuracy"])
    old = metrics.RunningLogs(model)
    old.set_sums([[1.0, 2.0], [3.0, 4.0]])  # a mid-epoch checkpoint written before stateful metrics: pairs
    assert old.results() == {"loss": 0.5, "accuracy": 0.75}


def test_confusion_metrics_take_class_indices_as_their_one_hot_targets():
    # a table's labels are class indices: AUC and Recall(class_id) read them as the one-hot rows Keras needs
    y_pred = np.array([[0.7, 0.2, 0.1], [0.3, 0.4, 0.3], [0.1, 0.1, 0.8], [0.5, 0.3, 0.2]])
    labels, one_hot = np.array([0, 2, 2, 1]), np.eye(3)[[0, 2, 2, 1]]
    for spec in ({"type": "AUC"}, {"type": "Recall", "class_id": 2, "top_k": 1, "thresholds": 0.0},
                 {"type": "Precision", "class_id": 0}):
        sparse, dense = metrics.get(spec), metrics.get(spec)
        sparse.update(labels, y_pred)
        dense.update(one_hot, y_pred)
        assert sparse.result() == dense.result()
    recall = metrics.get({"type": "Recall", "class_id": 2, "top_k": 1, "thresholds": 0.0})
    recall.update(labels[:, None], y_pred)
    assert recall.result() == 0.5  # class 2: the argmax on row 2, not on row 1


def test_perplexity_is_exp_of_the_mean_token_crossentropy_as_keras_hub():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 4, 6))
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    labels = rng.integers(0, 6, (3, 4))
    picked = np.take_along_axis(probs, labels[..., None], -1)[..., 0]
    expected = np.exp(-np.log(picked).mean())
    assert _result(metrics.get("perplexity"), labels, probs) == pytest.approx(expected, rel=1e-9)
    assert _result(metrics.get({"type": "Perplexity", "from_logits": True}), labels, logits) == pytest.approx(
        expected, rel=1e-9)
    loss = losses.get("sparse_categorical_crossentropy")(labels, probs)
    assert _result(metrics.get("perplexity"), labels, probs) == pytest.approx(np.exp(loss), rel=1e-6)
    # mask_token_id: those target tokens are not counted (KerasHub's padding); the epoch is a token-weighted mean
    masked = metrics.get({"type": "perplexity", "mask_token_id": 0})
    labels[0, :2] = 0
    kept = labels != 0
    picked = np.take_along_axis(probs, labels[..., None], -1)[..., 0]
    masked.reset()
    masked.update(labels[:1], probs[:1])
    masked.update(labels[1:], probs[1:])
    assert masked.result() == pytest.approx(np.exp(-np.log(picked[kept]).mean()), rel=1e-9)
    assert metrics.metric_direction("val_perplexity") == "min"


def test_threshold_iou_and_correlation_metrics_say_higher_is_better():
    from dlcli.callbacks import EarlyStopping
    from dlcli.metrics import metric_direction

    names = ("val_precision_at_recall", "recall_at_precision", "val_sensitivity_at_specificity",
             "specificity_at_sensitivity", "val_io_u", "mean_io_u", "binary_io_u", "one_hot_io_u",
             "val_one_hot_mean_io_u", "accuracy", "pearson_correlation", "val_concordance_correlation")
    assert [metric_direction(m) for m in names] == ["max"] * len(names)
    assert EarlyStopping(monitor="val_mean_io_u").sign == 1.0


def test_iou_and_constrained_rates_over_a_fit_are_the_whole_validation_sets():
    """OneHotMeanIoU and PrecisionAtRecall as val columns and EarlyStopping's monitor: each epoch's value is the
    metric of the whole validation set, not a mean of batch values."""
    from dlcli import layers, models
    from dlcli.callbacks import EarlyStopping

    x, y = _binary_problem()
    onehot = np.eye(3, dtype=np.float32)[(y[:, 0] + (x[:, 2] > 0.5)).astype(int)]  # 3 classes
    model = models.Sequential([layers.Dense(8, activation="relu", input_shape=(5,)),
                               layers.Dense(3, activation="softmax")])
    model.build(rng=np.random.default_rng(0))
    iou = {"type": "OneHotMeanIoU", "num_classes": 3}
    at_recall = {"type": "PrecisionAtRecall", "recall": 0.7, "class_id": 1}
    model.compile(optimizer="adam", loss="categorical_crossentropy", metrics=[iou, at_recall])
    stop = EarlyStopping(monitor="val_one_hot_mean_io_u", patience=1)
    history = model.fit(x[:200], onehot[:200], epochs=2, batch_size=32, validation_data=(x[200:], onehot[200:]),
                        verbose=0, seed=0, callbacks=[stop])
    p = model.predict(x[200:], verbose=0)
    for column, spec in [("val_one_hot_mean_io_u", iou), ("val_precision_at_recall", at_recall)]:
        whole = metrics.get(dict(spec))
        whole.update(onehot[200:], p)
        assert history.history[column][-1] == pytest.approx(whole.result(), rel=1e-9), column
        assert 0 < whole.result() < 1
        per_batch = []
        for start in range(0, 100, 32):
            m = metrics.get(dict(spec))
            m.update(onehot[200 + start:232 + start], p[start:start + 32])
            per_batch.append(m.result())
        assert abs(np.mean(per_batch) - whole.result()) > 1e-4, column


@pytest.mark.parametrize("spec,message", [
    ({"type": "PrecisionAtRecall", "recall": 1.5}, "recall must be in \\[0, 1\\]"),
    ({"type": "PrecisionAtRecall"}, "recall"),
    ({"type": "IoU", "num_classes": 3, "target_class_ids": [3]}, "target_class_ids must be class ids in \\[0, 3\\)"),
    ({"type": "PearsonCorrelation", "axis": 0}, "non-batch axis")])
def test_bad_metric_arguments_name_themselves(spec, message):
    from dlcli.errors import ConfigError

    with pytest.raises((ConfigError, TypeError), match=message):
        metrics.get(spec)
