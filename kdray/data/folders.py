"""Reading a real dataset folder: find the class folders, check them, read any image as RGB.

Layouts accepted (the public Kaggle versions):
- ``root/<Training|train>/<class>/...`` and ``root/<Testing|test>/<class>/...`` (own test split),
- ``root/<class>/...`` (one folder of class folders; kdray splits it),
- either of those under a single wrapping folder (``root/Alzheimer_s Dataset/train/...``).
Class folder names are matched case- and separator-insensitively, with per-dataset aliases.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from kdray.data.images import read_image
from kdray.data.specs import DatasetSpec, normalise_name

__all__ = ["IMAGE_EXTENSIONS", "DataError", "read_image", "read_mask", "scan_folder"]

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm"})
TRAIN_NAMES = frozenset({"training", "train"})
TEST_NAMES = frozenset({"testing", "test"})


class DataError(ValueError):
    """A dataset folder that kdray cannot use; the message says what is wrong and where."""


def _subdirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images_under(path: Path) -> list[Path]:
    return sorted(
        p
        for p in path.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
    )


def _scan_classes(spec: DatasetSpec, folder: Path, root: Path) -> list[tuple[str, int]]:
    """(path relative to root, label) for every image in the class folders of ``folder``."""
    keys = spec.folder_keys()
    found: dict[int, Path] = {}
    unknown: list[str] = []
    for sub in _subdirs(folder):
        label = keys.get(normalise_name(sub.name))
        if label is None:
            unknown.append(sub.name)
        elif label in found:
            raise DataError(
                f"{folder}: folders {found[label].name!r} and {sub.name!r} both map to class "
                f"{spec.classes[label]!r}"
            )
        else:
            found[label] = sub
    if unknown:
        raise DataError(
            f"{folder}: unknown class folder(s) {unknown} for dataset {spec.id!r}; "
            f"expected {list(spec.classes)} (case and separators are ignored)"
        )
    missing = [spec.classes[i] for i in range(spec.num_classes) if i not in found]
    if missing:
        raise DataError(
            f"{folder}: missing class folder(s) {missing} for dataset {spec.id!r}; "
            f"found {sorted(p.name for p in found.values())}"
        )
    items: list[tuple[str, int]] = []
    for label in range(spec.num_classes):
        images = _images_under(found[label])
        if not images:
            raise DataError(
                f"{found[label]}: class folder has no images "
                f"(looked for {sorted(IMAGE_EXTENSIONS)})"
            )
        items.extend((p.relative_to(root).as_posix(), label) for p in images)
    return items


def scan_folder(spec: DatasetSpec, root: str | Path) -> dict[str, list[tuple[str, int]]]:
    """Find the dataset's images under ``root``.

    Returns:
        ``{"train": [...], "test": [...]}`` when the copy has its own test folder, else
        ``{"all": [...]}``; each item is (path relative to root, label).

    Raises:
        DataError: the folder is missing or empty, or has unknown, duplicate, missing or empty
            class folders.
    """
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise DataError(f"dataset {spec.id!r}: folder {root} does not exist")
    folder = root
    while True:
        subdirs = _subdirs(folder)
        if not subdirs:
            raise DataError(f"dataset {spec.id!r}: folder {folder} is empty (no class folders)")
        names = {normalise_name(p.name): p for p in subdirs}
        train = next((names[n] for n in TRAIN_NAMES if n in names), None)
        test = next((names[n] for n in TEST_NAMES if n in names), None)
        if train is not None and test is not None:
            return {
                "train": _scan_classes(spec, train, root),
                "test": _scan_classes(spec, test, root),
            }
        # A single wrapping folder that is not itself a class folder: look inside it.
        if len(subdirs) == 1 and normalise_name(subdirs[0].name) not in spec.folder_keys():
            folder = subdirs[0]
            continue
        return {"all": _scan_classes(spec, folder, root)}


def read_mask(path: str | Path, size: int) -> np.ndarray:
    """A lesion mask file as bool (size, size); nearest-neighbour resize keeps it binary."""
    image = Image.open(path).convert("L")
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.NEAREST)
    return np.asarray(image) > 127
