"""Writing a synthetic stand-in to disk in its public dataset's folder layout, masks beside it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from kdray.data.specs import get_spec
from kdray.data.synthetic.rendering import image_rng, render

__all__ = ["FOLDER_NAMES", "LAYOUTS", "TEST_FRACTION", "generate"]

LAYOUTS: dict[str, str] = {
    "brain_tumor": "train_test",
    "eye_disease": "flat",
    "alzheimer": "flat",
}
"""Dataset id -> folder layout written by :func:`generate` (``train_test`` or ``flat``)."""

FOLDER_NAMES: dict[str, tuple[str, ...]] = {
    "brain_tumor": ("glioma", "meningioma", "notumor", "pituitary"),
    "eye_disease": ("cataract", "diabetic_retinopathy", "glaucoma", "normal"),
    # The separator variant of one public version of the Alzheimer set.
    "alzheimer": ("Non_Demented", "Very_Mild_Demented", "Mild_Demented", "Moderate_Demented"),
}
"""Dataset id -> class folder names written by :func:`generate`, in label order."""

TEST_FRACTION = 0.2
"""Share of each class written to ``Testing`` for ``train_test`` layouts."""


def generate(
    dataset_id: str, root: Path, masks_root: Path, n_per_class: int, size: int, seed: int
) -> int:
    """Write the dataset as PNG files in the real Kaggle folder layout, plus one mask per image.

    Layouts (see :data:`LAYOUTS` and :data:`FOLDER_NAMES`):

    * ``brain_tumor``: ``root/Training/<class>/<class>_<i:05d>.png`` and ``root/Testing/...``;
      the last ``round(TEST_FRACTION * n_per_class)`` indices of each class (at least one when
      ``n_per_class >= 2``) go to ``Testing``.
    * ``eye_disease``: ``root/<class>/<class>_<i:05d>.png`` (RGB).
    * ``alzheimer``: ``root/<Folder>/<Folder>_<i:05d>.png`` with the separator folder names
      ``Non_Demented``, ``Very_Mild_Demented``, ``Mild_Demented``, ``Moderate_Demented``.

    MRI images are written as grayscale (``L``) PNGs, fundus photos as RGB. Each mask is an ``L``
    PNG with values 0 / 255 at the same relative path under ``masks_root``.

    Args:
        dataset_id: ``brain_tumor``, ``eye_disease`` or ``alzheimer``.
        root: dataset root folder (created if missing).
        masks_root: mask root folder (created if missing).
        n_per_class: images per class (before the train/test split).
        size: image side in pixels.
        seed: base seed; the same seed gives byte-identical files.

    Returns:
        The number of images written.
    """
    spec = get_spec(dataset_id)
    root, masks_root = Path(root), Path(masks_root)
    n = int(n_per_class)
    n_test = 0
    if LAYOUTS[dataset_id] == "train_test" and n >= 2:
        n_test = max(1, int(round(TEST_FRACTION * n)))
    written = 0
    for label in range(spec.num_classes):
        folder = FOLDER_NAMES[dataset_id][label]
        for i in range(n):
            if LAYOUTS[dataset_id] == "train_test":
                split = "Testing" if i >= n - n_test else "Training"
                rel = Path(split) / folder / f"{folder}_{i:05d}.png"
            else:
                rel = Path(folder) / f"{folder}_{i:05d}.png"
            img, m = render(dataset_id, label, image_rng(seed, dataset_id, label, i), size)
            for base, arr in ((root, img), (masks_root, m.astype(np.uint8) * 255)):
                path = base / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(arr).save(path, format="PNG")
            written += 1
    return written
