"""Datasets: `load_dataset({type: name, **args})` -> Dataset. Each loader registers itself in DATASETS; its keyword
arguments are the keys of a config's `data:` section."""
from dlcli.data.dataset import DATASETS, Dataset, dataset_type, load_dataset
from dlcli.data.text import encode_texts
from dlcli.data import arrays, image_folder, images, language, table, text, timeseries  # noqa: F401,E402  (loaders register themselves)

__all__ = ["DATASETS", "Dataset", "dataset_type", "encode_texts", "load_dataset"]
