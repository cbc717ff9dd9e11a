"""The three datasets kdray knows: ids, class names and the folder names each accepts."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = ["DATASETS", "DatasetSpec", "get_spec", "normalise_name"]


def normalise_name(name: str) -> str:
    """Folder-name key: case- and separator-insensitive (``Mild_Demented`` == ``milddemented``)."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


@dataclass(frozen=True)
class DatasetSpec:
    """One public dataset's identity.

    Attributes:
        id: kdray's dataset id (``brain_tumor``, ``eye_disease``, ``alzheimer``).
        classes: class names in label order (label i is ``classes[i]``).
        modality: ``mri`` (grayscale source) or ``fundus`` (RGB source).
        aliases: per class, extra folder names seen in public versions of the dataset.
    """

    id: str
    title: str
    classes: tuple[str, ...]
    modality: str
    aliases: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def folder_keys(self) -> dict[str, int]:
        """Normalised folder name -> label index, including aliases."""
        keys: dict[str, int] = {}
        for label, name in enumerate(self.classes):
            for candidate in (name, *self.aliases.get(name, ())):
                keys[normalise_name(candidate)] = label
        return keys


DATASETS: dict[str, DatasetSpec] = {
    spec.id: spec
    for spec in (
        DatasetSpec(
            id="brain_tumor",
            title="Brain Tumor MRI (Kaggle, 7,023 slices)",
            classes=("glioma", "meningioma", "notumor", "pituitary"),
            modality="mri",
            # The older Sartaj version of the set names its folders <type>_tumor / no_tumor.
            aliases={
                "glioma": ("glioma_tumor",),
                "meningioma": ("meningioma_tumor",),
                "notumor": ("no_tumor", "no_tumour", "normal"),
                "pituitary": ("pituitary_tumor",),
            },
        ),
        DatasetSpec(
            id="eye_disease",
            title="Eye Diseases Classification (Kaggle, 4,217 fundus photos)",
            classes=("cataract", "diabetic_retinopathy", "glaucoma", "normal"),
            modality="fundus",
        ),
        DatasetSpec(
            id="alzheimer",
            title="Alzheimer MRI 4-class (Kaggle)",
            classes=("NonDemented", "VeryMildDemented", "MildDemented", "ModerateDemented"),
            modality="mri",
        ),
    )
}


def get_spec(dataset_id: str) -> DatasetSpec:
    """Return the spec of ``dataset_id``.

    Raises:
        ValueError: the id is not one of :data:`DATASETS`, with the allowed ids.
    """
    try:
        return DATASETS[dataset_id]
    except KeyError:
        raise ValueError(
            f"unknown dataset {dataset_id!r}; expected one of {sorted(DATASETS)}"
        ) from None
