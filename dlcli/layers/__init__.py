"""Layers by family; importing this package registers every layer name a config may use."""
from dlcli.engine.graph import Input, InputLayer
from dlcli.engine.layer import LAYERS, Layer
from dlcli.layers.core import Activation, Dense, Dropout, Flatten, Reshape

__all__ = ["LAYERS", "Layer", "Input", "InputLayer", "Dense", "Activation", "Flatten", "Reshape", "Dropout"]
from dlcli.layers.conv import Conv1D, Conv2D, Conv2DTranspose, Conv3D, DepthwiseConv2D, SeparableConv2D  # noqa: E402

__all__ += ["Conv1D", "Conv2D", "Conv3D", "Conv2DTranspose", "DepthwiseConv2D", "SeparableConv2D"]
from dlcli.layers.pooling import (AveragePooling1D, AveragePooling2D, AveragePooling3D,  # noqa: E402
                                  GlobalAveragePooling1D, GlobalAveragePooling2D, GlobalAveragePooling3D,
                                  GlobalMaxPooling1D, GlobalMaxPooling2D, GlobalMaxPooling3D, MaxPooling1D,
                                  MaxPooling2D, MaxPooling3D)

__all__ += ["MaxPooling1D", "MaxPooling2D", "MaxPooling3D", "AveragePooling1D", "AveragePooling2D",
            "AveragePooling3D", "GlobalMaxPooling1D", "GlobalMaxPooling2D", "GlobalMaxPooling3D",
            "GlobalAveragePooling1D", "GlobalAveragePooling2D", "GlobalAveragePooling3D"]
from dlcli.layers.normalization import BatchNormalization, LayerNormalization  # noqa: E402

__all__ += ["BatchNormalization", "LayerNormalization"]
from dlcli.layers.embedding import Embedding, Masking  # noqa: E402
from dlcli.layers.recurrent import GRU, LSTM, SimpleRNN  # noqa: E402
from dlcli.layers.wrappers import Bidirectional, TimeDistributed  # noqa: E402

__all__ += ["Embedding", "Masking", "SimpleRNN", "LSTM", "GRU", "Bidirectional", "TimeDistributed"]
from dlcli.layers.reshaping import Cropping2D, SpatialDropout2D, UpSampling2D, ZeroPadding2D  # noqa: E402
from dlcli.layers.preprocessing import (RandomFlip, RandomRotation, RandomTranslation, RandomZoom,  # noqa: E402
                                        Rescaling)

__all__ += ["ZeroPadding2D", "Cropping2D", "UpSampling2D", "SpatialDropout2D", "RandomFlip", "RandomTranslation",
            "RandomRotation", "RandomZoom", "Rescaling"]
from dlcli.layers.merge import Add, Average, Concatenate, Dot, Maximum, Minimum, Multiply, Subtract  # noqa: E402

__all__ += ["Add", "Subtract", "Multiply", "Average", "Maximum", "Minimum", "Concatenate", "Dot"]
