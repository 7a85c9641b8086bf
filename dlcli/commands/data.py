"""`dlcli data to-folder`: a built-in image dataset written out as PNG class folders (the layout `type: image_folder`
reads), to try folder training or to start a folder dataset of your own from a known one."""
from pathlib import Path
from typing import Annotated, Optional

import typer

from dlcli.commands.base import app, console, handles_errors

data_app = typer.Typer(help="Dataset utilities.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("to-folder")
@handles_errors
def to_folder(
    dataset: Annotated[str, typer.Argument(help="mnist or fashion_mnist.")],
    directory: Annotated[Path, typer.Argument(help="Output folder; gets train/<class>/*.png and test/<class>/*.png.")],
    limit: Annotated[Optional[int], typer.Option(help="Only the first N images of each split.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Write into a folder that is not empty, replacing "
                                                                "its train/ and test/ (nothing else in it is "
                                                                "touched).")] = False,
):
    """Write an image dataset as PNG files in class sub-folders, into a new or empty folder (or --overwrite).

    The files appear once all are written: a failure (a full disk) leaves the folder as it was.

    Example: dlcli data to-folder mnist digits/ && dlcli train configs/mnist_folder.yaml
    """
    import numpy as np

    from dlcli.data import DATASETS, dataset_type, load_dataset
    from dlcli.data.image_folder import check_output_folder, write_splits
    from dlcli.data.images import IdxImages
    from dlcli.errors import DlcliError

    built_in = [name for name in DATASETS.names() if isinstance(dataset_type({"type": name}), IdxImages)]
    if dataset not in built_in:
        raise DlcliError(f"dlcli data to-folder writes {' or '.join(built_in)}; got '{dataset}'", exit_code=2)
    check_output_folder(directory, overwrite)
    ds = load_dataset({"type": dataset, "limit": limit, "test_limit": limit, "normalize": False})
    splits = {"train": (ds.x_train.astype(np.uint8), ds.y_train), "test": (ds.x_test.astype(np.uint8), ds.y_test)}
    out = console()
    for split, counts in write_splits(splits, ds.classes, directory).items():
        out.print(f"{directory / split}: {sum(counts.values()):,} PNG files in {len(counts)} class folders",
                  markup=False)
