"""Models in and out of dlcli: ONNX export (onnx_graph, onnx_export; each layer emits its own nodes) and Keras import
(keras_files, keras_config, keras_import). Each needs an optional extra (dlcli.errors.require)."""
