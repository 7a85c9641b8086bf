"""The Keras 3 + JAX (CPU) peer of the benches: the same networks, data, batch sizes and optimizers as the dlcli and
PyTorch sides, trained with Keras' own `fit` (its data adapter, shuffling and metrics, as dlcli's `fit` runs) or
`predict`. Optional, like PyTorch: `pip install -e ".[bench]"` installs keras and jax; without them the column
reads "-".

JAX compiles each step function at its first call; compare() makes one untimed warm-up call of every peer first.
"""
import os


def keras_or_none():
    """keras on the JAX backend, or None when keras or jax is missing (the backend is fixed at keras' import)."""
    os.environ.setdefault("KERAS_BACKEND", "jax")
    try:
        import jax  # noqa: F401
        import keras
    except ImportError:
        return None
    if keras.backend.backend() != "jax":
        return None
    return keras


def versions() -> str:
    keras = keras_or_none()
    if keras is None:
        return "Keras -"
    import jax

    return f"Keras {keras.__version__} + JAX {jax.__version__} (CPU)"


def _rmsprop(keras):
    return keras.optimizers.RMSprop(learning_rate=1e-3)


def fit_runner(model, x, y, batch, shuffle=True, lead_in=False):
    """One `fit` epoch per call, a new shuffling seed each time (dlcli's fit_runner, Keras' side); with `lead_in`
    the first batch's step (`train_on_batch`, fit's compiled step) as the untimed lead-in of each round, beside
    the other peers' common.train_steps_runner."""
    keras = keras_or_none()
    seeds = iter(range(10**6))

    def run():
        keras.utils.set_random_seed(next(seeds))
        model.fit(x, y, epochs=1, batch_size=batch, verbose=0, shuffle=shuffle)
    if lead_in:
        run.lead_in = lambda: model.train_on_batch(x[:batch], y[:batch])
    return run


def mlp(keras, units=512):
    layers = keras.layers
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((784,)), layers.Dense(units, activation="relu"),
                              layers.Dense(10, activation="softmax")])
    model.compile(optimizer=_rmsprop(keras), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def convnet(keras):
    """configs/mnist_cnn.yaml."""
    layers = keras.layers
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((28, 28, 1)), layers.Conv2D(32, 3, activation="relu"),
                              layers.MaxPooling2D(2), layers.Conv2D(64, 3, activation="relu"), layers.MaxPooling2D(2),
                              layers.Conv2D(64, 3, activation="relu"), layers.Flatten(),
                              layers.Dense(64, activation="relu"), layers.Dense(10, activation="softmax")])
    model.compile(optimizer=_rmsprop(keras), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def recurrent(keras, cell, steps, features, units):
    layers = keras.layers
    keras.utils.set_random_seed(0)
    rnn = {"lstm": layers.LSTM, "gru": layers.GRU}[cell](units)
    model = keras.Sequential([keras.Input((steps, features)), rnn, layers.Dense(1, activation="sigmoid")])
    model.compile(optimizer=_rmsprop(keras), loss="binary_crossentropy", metrics=["accuracy"])
    return model


def resnet(keras, decay_steps=10128):
    """configs/fashion_mnist_resnet.yaml, layer for layer."""
    layers = keras.layers
    keras.utils.set_random_seed(0)

    def conv_bn(x, filters, kernel=3, strides=1):
        x = layers.Conv2D(filters, kernel, strides=strides, padding="same", use_bias=False)(x)
        return layers.BatchNormalization()(x)

    def block(x, filters, strides):
        y = layers.Activation("relu")(conv_bn(x, filters, 3, strides))
        y = conv_bn(y, filters)
        short = conv_bn(x, filters, 1, strides) if strides > 1 else x
        return layers.Activation("relu")(layers.Add()([y, short]))

    inputs = keras.Input((28, 28, 1))
    x = layers.MaxPooling2D(2)(layers.Activation("relu")(conv_bn(inputs, 32)))
    x = block(block(block(x, 32, 1), 64, 2), 64, 1)
    x = layers.Dropout(0.3)(layers.GlobalAveragePooling2D()(x))
    model = keras.Model(inputs, layers.Dense(10, activation="softmax")(x))
    schedule = keras.optimizers.schedules.CosineDecay(1e-3, decay_steps)
    model.compile(optimizer=keras.optimizers.Adam(schedule), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    return model
