"""The engine: activations, initializers, regularizers, the Layer base class and the graph executor."""
