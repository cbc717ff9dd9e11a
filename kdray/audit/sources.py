"""What an audit reads: the run's own split of a dataset, or any folder of images.

Each image becomes one :class:`Item` (path, label or -1, lesion mask or none, whether SHAP
explains it). Nothing is decoded here: the actors decode with kdray's own decoder, so a broken
file is a row with its reason, never a crash of the listing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from kdray.data.folders import IMAGE_EXTENSIONS, DataError, scan_folder
from kdray.data.prepare import SPLITS, Manifest, find_masks
from kdray.data.specs import DatasetSpec, normalise_name

__all__ = ["AuditSource", "Item", "folder_source", "manifest_source", "mark_shap"]

UNLABELLED = -1


@dataclass
class Item:
    """One image to audit (a row of the listing dataset).

    Attributes:
        index: position in the listing (rows come back in any order; the table is sorted by it).
        path: absolute path the actors read.
        name: the path shown to people (relative to the source's root).
        split: ``train`` / ``val`` / ``test`` / ``all``.
        label: class index, or -1 (unlabelled folder).
        mask: absolute path of the lesion mask, or "" (none).
        shap: SHAP explains this image (the seeded sample).
    """

    index: int
    path: str
    name: str
    split: str
    label: int
    mask: str = ""
    shap: bool = False


@dataclass
class AuditSource:
    """The images of one audit and where they came from."""

    description: str  # e.g. "the model's test split (synthetic stand-in ...)" or "folder /data/x"
    root: str
    labelled: bool
    items: list[Item]

    def rows(self) -> list[dict]:
        return [asdict(item) for item in self.items]


def manifest_source(manifest: Manifest, split: str, data: str = "") -> AuditSource:
    """The run's own split (``test``, ``val``, ``train`` or ``all``) from its manifest: the same
    files, labels and masks the training report scored.

    Args:
        data: what the data is, for the description (e.g. the model's record's phrase).

    Raises:
        DataError: an unknown split.
    """
    if split not in (*SPLITS, "all"):
        raise DataError(f"--split must be one of {[*SPLITS, 'all']}, not {split!r}")
    root = Path(manifest.root)
    masks_root = Path(manifest.masks_root) if manifest.masks_root else None
    entries = manifest.entries if split == "all" else manifest.split_entries(split)
    items = [
        Item(
            index=i,
            path=str(root / e["path"]),
            name=e["path"],
            split=e["split"],
            label=int(e["label"]),
            mask=str(masks_root / e["mask"]) if masks_root is not None and "mask" in e else "",
        )
        for i, e in enumerate(entries)
    ]
    which = "the model's own data" if split == "all" else f"the model's own {split} split"
    return AuditSource(f"{which} ({data})" if data else which, str(root), True, items)


def _has_class_folders(spec: DatasetSpec, root: Path) -> bool:
    """Any folder under ``root`` (three levels deep) named like one of the dataset's classes."""
    keys = spec.folder_keys()
    for depth in ("*", "*/*", "*/*/*"):
        if any(p.is_dir() and normalise_name(p.name) in keys for p in root.glob(depth)):
            return True
    return False


def folder_source(
    spec: DatasetSpec, root: str | Path, masks_root: str | Path | None = None, split: str = "all"
) -> AuditSource:
    """A folder of images: a Kaggle layout (class folders, with or without Training/Testing)
    gives labels; a folder without class folders is audited unlabelled (label -1: agreement and
    confidence are audited, accuracy is not). Files with an image suffix are listed whatever
    their content.

    Args:
        split: with a Training/Testing layout, ``train``, ``test`` or ``all``; otherwise ``all``.

    Raises:
        DataError: the folder is missing or holds no image; a class layout that is broken
            (unknown, duplicate or empty class folders: what the loaders refuse too).
    """
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise DataError(f"--root {root}: no such folder")
    if _has_class_folders(spec, root):
        found = scan_folder(spec, root)
        if split != "all" and split not in found:
            raise DataError(
                f"--split {split}: {root} has {sorted(found)} (no separate {split} folder)"
            )
        parts = [(s, found[s]) for s in found] if split == "all" else [(split, found[split])]
        listed = [(rel, label, name) for name, pairs in parts for rel, label in pairs]
        labelled = True
    else:
        if split != "all":
            raise DataError(f"--split {split}: {root} has no class folders, only 'all' applies")
        files = sorted(
            p
            for p in root.rglob("*")
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
        )
        listed = [(p.relative_to(root).as_posix(), UNLABELLED, "all") for p in files]
        labelled = False
    if not listed:
        raise DataError(f"--root {root}: no image files ({sorted(IMAGE_EXTENSIONS)})")
    masks = find_masks(
        Path(masks_root).expanduser() if masks_root else None, [r for r, *_ in listed]
    )
    mroot = Path(masks_root).expanduser().resolve() if masks_root else None
    items = [
        Item(
            index=i,
            path=str(root / rel),
            name=rel,
            split=part,
            label=int(label),
            mask=str(mroot / masks[rel]) if mroot is not None and rel in masks else "",
        )
        for i, (rel, label, part) in enumerate(listed)
    ]
    kind = "labelled" if labelled else "unlabelled"
    return AuditSource(f"folder {root} ({kind})", str(root), labelled, items)


def mark_shap(source: AuditSource, sample: int, seed: int) -> int:
    """Flag a seeded sample of ``sample`` images for SHAP (all when fewer); returns how many."""
    n = min(max(sample, 0), len(source.items))
    for i in np.random.default_rng(seed).permutation(len(source.items))[:n]:
        source.items[int(i)].shap = True
    return n
