"""Class folders, as Keras' image_dataset_from_directory / text_dataset_from_directory read them: each
sub-folder of `directory` is a class (class names: the sorted folder names), its files (searched recursively, in
sorted order) are that class's samples. Labels by `label_mode`: int, categorical (one-hot) or binary (two classes)."""
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dlcli.data.paths import resolve_path
from dlcli.errors import ConfigError, DlcliError

LABEL_MODES = ("int", "categorical", "binary")
ON_BAD_FILE = ("error", "skip")


@dataclass
class ClassFiles:
    """Files of a class-folder tree with their class index; `skipped` are (file, reason) left out."""

    directory: Path
    files: list[Path]
    labels: np.ndarray  # int64 class index per file
    class_names: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def per_class(self) -> dict[str, int]:
        counts = np.bincount(self.labels, minlength=len(self.class_names))
        return {name: int(c) for name, c in zip(self.class_names, counts)}

    def select(self, keep: np.ndarray) -> "ClassFiles":
        return ClassFiles(self.directory, [self.files[i] for i in keep], self.labels[keep], self.class_names,
                          self.skipped)

    def drop(self, bad: dict[int, str]) -> "ClassFiles":
        """Without the files at positions `bad` (position -> reason), which are added to `skipped`."""
        keep = np.array([i not in bad for i in range(len(self.files))], bool)
        return ClassFiles(self.directory, [f for f, k in zip(self.files, keep) if k], self.labels[keep],
                          self.class_names, self.skipped + [(str(self.files[i]), r) for i, r in sorted(bad.items())])


def check_folder_options(label_mode: str, on_bad_file: str) -> None:
    if label_mode not in LABEL_MODES:
        raise ConfigError(f"data.label_mode must be one of {', '.join(LABEL_MODES)}; got {label_mode!r}")
    if on_bad_file not in ON_BAD_FILE:
        raise ConfigError(f"data.on_bad_file must be 'error' (stop, naming the file) or 'skip' (leave it out, "
                          f"counted in the banner); got {on_bad_file!r}")


def list_class_files(directory: str, extensions: tuple[str, ...], what: str, on_bad_file: str = "error",
                     class_names: list[str] | None = None, key: str = "data.directory") -> ClassFiles:
    """The files with `extensions` (lower case, with the dot) under each class sub-folder. A class folder without
    such files is an error (or, with on_bad_file: skip, a skipped entry); other files are ignored, as Keras does."""
    root = resolve_path(directory, key)
    training = class_names is None  # a test folder is listed with the training folder's classes
    if not root.is_dir():
        raise DlcliError(f"{key}: {root} is not a folder (expected one sub-folder per class)")
    found = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if class_names is None:
        class_names = found
    else:
        missing = [c for c in class_names if c not in found]
        if missing:
            raise DlcliError(f"{key}: {root} has no sub-folder for class(es) {missing}; its sub-folders: {found}")
    if not class_names:
        raise DlcliError(f"{key}: {root} has no sub-folders; put each class's {what} in a sub-folder named after "
                         f"the class (e.g. {root}/cats/, {root}/dogs/)")
    files, labels, skipped = [], [], []
    for label, name in enumerate(class_names):
        mine = []
        for parent, dirs, names in os.walk(root / name):  # followlinks=False, as Keras' default
            dirs.sort()
            mine += [Path(parent) / n for n in sorted(names) if os.path.splitext(n)[1].lower() in extensions]
        if not mine:
            message = f"class folder {root / name} holds no {what} ({', '.join(extensions)})"
            if on_bad_file == "error":
                raise DlcliError(f"{key}: {message}; remove the folder or add {what} (or set data.on_bad_file: skip)")
            skipped.append((str(root / name), f"no {what}"))
        files += mine
        labels += [label] * len(mine)
    if not files:
        raise DlcliError(f"{key}: no {what} ({', '.join(extensions)}) in the class folders of {root}")
    populated = sorted(set(labels))
    if training and len(populated) == 1:
        warnings.warn(f"{key}: the {what} of {root} are all in one class folder, '{class_names[populated[0]]}': a "
                      f"classifier trained on one class learns nothing (add a sub-folder per class)", stacklevel=3)
    return ClassFiles(root, files, np.asarray(labels, np.int64), list(class_names), skipped)


def encode_labels(labels: np.ndarray, num_classes: int, label_mode: str, key: str = "data.label_mode"):
    """Keras' label modes: int -> int64 indices (what sparse losses take), categorical -> float32 one-hot,
    binary -> float32 (N, 1) for exactly two classes."""
    if label_mode == "int":
        return labels
    if label_mode == "categorical":
        return np.eye(num_classes, dtype=np.float32)[labels]
    if num_classes != 2:
        raise ConfigError(f"{key}: binary needs exactly 2 classes; the folder has {num_classes}")
    return labels.astype(np.float32)[:, None]


def limited(n: int, limit: int | None) -> np.ndarray:
    """`data.limit` for folders: `limit` of the n files drawn with a fixed seed (in file order), so a smoke run
    sees every class rather than the first folder's files only."""
    if limit is None or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(0).permutation(n)[:limit])


def banner_lines(folder: dict) -> list[str]:
    """What a class-folder dataset adds to `dlcli train`'s banner: files per class and skipped bad files."""
    per_class = folder.get("files_per_class") or {}
    counts = ", ".join(f"{name} {n:,}" for name, n in per_class.items())
    lines = [f"found {sum(per_class.values()):,} files in {len(per_class)} classes ({counts})"]
    if folder.get("test_files_per_class"):
        lines[0] += f"; test folder {sum(folder['test_files_per_class'].values()):,} files"
    skipped = folder.get("skipped") or []
    if skipped:
        shown = "; ".join(f"{f} ({reason})" for f, reason in skipped[:3])
        lines.append(f"skipped {len(skipped)} bad file(s) (data.on_bad_file: skip): {shown}"
                     + (" ..." if len(skipped) > 3 else ""))
    return lines


def prediction_files(paths: list[Path], extensions: tuple[str, ...]) -> list[Path]:
    """Input files for `dlcli predict`: files as given, folders searched recursively (class sub-folders too)."""
    files = []
    for p in paths:
        if p.is_dir():
            for parent, dirs, names in os.walk(p):
                dirs.sort()
                files += [Path(parent) / n for n in sorted(names) if os.path.splitext(n)[1].lower() in extensions]
        elif not p.exists():
            raise DlcliError(f"input {p} does not exist")
        else:
            files.append(p)
    if not files:
        raise DlcliError(f"no {', '.join(extensions)} files in {', '.join(map(str, paths))}")
    return files
