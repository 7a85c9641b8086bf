"""Every exportable layer type, alone and in small graphs, runs in onnxruntime within 1e-5 of dlcli; the ONNX checker
passes (to_onnx runs it). A registered layer without a case here fails `test_every_layer_has_an_export_case`."""
import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from dlcli import layers  # noqa: E402
from dlcli.engine import activations  # noqa: E402
from dlcli.engine.layer import clear_session  # noqa: E402
from dlcli.interop.onnx_export import max_difference, sample_inputs, to_onnx  # noqa: E402
from dlcli.builder import model_from_config  # noqa: E402

TOLERANCE = 1e-5


def seq(shape, *stack, dtype=None):
    return {"input_shape": list(shape), "layers": list(stack), **({"input_dtype": dtype} if dtype else {})}


def graph(inputs, stack, outputs):
    return {"type": "functional", "inputs": [{"name": n, "shape": list(s), **({"dtype": d} if d else {})}
                                             for n, s, d in inputs], "layers": stack, "outputs": outputs}


def L(kind, **args):
    return {"type": kind, **args}


def two(a, b, merge, **args):
    """A two-input graph merging a (shape a) and b (shape b) with `merge`."""
    return graph([("a", a, None), ("b", b, None)], [L(merge, name="m", inputs=["a", "b"], **args)], ["m"])


LSTM4 = L("LSTM", units=4, return_sequences=True)
EMBED = L("Embedding", input_dim=4, output_dim=3, mask_zero=True)  # about one index in four is padding
CASES = {
    "Dense": seq([6], L("Dense", units=4, activation="relu")),
    "Dense-rank3-softmax": seq([3, 6], L("Dense", units=4, activation="softmax")),
    "EinsumDense": seq([5, 4], L("EinsumDense", equation="abc,cde->abde", output_shape=[None, 2, 3], bias_axes="de",
                                 activation="relu")),
    "EinsumDense-summed-axis": seq([3, 4], L("EinsumDense", equation="abc,bd->ad", output_shape=2)),
    "EinsumDense-ellipsis": seq([3, 2], L("EinsumDense", equation="ab...,bc->ac...", output_shape=4, bias_axes="c")),
    "RMSNormalization": seq([3, 4], L("RMSNormalization", axis=[-2, -1])),
    "ActivityRegularization": seq([4], L("ActivityRegularization", l1=0.1), L("Dense", units=2)),
    "Activation": seq([5], L("Activation", activation="gelu")),
    "Activation-glu-axis1": seq([4, 3], L("Activation", activation={"type": "glu", "axis": 1})),
    "ReLU": seq([2, 5], L("ReLU", max_value=6.0)),
    "Identity": seq([4], L("Identity"), L("Dense", units=2)),
    "RepeatVector": seq([4], L("RepeatVector", n=3)),
    "Permute": seq([3, 4, 2], L("Conv2D", filters=2, kernel_size=2), L("Permute", dims=[3, 1, 2])),
    "ZeroPadding1D": seq([5, 2], L("Conv1D", filters=2, kernel_size=2), L("ZeroPadding1D", padding=[1, 2])),
    "ZeroPadding3D": seq([3, 3, 3, 1], L("ZeroPadding3D", padding=[[1, 0], [0, 2], [1, 1]])),
    "Cropping1D": seq([6, 2], L("Cropping1D", cropping=[2, 1])),
    "Cropping3D": seq([4, 5, 4, 1], L("Conv3D", filters=2, kernel_size=2), L("Cropping3D")),
    "UpSampling1D": seq([4, 2], L("Conv1D", filters=2, kernel_size=2), L("UpSampling1D", size=3)),
    "UpSampling3D": seq([2, 3, 2, 1], L("UpSampling3D", size=[2, 1, 3])),
    "SpatialDropout1D": seq([4, 3], L("SpatialDropout1D", rate=0.5)),
    "SpatialDropout3D": seq([2, 2, 2, 3], L("SpatialDropout3D", rate=0.5)),
    "GaussianNoise": seq([4], L("GaussianNoise", stddev=0.5)),
    "GaussianDropout": seq([4], L("GaussianDropout", rate=0.5)),
    "AlphaDropout": seq([4], L("AlphaDropout", rate=0.5)),
    "GroupNormalization": seq([4, 4, 6], L("Conv2D", filters=6, kernel_size=2), L("GroupNormalization", groups=3)),
    "UnitNormalization": seq([3, 4], L("UnitNormalization", axis=[1, 2])),
    "Normalization": seq([3, 2], L("Normalization", mean=[1.0, -2.0], variance=[4.0, 0.25])),
    "Normalization-weights": seq([2, 3], L("Normalization", axis=[1, 2])),
    "ReLU-slope-threshold": seq([6], L("ReLU", max_value=1.0, negative_slope=0.1, threshold=0.3)),
    "ReLU-leaky": seq([6], L("ReLU", negative_slope=0.2)),
    "LeakyReLU": seq([4, 4, 2], L("Conv2D", filters=3, kernel_size=2), L("LeakyReLU")),
    "ELU": seq([6], L("ELU", alpha=0.5)),
    "Softmax": seq([3, 4, 2], L("Conv2D", filters=3, kernel_size=2), L("Softmax", axis=1)),
    "Softmax-axes": seq([3, 4], L("Softmax", axis=[1, 2])),
    "Softmax-masked": seq([6], EMBED, L("Dense", units=6), L("Softmax", axis=1)),
    "PReLU": seq([4, 4, 2], L("Conv2D", filters=3, kernel_size=2), L("PReLU", shared_axes=[1, 2],
                                                                        alpha_initializer="random_normal")),
    "Flatten-after-conv": seq([5, 5, 2], L("Conv2D", filters=3, kernel_size=3, padding="same"), L("Flatten"),
                              L("Dense", units=3)),
    "Reshape": seq([4, 4, 2], L("Conv2D", filters=2, kernel_size=1), L("Reshape", target_shape=[8, -1])),
    "Dropout": seq([6], L("Dropout", rate=0.5), L("Dense", units=2)),
    "Conv1D-causal-dilated": seq([10, 3], L("Conv1D", filters=4, kernel_size=3, padding="causal", dilation_rate=2)),
    "Conv2D-strided-same": seq([7, 7, 2], L("Conv2D", filters=4, kernel_size=3, strides=2, padding="same",
                                            activation="relu")),
    "Conv2D-valid-tanh": seq([6, 5, 1], L("Conv2D", filters=2, kernel_size=[3, 2], activation="tanh")),
    "Conv2D-groups": seq([6, 5, 4], L("Conv2D", filters=6, kernel_size=3, groups=2, padding="same", strides=2)),
    "Conv1D-groups-depthwise": seq([7, 3], L("Conv1D", filters=6, kernel_size=3, groups=3, dilation_rate=2)),
    "Conv3D": seq([5, 5, 5, 2], L("Conv3D", filters=3, kernel_size=2)),
    "Conv2DTranspose-same": seq([4, 4, 3], L("Conv2DTranspose", filters=2, kernel_size=3, strides=2, padding="same")),
    "Conv2DTranspose-valid": seq([3, 4, 2], L("Conv2DTranspose", filters=2, kernel_size=3, strides=2)),
    "Conv2DTranspose-output_padding": seq([3, 3, 2], L("Conv2DTranspose", filters=2, kernel_size=3, strides=2,
                                                       padding="same", output_padding=1)),
    "Conv1DTranspose": seq([5, 3], L("Conv1DTranspose", filters=2, kernel_size=3, strides=2, padding="same")),
    "Conv3DTranspose": seq([3, 3, 2, 2], L("Conv3DTranspose", filters=2, kernel_size=2, strides=2,
                                           activation="relu")),
    "DepthwiseConv1D": seq([7, 3], L("DepthwiseConv1D", kernel_size=3, depth_multiplier=2, padding="same")),
    "SeparableConv1D": seq([7, 3], L("SeparableConv1D", filters=4, kernel_size=3, dilation_rate=2)),
    "AdaptiveMaxPooling1D": seq([7, 3], L("AdaptiveMaxPooling1D", output_size=3)),
    "AdaptiveMaxPooling2D": seq([7, 5, 2], L("Conv2D", filters=2, kernel_size=1),
                                L("AdaptiveMaxPooling2D", output_size=[3, 2])),
    "AdaptiveMaxPooling3D": seq([3, 5, 2, 2], L("AdaptiveMaxPooling3D", output_size=[2, 3, 1])),
    "AdaptiveAveragePooling1D": seq([7, 3], L("AdaptiveAveragePooling1D", output_size=3)),
    "AdaptiveAveragePooling2D": seq([7, 5, 2], L("Conv2D", filters=2, kernel_size=1),
                                    L("AdaptiveAveragePooling2D", output_size=[3, 2])),
    "AdaptiveAveragePooling3D": seq([3, 5, 2, 2], L("AdaptiveAveragePooling3D", output_size=[2, 4, 1])),
    "DepthwiseConv2D": seq([6, 6, 3], L("DepthwiseConv2D", kernel_size=3, depth_multiplier=2, padding="same")),
    "SeparableConv2D": seq([6, 6, 3], L("SeparableConv2D", filters=4, kernel_size=3, depth_multiplier=2,
                                        activation="elu")),
    "MaxPooling1D": seq([9, 2], L("MaxPooling1D", pool_size=2, padding="same")),
    "MaxPooling2D": seq([7, 7, 2], L("MaxPooling2D", pool_size=3, strides=2, padding="same")),
    "MaxPooling3D": seq([4, 5, 4, 2], L("MaxPooling3D", pool_size=2)),
    "AveragePooling1D": seq([9, 2], L("AveragePooling1D", pool_size=2, padding="same")),
    "AveragePooling2D": seq([7, 7, 2], L("AveragePooling2D", pool_size=3, strides=2, padding="same")),
    "AveragePooling3D": seq([4, 4, 4, 2], L("AveragePooling3D", pool_size=2)),
    "GlobalMaxPooling1D": seq([6, 3], L("GlobalMaxPooling1D")),
    "GlobalMaxPooling2D": seq([5, 5, 3], L("Conv2D", filters=2, kernel_size=3), L("GlobalMaxPooling2D")),
    "GlobalMaxPooling3D": seq([3, 3, 3, 2], L("GlobalMaxPooling3D", keepdims=True)),
    "GlobalAveragePooling1D": seq([6, 3], L("GlobalAveragePooling1D")),
    "GlobalAveragePooling1D-masked": seq([7], EMBED, L("GlobalAveragePooling1D"), dtype="int32"),
    "GlobalAveragePooling2D": seq([5, 5, 3], L("Conv2D", filters=2, kernel_size=3), L("GlobalAveragePooling2D",
                                                                                       keepdims=True)),
    "GlobalAveragePooling3D": seq([3, 3, 3, 2], L("GlobalAveragePooling3D")),
    "BatchNormalization-conv": seq([5, 5, 3], L("Conv2D", filters=3, kernel_size=3), L("BatchNormalization"),
                                   L("Activation", activation="relu")),
    "BatchNormalization-dense": seq([6], L("BatchNormalization", epsilon=0.01, center=False)),
    "BatchNormalization-axis1": seq([4, 5], L("BatchNormalization", axis=1)),
    "LayerNormalization": seq([4, 6], L("LayerNormalization")),
    "LayerNormalization-two-axes": seq([3, 4, 2], L("LayerNormalization", axis=[2, 3], scale=False)),
    "LayerNormalization-axis1": seq([4, 5], L("LayerNormalization", axis=1)),
    "Embedding": seq([7], L("Embedding", input_dim=5, output_dim=3), dtype="int32"),
    "Embedding-float-input": seq([7], L("Embedding", input_dim=5, output_dim=3), L("Flatten")),
    "Masking": seq([6, 3], L("Masking"), L("LSTM", units=4)),
    "SimpleRNN": seq([6, 3], L("SimpleRNN", units=4, return_sequences=True)),
    "SimpleRNN-masked-relu": seq([7], EMBED, L("SimpleRNN", units=4, activation="relu")),
    "SimpleRNN-selu": seq([6, 3], L("SimpleRNN", units=4, activation="selu")),
    "LSTM": seq([6, 3], L("LSTM", units=4)),
    "LSTM-go_backwards": seq([6, 3], L("LSTM", units=4, go_backwards=True, return_sequences=True)),
    "LSTM-masked-stacked": seq([8], EMBED, LSTM4, L("LSTM", units=3, go_backwards=True), dtype="int32"),
    "LSTM-return_state": graph([("x", [5, 3], None)], [L("LSTM", name="r", units=4, return_state=True,
                                                         inputs="x")], ["r:0", "r:1", "r:2"]),
    "LSTM-no-bias-relu": seq([6, 3], L("LSTM", units=4, use_bias=False, activation="relu")),
    "GRU": seq([6, 3], L("GRU", units=4, return_sequences=True)),
    "GRU-reset_before": seq([6, 3], L("GRU", units=4, reset_after=False)),
    "GRU-masked": seq([8], EMBED, L("GRU", units=4, return_sequences=True), dtype="int32"),
    "GRU-masked-reset_before": seq([8], EMBED, L("GRU", units=4, reset_after=False), dtype="int32"),
    "Bidirectional-concat": seq([6, 3], L("Bidirectional", layer=LSTM4)),
    "Bidirectional-sum-GRU": seq([6, 3], L("Bidirectional", layer=L("GRU", units=3), merge_mode="sum")),
    "Bidirectional-ave-masked": seq([8], EMBED, L("Bidirectional", layer=LSTM4, merge_mode="ave"),
                                    L("GlobalAveragePooling1D"), dtype="int32"),
    "Bidirectional-mul-masked": seq([8], EMBED, L("Bidirectional", layer=L("SimpleRNN", units=3),
                                                  merge_mode="mul"), dtype="int32"),
    "Bidirectional-none-state": graph([("x", [5, 3], None)], [
        L("Bidirectional", name="b", layer=L("GRU", units=3, return_sequences=True, return_state=True),
          merge_mode=None, inputs="x")], ["b:0", "b:1", "b:2", "b:3"]),
    "SpectralNormalization": seq([5, 5, 2], L("SpectralNormalization", layer=L("Conv2D", filters=3, kernel_size=2)),
                                 L("Flatten")),
    "RNN": seq([6, 3], L("RNN", cell=L("LSTMCell", units=4), return_sequences=True)),
    "RNN-stacked-backwards-masked": seq([8], EMBED, L("RNN", cell=[L("GRUCell", units=3), L("SimpleRNNCell", units=2)],
                                                      go_backwards=True, return_sequences=True),
                                        L("GlobalAveragePooling1D"), dtype="int32"),
    "ConvLSTM1D": seq([4, 7, 2], L("ConvLSTM1D", filters=3, kernel_size=3, strides=2, padding="same",
                                    return_sequences=True, go_backwards=True)),
    "ConvLSTM2D": seq([3, 6, 5, 2], L("ConvLSTM2D", filters=3, kernel_size=(3, 2), dilation_rate=(1, 2)),
                      L("Flatten"), L("Dense", units=2)),
    "ConvLSTM2D-masked-stacked": seq([4, 5, 4, 2], L("Masking"),
                                     L("ConvLSTM2D", filters=3, kernel_size=3, padding="same", activation="relu",
                                       recurrent_activation="tanh", return_sequences=True),
                                     L("ConvLSTM2D", filters=2, kernel_size=2, padding="same", go_backwards=True)),
    "ConvLSTM2D-return_state": graph([("x", [3, 5, 5, 1], None)], [
        L("ConvLSTM2D", name="r", filters=2, kernel_size=3, return_state=True, use_bias=False, inputs="x"),
        L("Concatenate", name="cat", inputs=["r:0", "r:1", "r:2"])], ["cat", "r:2"]),
    "Bidirectional-ConvLSTM2D": seq([3, 4, 4, 1], L("Bidirectional", layer=L("ConvLSTM2D", filters=2, kernel_size=3,
                                                                         padding="same", return_sequences=True)),
                                    L("Bidirectional", layer=L("ConvLSTM2D", filters=2, kernel_size=2), merge_mode="ave")),
    "Bidirectional-ConvLSTM2D-unmerged": graph([("x", [3, 4, 4, 1], None)], [
        L("Bidirectional", name="b", layer=L("ConvLSTM2D", filters=2, kernel_size=3, return_sequences=True),
          merge_mode=None, inputs="x"),
        L("Conv3D", name="c", filters=2, kernel_size=2, inputs="b:1")], ["b:0", "c"]),  # Conv3D reads (T, 2, 2, 2)
    "ConvLSTM3D": seq([3, 3, 4, 3, 1], L("ConvLSTM3D", filters=2, kernel_size=2, padding="same", return_sequences=True)),
    "StackedRNNCells": seq([6, 3], L("StackedRNNCells", cells=[L("SimpleRNNCell", units=3), L("LSTMCell", units=2)])),
    "SimpleRNNCell": seq([6, 3], L("SimpleRNNCell", units=3)),
    "LSTMCell": seq([6, 3], L("LSTMCell", units=3)),
    "GRUCell": seq([6, 3], L("GRUCell", units=3, reset_after=False)),
    "LayerScale": seq([4, 4, 2], L("Conv2D", filters=3, kernel_size=2), L("LayerScale", init_values=0.5,
                                                                           projection_dim=3)),
    "StochasticDepth": seq([5], L("StochasticDepth", drop_path_rate=0.3), L("Dense", units=2)),
    "TimeDistributed": seq([4, 5], L("TimeDistributed", layer=L("Dense", units=3, activation="tanh"))),
    "TimeDistributed-conv": seq([3, 5, 5, 2], L("TimeDistributed", layer=L("Conv2D", filters=2, kernel_size=3)),
                                L("TimeDistributed", layer=L("Flatten"))),
    "TimeDistributed-masked": seq([6], EMBED, L("TimeDistributed", layer=L("Dense", units=2)),
                                  L("LSTM", units=3), dtype="int32"),
    "ZeroPadding2D": seq([4, 4, 2], L("ZeroPadding2D", padding=[[1, 2], [0, 1]])),
    "ZeroPadding2D-after-conv": seq([4, 4, 2], L("Conv2D", filters=2, kernel_size=1), L("ZeroPadding2D"),
                                    L("Flatten")),
    "Cropping2D": seq([6, 6, 2], L("Conv2D", filters=2, kernel_size=1), L("Cropping2D", cropping=[[1, 0], [2, 1]]),
                      L("Flatten")),
    "UpSampling2D": seq([3, 4, 2], L("UpSampling2D", size=[2, 3])),
    "SpatialDropout2D": seq([4, 4, 2], L("SpatialDropout2D", rate=0.3), L("Conv2D", filters=2, kernel_size=1)),
    "RandomFlip": seq([4, 4, 1], L("RandomFlip"), L("Flatten")),
    "Rescaling": seq([4, 4, 1], L("Rescaling", scale=1 / 255, offset=-0.5), L("Flatten")),
    "RandomTranslation": seq([4, 4, 1], L("RandomTranslation", height_factor=0.2, width_factor=0.2)),
    "RandomRotation": seq([4, 4, 1], L("RandomRotation", factor=0.1)),
    "RandomZoom": seq([4, 4, 1], L("RandomZoom", height_factor=0.2)),
    "Resizing": seq([5, 7, 2], L("Resizing", height=3, width=9)),
    "Resizing-nearest-crop": seq([6, 9, 1], L("Resizing", height=4, width=4, interpolation="nearest",
                                              crop_to_aspect_ratio=True)),
    "CenterCrop": seq([6, 7, 2], L("CenterCrop", height=3, width=4)),
    "CenterCrop-after-conv": seq([6, 6, 1], L("Conv2D", filters=2, kernel_size=3), L("CenterCrop", height=5,
                                                                                        width=2)),
    "RandomBrightness": seq([4, 4, 1], L("RandomBrightness", factor=0.2)),
    "RandomContrast": seq([4, 4, 1], L("RandomContrast", factor=0.2)),
    "RandomGrayscale": seq([4, 4, 3], L("RandomGrayscale")),
    "RandomInvert": seq([4, 4, 1], L("RandomInvert")),
    "RandomCrop": seq([6, 9, 2], L("RandomCrop", height=4, width=4)),
    "Solarization": seq([4, 4, 1], L("Solarization")),
    "RandomPosterization": seq([4, 4, 1], L("RandomPosterization", factor=4)),
    "RandomColorDegeneration": seq([4, 4, 3], L("RandomColorDegeneration", factor=0.5)),
    "AutoContrast": seq([4, 5, 3], L("AutoContrast", value_range=[-1, 1])),
    "AutoContrast-after-conv": seq([5, 5, 1], L("Conv2D", filters=2, kernel_size=2), L("AutoContrast", value_range=[0, 1])),
    "Equalization": seq([4, 4, 1], L("Equalization")),
    "ContrastLimitedAdaptiveHistogramEqualization": seq([11, 10, 2], L(
        "ContrastLimitedAdaptiveHistogramEqualization", tile_grid_size=[3, 4], value_range=[-1, 1])),
    "ContrastLimitedAdaptiveHistogramEqualization-no-clip": seq([8, 8, 3], L(
        "ContrastLimitedAdaptiveHistogramEqualization", clip_limit=0, tile_grid_size=[2, 2])),
    "RandomElasticTransform": seq([6, 6, 1], L("RandomElasticTransform")),
    "RandAugment": seq([5, 5, 3], L("RandAugment", num_ops=3)),
    "AugMix": seq([5, 5, 1], L("AugMix", all_ops=False)),
    "RandomSharpness": seq([4, 4, 1], L("RandomSharpness", factor=0.5)),
    "RandomGaussianBlur": seq([4, 4, 1], L("RandomGaussianBlur")),
    "RandomSaturation": seq([4, 4, 3], L("RandomSaturation", factor=0.5)),
    "RandomHue": seq([4, 4, 3], L("RandomHue", factor=0.5)),
    "RandomErasing": seq([4, 4, 1], L("RandomErasing")),
    "RandomShear": seq([4, 4, 1], L("RandomShear", x_factor=0.2)),
    "RandomPerspective": seq([4, 4, 1], L("RandomPerspective")),
    "RandomColorJitter": seq([4, 4, 3], L("RandomColorJitter", brightness_factor=0.2, hue_factor=0.2)),
    "Add": two([3, 4], [3, 4], "Add"),
    "CustomScaleLayer": two([3, 4], [3, 4], "CustomScaleLayer", scale=0.17),
    "Add-broadcast-rank": two([3, 4], [4], "Add"),
    "Subtract": two([5], [5], "Subtract"),
    "Multiply": graph([("a", [4], None), ("b", [4], None), ("c", [1], None)],
                      [L("Multiply", name="m", inputs=["a", "b", "c"])], ["m"]),
    "Average": two([2, 3], [2, 3], "Average"),
    "Maximum": two([5], [5], "Maximum"),
    "Minimum": two([5], [5], "Minimum"),
    "Concatenate": two([3, 4], [3, 2], "Concatenate"),
    "Concatenate-axis1": two([3, 4], [2, 4], "Concatenate", axis=1),
    "Concatenate-conv-channels": graph([("img", [5, 5, 2], None)], [
        L("Conv2D", name="c1", filters=3, kernel_size=3, padding="same", inputs="img"),
        L("Conv2D", name="c2", filters=2, kernel_size=1, inputs="img"),
        L("Concatenate", name="cat", inputs=["c1", "c2"]), L("Flatten", name="f", inputs="cat")], ["f"]),
    "Concatenate-masked-time": graph([("t", [5], "int32"), ("u", [4], "int32")], [
        L("Embedding", name="e1", input_dim=4, output_dim=3, mask_zero=True, inputs="t"),
        L("Embedding", name="e2", input_dim=4, output_dim=3, inputs="u"),
        L("Concatenate", name="cat", axis=1, inputs=["e1", "e2"]), L("LSTM", name="r", units=3, inputs="cat")],
        ["r"]),
    "Dot": two([3, 4], [5, 4], "Dot", axes=2),
    "ReversibleEmbedding": seq([4], L("ReversibleEmbedding", input_dim=6, output_dim=3), dtype="int32"),
    "ReversibleEmbedding-reverse-untied": seq([4, 3], L("ReversibleEmbedding", input_dim=6, output_dim=3,
                                                        tie_weights=False, reverse=True, logit_soft_cap=0.5)),
    # one layer embeds, then (shared, reverse) turns the hidden states into soft-capped logits: tied weights
    "ReversibleEmbedding-tied-logits": graph([("t", [5], "int32")], [
        L("ReversibleEmbedding", name="e", input_dim=7, output_dim=4, logit_soft_cap=1.0, mask_zero=True,
          inputs="t"),
        L("Dense", name="h", units=4, activation="tanh", inputs="e"),
        {"name": "logits", "shares": "e", "inputs": "h", "reverse": True}], ["logits"]),
    "Dot-normalize": two([6], [6], "Dot", axes=1, normalize=True),
    "MultiHeadAttention-masked-causal": seq([6], L("Embedding", input_dim=10, output_dim=4, mask_zero=True),
                                            L("MultiHeadAttention", num_heads=2, key_dim=3, use_causal_mask=True),
                                            L("GlobalAveragePooling1D"), dtype="int32"),
    "MultiHeadAttention-cross-scores": graph([("q", [5, 4], None), ("v", [3, 6], None), ("k", [3, 2], None),
                                              ("m", [5, 3], "int32")], [  # the mask input: 0 (about 1 in 10) masks
        L("MultiHeadAttention", name="att", num_heads=3, key_dim=2, value_dim=3, output_shape=[2, 3],
          return_attention_scores=True, inputs=["q", "v", "k", "m"])], ["att:0", "att:1"]),
    "MultiHeadAttention-masked-scores": graph([("t", [6], "int32")], [  # masked queries' rows are outputs too
        L("Embedding", name="e", input_dim=10, output_dim=4, mask_zero=True, inputs="t"),
        L("MultiHeadAttention", name="att", num_heads=2, key_dim=3, return_attention_scores=True,
          inputs=["e", "e"])], ["att:0", "att:1"]),
    "MultiHeadAttention-window-nobias": seq([7, 4], L("MultiHeadAttention", num_heads=1, key_dim=4, use_bias=False,
                                                      sliding_window=2)),
    "GroupQueryAttention-masked-causal": seq([6], L("Embedding", input_dim=10, output_dim=4, mask_zero=True),
                                             L("GroupQueryAttention", head_dim=3, num_query_heads=4,
                                               num_key_value_heads=2, use_causal_mask=True),
                                             L("GlobalAveragePooling1D"), dtype="int32"),
    "GroupQueryAttention-cross-scores": graph([("q", [5, 4], None), ("v", [3, 4], None)], [
        L("GroupQueryAttention", name="att", head_dim=2, num_query_heads=3, num_key_value_heads=1, use_bias=False,
          return_attention_scores=True, inputs=["q", "v"])], ["att:0", "att:1"]),
    "Attention-masked-causal-scores": graph([("t", [6], "int32")], [
        L("Embedding", name="e", input_dim=10, output_dim=4, mask_zero=True, inputs="t"),
        L("Attention", name="att", use_scale=True, use_causal_mask=True, return_attention_scores=True,
          inputs=["e", "e"])], ["att:0", "att:1"]),
    "Attention-concat-key": graph([("q", [5, 4], None), ("v", [3, 6], None), ("k", [3, 4], None)], [
        L("Attention", name="att", score_mode="concat", use_scale=True, inputs=["q", "v", "k"])], ["att"]),
    "AdditiveAttention-masked": graph([("t", [6], "int32"), ("u", [4], "int32")], [
        L("Embedding", name="e1", input_dim=10, output_dim=4, mask_zero=True, inputs="t"),
        L("Embedding", name="e2", input_dim=10, output_dim=4, mask_zero=True, inputs="u"),
        L("AdditiveAttention", name="att", inputs=["e1", "e2"])], ["att"]),
    "PositionEmbedding": seq([5, 3], L("PositionEmbedding", sequence_length=8)),
    "SinePositionEncoding": seq([5, 6], L("SinePositionEncoding")),
    "RotaryEmbedding": seq([5, 6], L("RotaryEmbedding")),
    "RotaryEmbedding-heads-axes": seq([4, 3, 5], L("RotaryEmbedding", max_wavelength=100, sequence_axis=-1,
                                                   feature_axis=1)),
    "TokenAndPositionEmbedding": seq([6], L("TokenAndPositionEmbedding", vocabulary_size=10, sequence_length=8,
                                            embedding_dim=4, mask_zero=True), L("GlobalAveragePooling1D"),
                                     dtype="int32"),
    "TransformerEncoder-masked": seq([6], L("Embedding", input_dim=10, output_dim=4, mask_zero=True),
                                     L("TransformerEncoder", intermediate_dim=5, num_heads=2, dropout=0.1),
                                     L("GlobalAveragePooling1D"), dtype="int32"),
    "TransformerEncoder-normalize-first": seq([5, 4], L("TransformerEncoder", intermediate_dim=3, num_heads=2,
                                                        normalize_first=True, activation="gelu")),
    "TransformerDecoder-cross": graph([("d", [5], "int32"), ("e", [4], "int32")], [
        L("Embedding", name="de", input_dim=10, output_dim=4, mask_zero=True, inputs="d"),
        L("Embedding", name="ee", input_dim=10, output_dim=4, mask_zero=True, inputs="e"),
        L("TransformerDecoder", name="dec", intermediate_dim=6, num_heads=2, inputs=["de", "ee"])], ["dec"]),
    "Discretization-one-hot": seq([3], L("Discretization", bin_boundaries=[-0.5, 0.0, 1.2], output_mode="one_hot"),
                                  L("Flatten")),
    "Discretization-multi-hot": seq([4], L("Discretization", bin_boundaries=[0.0, 1.0], output_mode="multi_hot")),
    "IntegerLookup-count": seq([4], L("IntegerLookup", vocabulary=[5, 1, 3], output_mode="count"), dtype="int32"),
    "IntegerLookup": seq([2], L("IntegerLookup", vocabulary=[5, 1, 3]), L("Dense", units=2), dtype="int32"),
    "StringLookup": seq([1], L("StringLookup", vocabulary=["red", "a", "c"], output_mode="one_hot"), dtype="string"),
    "CategoryEncoding": seq([3], L("CategoryEncoding", num_tokens=10, output_mode="count"), dtype="int32"),
    "Add-residual-conv": graph([("img", [6, 6, 2], None)], [
        L("Conv2D", name="c1", filters=4, kernel_size=3, padding="same", activation="relu", inputs="img"),
        L("Conv2D", name="c2", filters=4, kernel_size=3, padding="same", inputs="c1"),
        L("Add", name="skip", inputs=["c1", "c2"]), L("MaxPooling2D", name="p", inputs="skip"),
        L("GlobalAveragePooling2D", name="g", inputs="p"),
        L("Dense", name="out", units=3, activation="softmax", inputs="g"),
        L("Dense", name="aux", units=1, inputs="g")], ["out", "aux"]),
}


# refused with the reason (ExportError naming it), not exported
REFUSED = {"Hashing": (seq([1], L("Hashing", num_bins=4), dtype="string"), "FarmHash"),
           "HashedCrossing": (graph([("a", [1], "string"), ("b", [1], "int32")],
                                    [L("HashedCrossing", name="x", num_bins=4, inputs=["a", "b"])], ["x"]), "FarmHash")}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_layers_onnx_cannot_express_are_refused_with_the_reason(name):
    from dlcli.errors import ExportError

    spec, reason = REFUSED[name]
    with pytest.raises(ExportError, match=reason):
        to_onnx(random_model(spec))


def random_model(spec, seed=0):
    """The model with every weight drawn at random (BatchNormalization variances positive), so no weight is a
    trivial zero or one that would hide a layout mistake."""
    clear_session()
    rng = np.random.default_rng(seed)
    model = model_from_config(dict(spec), rng)
    for p in model.weights:
        value = rng.normal(0, 0.5, p.value.shape)
        p.value = (np.abs(value) + 0.5 if "variance" in p.name else value).astype(np.float32)
    return model


def inputs_for(name, model):
    xs = sample_inputs(model, 6, seed=1)
    if name == "Masking":  # whole steps equal to the mask value, anywhere in the sequence
        xs[0][:, [1, 4]] = 0
        xs[0][0] = 0
    if name == "ConvLSTM2D-masked-stacked":  # whole frames and single positions masked (Keras' Masking per position)
        xs[0][:, 1] = 0
        xs[0][::2, 3, 1:3, 2] = 0
    return xs


def difference(name, spec, opset=17):
    model = random_model(spec)
    proto = to_onnx(model, opset)
    return max_difference(proto.SerializeToString(), model, inputs_for(name, model)), proto


@pytest.mark.parametrize("name", sorted(CASES))
def test_layer_agrees_with_dlcli_in_onnxruntime(name):
    diff, _ = difference(name, CASES[name])
    assert diff <= TOLERANCE, f"{name}: onnxruntime differs from dlcli by {diff:.3g}"


def test_masked_recurrence_uses_scan_and_plain_one_uses_onnx_lstm():
    _, masked = difference("LSTM-masked-stacked", CASES["LSTM-masked-stacked"])
    _, plain = difference("LSTM", CASES["LSTM"])
    assert "Scan" in {n.op_type for n in masked.graph.node}
    assert {n.op_type for n in plain.graph.node} >= {"LSTM"} and "Scan" not in {n.op_type for n in plain.graph.node}


def test_convolutions_stay_channels_first_between_layers():
    spec = seq([8, 8, 1], L("Conv2D", filters=4, kernel_size=3, activation="relu"), L("MaxPooling2D"),
               L("Conv2D", filters=4, kernel_size=3), L("BatchNormalization"), L("Flatten"), L("Dense", units=2))
    diff, proto = difference("chain", spec)
    assert diff <= TOLERANCE
    assert [n.op_type for n in proto.graph.node].count("Transpose") == 2  # in, and before Flatten


@pytest.mark.parametrize("opset", [13, 21])
def test_other_opsets(opset):
    for name in ("LayerNormalization", "GRU-masked", "Add-residual-conv"):
        diff, proto = difference(name, CASES[name], opset)
        assert diff <= TOLERANCE and proto.opset_import[0].version == opset


ACTIVATION_ARGS = {"threshold": {"threshold": 0.1, "default_value": -0.5}, "squareplus": {"b": 2.0},
                   "celu": {"alpha": 0.7}, "soft_shrink": {"threshold": 0.3}, "hard_shrink": {"threshold": 0.2}}


@pytest.mark.parametrize("activation", activations.ACTIVATIONS.names())
def test_every_activation(activation):
    act = {"type": activation, **ACTIVATION_ARGS.get(activation, {})}
    # Dense's output (about N(0, 1) here) spreads over the kinks of clip-like functions
    diff, _ = difference("act", seq([5], L("Dense", units=4, kernel_initializer="he_normal"),
                                    L("Activation", activation=act)))
    assert diff <= TOLERANCE


def test_every_layer_has_an_export_case():
    covered = {name.split("-")[0] for name in CASES} | set(REFUSED)
    unmapped = [n for n in layers.LAYERS.names() if not hasattr(layers.LAYERS.get(n), "to_onnx")]
    assert not unmapped, f"layers without an ONNX emitter (add a to_onnx method beside the layer): {unmapped}"
    untested = [n for n in layers.LAYERS.names() if n not in covered]
    assert not untested, f"layers without a case in tests/interop/test_onnx_layers.py CASES: {untested}"
