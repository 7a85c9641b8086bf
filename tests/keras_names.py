"""Keras 3.15's public names, family by family, and what dlcli does with each (tests/test_catalogue.py checks
this against dlcli's registries, and against Keras itself where it is installed).

DONE: registered under that name. TODO: not yet (the test fails once it is registered, so this list stays true).
Anything else is the reason the name is left out on purpose. ALIAS(x): Keras' second name for x; dlcli registers the
name Keras saves in its files, and a config using the alias gets a did-you-mean."""

DONE, TODO = "done", "todo"


def ALIAS(name):
    return f"alias of {name}"


KERAS_VERSION = "3.15.1"
BASE = "a base or wrapper class, not something a config names"

LAYERS = {
    **{n: DONE for n in [
        "Activation", "ActivityRegularization", "AdaptiveAveragePooling1D", "AdaptiveAveragePooling2D",
        "AdaptiveAveragePooling3D", "AdaptiveMaxPooling1D", "AdaptiveMaxPooling2D", "AdaptiveMaxPooling3D", "Add",
        "AdditiveAttention", "AlphaDropout", "Attention", "Average", "AveragePooling1D", "AveragePooling2D",
        "AveragePooling3D", "BatchNormalization", "Bidirectional", "CategoryEncoding", "Concatenate", "Conv1D",
        "Conv1DTranspose", "Conv2D", "Conv2DTranspose", "Conv3D", "Conv3DTranspose", "ConvLSTM1D", "ConvLSTM2D",
        "ConvLSTM3D", "Cropping1D", "Cropping2D", "Cropping3D", "Dense", "DepthwiseConv1D", "DepthwiseConv2D",
        "Discretization", "Dot", "Dropout", "ELU",
        "EinsumDense", "Embedding", "Flatten", "GRU", "GRUCell", "GaussianDropout", "GaussianNoise",
        "GlobalAveragePooling1D", "GlobalAveragePooling2D", "GlobalAveragePooling3D", "GlobalMaxPooling1D",
        "GlobalMaxPooling2D", "GlobalMaxPooling3D", "GroupNormalization", "GroupQueryAttention", "HashedCrossing",
        "Hashing", "Identity", "IntegerLookup", "LSTM", "LSTMCell", "LayerNormalization", "LeakyReLU", "Masking",
        "MaxPooling1D", "MaxPooling2D", "MaxPooling3D", "Maximum", "Minimum", "MultiHeadAttention", "Multiply",
        "Normalization", "PReLU", "Permute", "RMSNormalization", "RNN", "RandomFlip", "RandomRotation",
        "RandomTranslation", "RandomZoom", "ReLU", "RepeatVector", "Rescaling", "Reshape", "ReversibleEmbedding",
        "SeparableConv1D",
        "SeparableConv2D", "SimpleRNN", "SimpleRNNCell", "Softmax", "SpatialDropout1D", "SpatialDropout2D",
        "SpatialDropout3D", "SpectralNormalization", "StackedRNNCells", "StringLookup", "Subtract", "TimeDistributed",
        "UnitNormalization", "UpSampling1D", "UpSampling2D", "UpSampling3D", "ZeroPadding1D", "ZeroPadding2D",
        "ZeroPadding3D"]},
    **{n: DONE for n in ["AugMix", "AutoContrast", "CenterCrop", "ContrastLimitedAdaptiveHistogramEqualization", "Equalization",
                         "RandAugment", "RandomBrightness", "RandomColorDegeneration", "RandomColorJitter",
                         "RandomContrast", "RandomCrop", "RandomElasticTransform", "RandomErasing",
                         "RandomGaussianBlur", "RandomGrayscale",
                         "RandomHue", "RandomInvert", "RandomPosterization", "RandomSaturation", "RandomSharpness",
                         "RandomPerspective", "RandomShear",
                         "Resizing", "Solarization"]},  # image preprocessing
    **{f"{a}{d}": ALIAS(f"{c}{d}") for a, c in [("AvgPool", "AveragePooling"), ("MaxPool", "MaxPooling"),
                                                ("GlobalAvgPool", "GlobalAveragePooling"),
                                                ("GlobalMaxPool", "GlobalMaxPooling")] for d in ("1D", "2D", "3D")},
    **{f"Convolution{d}": ALIAS(f"Conv{d}") for d in ("1D", "2D", "3D")},
    **{f"Convolution{d}Transpose": ALIAS(f"Conv{d}Transpose") for d in ("1D", "2D", "3D")},
    "SeparableConvolution1D": ALIAS("SeparableConv1D"), "SeparableConvolution2D": ALIAS("SeparableConv2D"),
    # left out on purpose
    "Lambda": "runs arbitrary Python: a config never imports or runs code (import-keras refuses it by name)",
    "TorchModuleWrapper": "wraps a PyTorch module: dlcli runs on NumPy only",
    "JaxLayer": "wraps a JAX function: dlcli runs on NumPy only",
    "FlaxLayer": "wraps a Flax module: dlcli runs on NumPy only",
    "TFSMLayer": "loads a TensorFlow SavedModel: dlcli runs on NumPy only",
    "MelSpectrogram": "audio front end: dlcli has no audio data sources",
    "STFTSpectrogram": "audio front end: dlcli has no audio data sources",
    "MaxNumBoundingBoxes": "bounding-box preprocessing: dlcli has no detection data",
    "Pipeline": "chains preprocessing layers for tf.data: a dlcli model lists its layers in order",
    "TextVectorization": "text becomes indices or vectors in dlcli's text data sources (output_mode), not a layer",
    "InputLayer": "a config gives input_shape (or functional inputs) instead",
    **{n: "mixes the labels too, which a layer in a model never sees: train.mix applies it to each training batch"
       for n in ["CutMix", "MixUp"]},
    "Layer": BASE, "InputSpec": BASE, "Wrapper": BASE,
}

# Layers dlcli registers that are not keras.layers, and where they come from
OTHER_LAYERS = {
    **{n: "KerasHub (keras_hub.layers), mapped by name on import" for n in [
        "PositionEmbedding", "RotaryEmbedding", "SinePositionEncoding", "TokenAndPositionEmbedding",
        "TransformerDecoder", "TransformerEncoder"]},
    **{n: "keras.applications.convnext's own layers, mapped by name on import" for n in [
        "LayerScale", "StochasticDepth"]},
    "CustomScaleLayer": "keras.applications.inception_resnet_v2's own layer, mapped by name on import"}

ACTIVATIONS = {
    **{n: DONE for n in [
        "celu", "elu", "exponential", "gelu", "glu", "hard_shrink", "hard_sigmoid", "hard_silu", "hard_swish",
        "hard_tanh", "leaky_relu", "linear", "log_sigmoid", "log_softmax", "mish", "relu", "relu6", "selu",
        "sigmoid", "silu", "soft_shrink", "softmax", "softplus", "softsign", "sparse_plus", "sparse_sigmoid",
        "sparsemax", "squareplus", "swish", "tanh", "tanh_shrink", "threshold"]},
    **{n: "a helper of keras.activations, not an activation" for n in ["deserialize", "get", "serialize"]},
}

LOSSES = {
    **{n: DONE for n in [
        "BinaryCrossentropy", "BinaryFocalCrossentropy", "CTC", "CategoricalCrossentropy",
        "CategoricalFocalCrossentropy", "CategoricalGeneralizedCrossEntropy", "CategoricalHinge", "Circle",
        "CosineSimilarity", "Dice", "Hinge", "Huber", "KLDivergence", "LogCosh", "MeanAbsoluteError",
        "MeanAbsolutePercentageError", "MeanSquaredError", "MeanSquaredLogarithmicError", "Poisson",
        "SparseCategoricalCrossentropy", "SquaredHinge", "Tversky"]},
    "Loss": BASE,
}

METRICS = {
    **{n: DONE for n in [
        "AUC", "Accuracy", "BinaryAccuracy", "BinaryCrossentropy", "BinaryIoU", "CategoricalAccuracy",
        "CategoricalCrossentropy", "CategoricalHinge", "ConcordanceCorrelation", "CosineSimilarity", "F1Score",
        "FBetaScore", "FalseNegatives", "FalsePositives", "Hinge", "IoU", "KLDivergence", "LogCoshError",
        "MeanAbsoluteError", "MeanAbsolutePercentageError", "MeanIoU", "MeanSquaredError",
        "MeanSquaredLogarithmicError", "OneHotIoU", "OneHotMeanIoU", "PearsonCorrelation", "Poisson", "Precision",
        "PrecisionAtRecall", "R2Score", "Recall", "RecallAtPrecision", "RootMeanSquaredError",
        "SensitivityAtSpecificity", "SparseCategoricalAccuracy", "SparseCategoricalCrossentropy",
        "SparseTopKCategoricalAccuracy", "SpecificityAtSensitivity", "SquaredHinge", "TopKCategoricalAccuracy",
        "TrueNegatives", "TruePositives"]},
    "Metric": BASE, "MeanMetricWrapper": BASE,
    "Mean": "a running mean of any value: dlcli's loss tracker (metrics.Mean), not a metric of outputs",
    "Sum": "a running sum of any value, not a metric of outputs",
}

OPTIMIZERS = {
    **{n: DONE for n in ["Adadelta", "Adafactor", "Adagrad", "Adam", "AdamW", "Adamax", "Ftrl", "Lamb", "Lion",
                         "MultiOptimizer", "Muon", "Nadam", "RMSprop", "SGD", "ScheduleFreeAdamW"]},
    "OptimizerMap": "not an optimizer: MultiOptimizer's optimizer_map ({type: OptimizerMap, default_optimizer, "
                    "optimizer_map}), which dlcli reads there",
    "LossScaleOptimizer": "loss scaling for float16 training: dlcli trains in float32",
    "Optimizer": BASE,
}

SCHEDULES = {
    **{n: DONE for n in ["CosineDecay", "CosineDecayRestarts", "ExponentialDecay", "InverseTimeDecay",
                         "PiecewiseConstantDecay", "PolynomialDecay"]},
    "LearningRateSchedule": BASE,
}

# Keras exports each initializer as a class and a snake_case function; a config names either
INITIALIZERS = {
    **{n: DONE for n in [
        "Constant", "GlorotNormal", "GlorotUniform", "HeNormal", "HeUniform", "Identity", "LecunNormal",
        "LecunUniform", "Ones", "Orthogonal", "RandomNormal", "RandomUniform", "TruncatedNormal", "VarianceScaling",
        "Zeros", "constant", "glorot_normal", "glorot_uniform", "he_normal", "he_uniform", "identity", "lecun_normal",
        "lecun_uniform", "ones", "orthogonal", "random_normal", "random_uniform", "truncated_normal",
        "variance_scaling", "zeros"]},
    "IdentityInitializer": ALIAS("Identity"), "OrthogonalInitializer": ALIAS("Orthogonal"),
    "STFT": "initializes audio STFT kernels: dlcli has no audio layers", "STFTInitializer": ALIAS("STFT"),
    "stft": ALIAS("STFT"), "Initializer": BASE,
    **{n: "a helper of keras.initializers, not an initializer" for n in ["deserialize", "get", "serialize"]},
}

FAMILIES = {"layers": LAYERS, "activations": ACTIVATIONS, "losses": LOSSES, "metrics": METRICS,
            "optimizers": OPTIMIZERS, "schedules": SCHEDULES, "initializers": INITIALIZERS}
