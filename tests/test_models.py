"""Model API: Keras-shaped construction, compile/fit/evaluate/predict, weights order, save/load, reproducibility."""
import numpy as np
import pytest

from dlcli import builder, layers, models
from dlcli.errors import DlcliError, ShapeError


def blobs(n=600, seed=0):
    """Three separable Gaussian blobs in 4-D: a problem any working classifier solves."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    centers = np.array([[2, 0, 0, 0], [0, 2, 0, 0], [0, 0, 2, 0]], np.float32)
    return (centers[y] + rng.normal(0, 0.5, (n, 4))).astype(np.float32), y


def mlp(seed=0):
    model = models.Sequential([layers.Dense(16, activation="relu", input_shape=(4,)),
                               layers.Dense(3, activation="softmax")])
    model.build(rng=np.random.default_rng(seed))
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def test_only_first_layer_needs_input_shape_and_shapes_chain():
    model = models.Sequential([layers.Flatten(input_shape=(28, 28)), layers.Dense(512, activation="relu"),
                               layers.Dense(10, activation="softmax")])
    rows = model.summary_rows()
    assert [r["output_shape"] for r in rows[1:]] == [(784,), (512,), (10,)]
    assert model.count_params() == 784 * 512 + 512 + 512 * 10 + 10  # 407,050 as in the book


def test_sequential_accepts_input_tensor_first():
    model = models.Sequential([layers.Input((5,)), layers.Dense(2)])
    assert model.predict(np.zeros((3, 5), np.float32)).shape == (3, 2)


def test_fit_learns_and_history_has_keras_keys():
    x, y = blobs()
    model = mlp()
    history = model.fit(x, y, epochs=8, batch_size=32, validation_split=0.2, verbose=0, seed=0)
    assert set(history.history) >= {"loss", "accuracy", "val_loss", "val_accuracy", "learning_rate"}
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert model.evaluate(x, y, verbose=0, return_dict=True)["accuracy"] > 0.95


def test_evaluate_is_exact_over_uneven_batches():
    x, y = blobs(n=101)
    model = mlp()
    by_batch = model.evaluate(x, y, batch_size=7, return_dict=True)
    whole = model.evaluate(x, y, batch_size=1000, return_dict=True)
    assert by_batch["loss"] == pytest.approx(whole["loss"], rel=1e-5)
    assert by_batch["accuracy"] == pytest.approx(whole["accuracy"])


def test_predict_is_batched_and_float32():
    x, _ = blobs(n=70)
    p = mlp().predict(x, batch_size=16)
    assert p.shape == (70, 3) and p.dtype == np.float32
    np.testing.assert_allclose(p.sum(1), 1, rtol=1e-5)


def test_predict_runs_large_batches_in_cache_sized_passes_with_the_same_outputs():
    model = models.Sequential([layers.Conv2D(64, 3, padding="same", activation="relu", input_shape=(32, 32, 3)),
                               layers.GlobalAveragePooling2D(), layers.Dense(3)])
    assert model._inference_rows() == models.INFERENCE_BYTES // (32 * 32 * 64 * 4) == 16
    x = np.random.default_rng(0).normal(size=(40, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(model.predict(x, batch_size=40), model(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("path", ["numba", "numpy"])
def test_an_output_a_conv_pools_in_its_own_pass_does_not_size_the_passes(monkeypatch, path):
    """A few-channel conv pools its output chunk by chunk, F(4x4) in its output transform (compiled kernels only):
    neither output is written whole, so the largest activation a pass writes is another (the pooled output, the
    input); a conv that writes its output and then pools it (no compiled kernels) still counts it."""
    monkeypatch.setenv("DLCLI_KERNELS", path)
    few = models.Sequential([layers.Conv2D(8, 3, activation="relu", input_shape=(32, 32, 1)), layers.MaxPooling2D(2),
                             layers.Flatten(), layers.Dense(3)])
    assert few._inference_rows() == models.INFERENCE_BYTES // (15 * 15 * 8 * 4)  # not 30 * 30 * 8
    wide = models.Sequential([layers.Conv2D(32, 3, activation="relu", input_shape=(20, 20, 16)),
                              layers.MaxPooling2D(2), layers.Flatten(), layers.Dense(3)])
    largest = 20 * 20 * 16 if path == "numba" else 18 * 18 * 32  # the input, or the conv's output
    assert wide._inference_rows() == models.INFERENCE_BYTES // (largest * 4)
    for model, shape in ((few, (50, 32, 32, 1)), (wide, (50, 20, 20, 16))):
        x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
        np.testing.assert_allclose(model.predict(x, batch_size=50), model(x), rtol=1e-5, atol=1e-5)


def test_predict_gives_the_same_bits_whatever_the_batch_size_and_the_threads(monkeypatch):
    """Passes of a size the shapes alone fix, the last one padded: OpenBLAS' Haswell kernels round a product's row
    by the row count and the row's place, so passes sized by the batch or the threads gave other last bits."""
    from dlcli.engine import blas

    model = models.Sequential([layers.Conv2D(8, 3, activation="relu", input_shape=(12, 12, 1)), layers.Flatten(),
                               layers.Dense(64, activation="relu"), layers.Dense(3)])
    model.build(rng=np.random.default_rng(0))
    rows = model._prediction_rows()
    assert rows == min(models.PREDICT_ROWS, 1 << (model._inference_rows().bit_length() - 1))
    x = np.random.default_rng(0).normal(size=(2 * rows + 5, 12, 12, 1)).astype(np.float32)
    one = model.predict(x, batch_size=512)
    assert one.shape == (len(x), 3)
    np.testing.assert_allclose(one, model(x), rtol=1e-5, atol=1e-6)
    for batch_size in (1, 100):
        np.testing.assert_array_equal(model.predict(x, batch_size=batch_size), one)
    np.testing.assert_array_equal(model.predict(x[:7]), one[:7])
    monkeypatch.setattr(blas, "threads", lambda: 2)
    np.testing.assert_array_equal(model.predict(x, batch_size=100), one)


def test_predict_passes_on_graph_replicas_in_threads_give_the_serial_outputs(monkeypatch):
    from dlcli.engine import blas

    rng = np.random.default_rng(0)
    img, seq = layers.Input((8, 8, 2), name="img"), layers.Input((6,), name="seq")
    x = layers.Conv2D(4, 3, activation="relu", padding="same")(img)
    x = layers.BatchNormalization()(x)
    x = layers.MaxPooling2D(2)(x)
    shared = layers.Dense(5, activation="tanh")
    x = layers.Flatten()(x)
    t = layers.LSTM(3)(layers.Embedding(9, 4, mask_zero=True)(seq))
    out = layers.Dense(3, activation="softmax")(layers.Concatenate()([shared(x), t, shared(layers.Dense(64)(t))]))
    model = models.Model([img, seq], out)
    for p in model.weights:  # moving statistics away from 0 and 1
        p.value[...] = rng.normal(0.5, 0.3, p.value.shape)
    xs = [rng.normal(size=(50, 8, 8, 2)).astype(np.float32), rng.integers(0, 9, (50, 6))]
    monkeypatch.setattr(models, "PREDICT_ROWS", 4)  # 13 passes, the last padded
    serial = model.predict(xs)
    replica = model.graph.replica()
    twin = replica.layers[0]
    assert twin is not model.layers[0] and twin.kernel is model.layers[0].kernel  # own caches, shared weights
    assert twin.activation is not model.layers[0].activation
    monkeypatch.setattr(blas, "threads", lambda: 3)
    np.testing.assert_array_equal(model.predict(xs), serial)


def test_a_slow_pass_does_not_stall_the_other_threads(monkeypatch):
    """Passes are handed out ahead of the one the caller waits for (inference_passes' AHEAD per thread): while the
    first pass's thread is held (descheduled on a busy machine), the other thread runs the passes after it; handed
    out only lanes + 1 ahead, it ran two and then waited for the first. The outputs still come in order."""
    import threading

    from dlcli.engine import blas, graph

    model = models.Sequential([layers.Dense(3, input_shape=(4,))])
    model.build(rng=np.random.default_rng(0))
    x = np.arange(4 * 40, dtype=np.float32).reshape(40, 4)
    seen, later_ran = [], threading.Event()
    forward = graph.Graph.forward

    def held(self, xs, *a, **k):
        first = xs[0][0, 0] == 0
        if first:
            later_ran.wait(10)  # released by the sixth pass, or after 10 s where none runs meanwhile
        seen.append(int(xs[0][0, 0]) // 4)
        if len(seen) == 5:
            later_ran.set()
        return forward(self, xs, *a, **k)
    monkeypatch.setattr(graph.Graph, "forward", held)
    monkeypatch.setattr(blas, "threads", lambda: 2)
    monkeypatch.setattr(models, "PREDICT_ROWS", 4)  # passes of 4 samples
    y = model.predict(x)
    assert seen[0] != 0 and seen.index(0) >= 5  # five passes ran while the first was held
    np.testing.assert_allclose(y, x @ model.layers[0].kernel.value + model.layers[0].bias.value, rtol=1e-6)


def test_predict_starts_its_pass_threads_once_and_makes_replicas_on_them(monkeypatch):
    """The threads running inference passes outlive a predict (started and joined every call, they cost its caller
    ~0.1 ms), and a graph replica is made on the thread that first needs one, not by the caller before any pass
    starts; the outputs are the serial ones."""
    import threading
    import time

    from dlcli.engine import blas, graph

    model = models.Sequential([layers.Dense(3, input_shape=(4,))])
    model.build(rng=np.random.default_rng(0))
    x = np.arange(4 * 40, dtype=np.float32).reshape(40, 4)
    made_on, replica, forward = [], graph.Graph.replica, graph.Graph.forward
    monkeypatch.setattr(graph.Graph, "replica", lambda self: made_on.append(threading.current_thread().name)
                        or replica(self))
    monkeypatch.setattr(graph.Graph, "forward", lambda *a, **k: time.sleep(0.01) or forward(*a, **k))  # overlap
    monkeypatch.setattr(blas, "threads", lambda: 2)
    monkeypatch.setattr(models, "PREDICT_ROWS", 4)
    pass_threads = []
    for _ in range(2):
        y = model.predict(x)
        np.testing.assert_allclose(y, x @ model.layers[0].kernel.value + model.layers[0].bias.value, rtol=1e-6)
        pass_threads.append({t.ident for t in threading.enumerate() if t.name.startswith("dlcli-infer")})
    assert pass_threads[0] and pass_threads[0] == pass_threads[1]
    assert made_on and all(name.startswith("dlcli-infer") for name in made_on)


def test_same_seed_gives_identical_history_and_weights():
    x, y = blobs()
    runs = []
    for _ in range(2):
        model = mlp(seed=3)
        h = model.fit(x, y, epochs=3, batch_size=32, verbose=0, seed=5)
        runs.append((h.history["loss"], model.get_weights()))
    assert runs[0][0] == runs[1][0]
    assert all(np.array_equal(a, b) for a, b in zip(runs[0][1], runs[1][1], strict=True))


def test_weights_in_keras_order_and_layout():
    model = mlp()
    shapes = [w.shape for w in model.get_weights()]
    assert shapes == [(4, 16), (16,), (16, 3), (3,)]
    new = [np.full(s, i, np.float32) for i, s in enumerate(shapes)]
    model.set_weights(new)
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), new, strict=True))
    with pytest.raises(ShapeError):
        model.set_weights(new[:-1])


def test_save_and_load_round_trip(tmp_path):
    x, y = blobs()
    model = mlp()
    model.fit(x, y, epochs=2, batch_size=32, verbose=0, seed=0)
    path = tmp_path / "model.npz"
    model.save(path)
    again = builder.load_model(path)
    np.testing.assert_array_equal(model.predict(x), again.predict(x))
    # the optimizer state travels too: one more identical step on both gives identical weights
    model.fit(x, y, epochs=1, batch_size=32, verbose=0, seed=9)
    again.fit(x, y, epochs=1, batch_size=32, verbose=0, seed=9)
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), again.get_weights(), strict=True))


def test_load_model_refuses_foreign_files(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(DlcliError, match="neither a NumPy .npy file nor an .npz archive") as info:
        builder.load_model(bad)
    assert "allow_pickle" not in info.value.message
    np.savez(tmp_path / "plain.npz", a=np.zeros(2))
    with pytest.raises(DlcliError, match="not a dlcli model file"):
        builder.load_model(tmp_path / "plain.npz")


def test_fused_softmax_cross_entropy_matches_unfused_gradients():
    """The fused path (loss reads logits) must give the same update as the chain rule through softmax."""
    x, y = blobs(n=64)
    fused, plain = mlp(seed=1), mlp(seed=1)
    plain.get_layer(plain.layers[-1].name).output_fused = False
    plain.fused = [None]
    assert fused.fused[0] is not None
    outs_f = fused.graph.forward([x], training=True)
    _, _, g_f = fused.compute_loss([y], outs_f)
    fused.graph.backward(g_f)
    outs_p = plain.graph.forward([x], training=True)
    _, _, g_p = plain.compute_loss([y], outs_p)
    plain.graph.backward(g_p)
    for a, b in zip(fused.trainable_weights, plain.trainable_weights):
        np.testing.assert_allclose(a.grad, b.grad, rtol=1e-4, atol=1e-6)


def test_regularizers_enter_the_loss():
    model = models.Sequential([layers.Dense(3, input_shape=(4,), kernel_regularizer={"l2": 0.5})])
    model.compile(optimizer="sgd", loss="mse")
    x, y = np.ones((2, 4), np.float32), np.zeros((2, 3), np.float32)
    kernel = model.layers[0].kernel.value
    data_loss = float(np.mean((x @ kernel) ** 2))
    assert model.evaluate(x, y) == pytest.approx(data_loss + 0.5 * float((kernel ** 2).sum()), rel=1e-5)


def test_compile_required_and_shape_errors_are_clear():
    model = models.Sequential([layers.Dense(3, input_shape=(4,))])
    with pytest.raises(DlcliError, match="must be compiled"):
        model.fit(np.zeros((2, 4)), np.zeros((2, 3)))
    model.compile(optimizer="sgd", loss="mse")
    with pytest.raises(ShapeError, match=r"expects samples of shape \(4,\)"):
        model.fit(np.zeros((2, 5)), np.zeros((2, 3)), verbose=0)


def test_blas_threads_are_found_when_blas_is_the_first_module_imported():
    import subprocess
    import sys

    code = "from dlcli.engine import blas; import sys; sys.exit(0 if blas.threads() >= 1 and blas._blas() else 1)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_blas_is_numpys_own_library_when_scipy_brought_another_first():
    # SciPy's wheels bring their own OpenBLAS (32-bit integers), listed before NumPy's when SciPy was imported first:
    # the compiled loops must call the library np.matmul calls, and one_thread limit its threads
    import subprocess
    import sys

    pytest.importorskip("scipy.linalg")
    code = ("import scipy.linalg, os, numpy as np; from dlcli.engine import blas; lib = blas.library(); "
            "own = lib['filepath'].startswith(os.path.dirname(np.__file__)); "
            "print(own, blas.gemm_address(np.float32)[1], lib['filepath'])")
    own, wide, path = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                     check=True).stdout.split()
    assert own == "True", path
    assert wide == str("64_" in path or "_64" in path), path


def test_summary_columns_widen_so_a_long_layer_name_never_runs_into_its_shape():
    model = models.Sequential([layers.Dense(3, name="a_rather_long_dense_layer_name_indeed", input_shape=(4,))])
    model.build(rng=np.random.default_rng(0))
    lines = []
    model.summary(print_fn=lines.append)
    row = next(line for line in lines[0].splitlines() if line.startswith("a_rather_long"))
    assert "(Dense)  (None, 3)" in row and row.endswith("15")
