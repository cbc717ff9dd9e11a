"""From a config to in-memory arrays: synthetic generation, the split manifest, the array cache.

The manifest (``<workspace>/manifests/<dataset>-<fingerprint>.json``) fixes the split once; the
fingerprint covers the file list, the fractions and the seed (and, with a masks root, the mask
files), so the same data and settings always give the same split, and any change gives a new
manifest. Arrays are cached as ``.npz``
per manifest and image size and shipped to Ray workers through the object store, so workers
need no shared disk.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kdray.config import DataConfig
from kdray.data import synthetic
from kdray.data.folders import IMAGE_EXTENSIONS, DataError, read_image, read_mask, scan_folder
from kdray.data.images import ImageError, check_image
from kdray.data.record import DataSource
from kdray.data.specs import DatasetSpec, get_spec
from kdray.workspace import Workspace

__all__ = [
    "Manifest",
    "PreparedData",
    "Split",
    "build_manifest",
    "in_memory_synthetic",
    "prepare_dataset",
    "prepare_manifest",
    "stratified_split",
]

SPLITS = ("train", "val", "test")
log = logging.getLogger("kdray")


@dataclass
class Split:
    """One split in memory: images uint8 (N, 3, H, W), labels int64 (N,), masks bool or None.

    ``masks`` (N, H, W) is set when any image of the split has a lesion mask; an image without
    one (a healthy class, or a mask set that skips it) has an empty mask, which the localisation
    scores leave out.
    """

    images: np.ndarray
    labels: np.ndarray
    masks: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def take(self, indices: np.ndarray) -> Split:
        """The images at ``indices`` (with their masks)."""
        return Split(
            self.images[indices],
            self.labels[indices],
            None if self.masks is None else self.masks[indices],
        )


@dataclass
class Manifest:
    dataset: str
    root: str
    masks_root: str | None
    class_names: list[str]
    fingerprint: str
    # {"path", "label", "split"} and "mask" (relative to masks_root) where the image has one.
    entries: list[dict] = field(default_factory=list)
    # Unreadable files left out (data.skip_unreadable): {"path", "reason"}; older manifests lack it.
    skipped: list[dict] = field(default_factory=list)

    def split_entries(self, split: str) -> list[dict]:
        return [e for e in self.entries if e["split"] == split]

    def counts(self) -> dict[str, int]:
        return {s: len(self.split_entries(s)) for s in SPLITS}


@dataclass
class PreparedData:
    spec: DatasetSpec
    manifest: Manifest
    image_size: int
    splits: dict[str, Split]
    # The share of each class of the training split kept (``data.synthetic.student_fraction``);
    # below 1 only in the copy :meth:`for_students` makes.
    student_fraction: float = 1.0
    # Where the images came from (kdray.data.record): set by prepare_dataset; else read from the
    # manifest's root (the stand-in's folder names its generator parameters).
    source: DataSource | None = None

    def __post_init__(self) -> None:
        if self.source is None:
            self.source = DataSource.from_root(self.manifest.root, self.manifest.masks_root)

    @property
    def key(self) -> str:
        """Identifies the data a model saw: manifest fingerprint + input size."""
        return f"{self.manifest.fingerprint[:12]}-{self.image_size}"

    def student_indices(self, fraction: float, seed: int) -> np.ndarray:
        """Rows of the training split the students train on: ``fraction`` of each class, seeded.

        All rows, in order, when ``fraction`` is 1. Otherwise a stratified share (at least one
        image per class), sorted, so the teacher's cached logits on the training split are picked
        by the same rows.
        """
        labels = np.asarray(self.splits["train"].labels)
        if fraction >= 1.0:
            return np.arange(len(labels))
        rows = []
        for label in np.unique(labels):
            indices = np.flatnonzero(labels == label)
            keep = max(1, int(round(fraction * len(indices))))
            order = np.random.default_rng([seed, int(label), 1]).permutation(len(indices))
            rows.append(indices[order[:keep]])
        return np.sort(np.concatenate(rows))

    def for_students(self, fraction: float, seed: int) -> PreparedData:
        """This data with the training split cut to :meth:`student_indices` (val and test whole)."""
        if fraction >= 1.0:
            return self
        train = self.splits["train"].take(self.student_indices(fraction, seed))
        return PreparedData(
            self.spec,
            self.manifest,
            self.image_size,
            {**self.splits, "train": train},
            student_fraction=fraction,
            source=self.source,
        )


def stratified_split(
    labels: list[int], fractions: dict[str, float], seed: int, names: list[str] | None = None
) -> list[str]:
    """Assign each index a split name, per class, with a seeded shuffle.

    ``fractions`` maps split names to shares of each class (the rest goes to ``train``); a class
    with at least len(fractions) + 1 images gets at least one image in every split. A smaller
    class is logged as a warning (by its name in ``names``), since some split then lacks it.
    """
    result = ["train"] * len(labels)
    by_label: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_label.setdefault(label, []).append(i)
    for label, indices in sorted(by_label.items()):
        if len(indices) <= len(fractions):
            log.warning(
                "class %r has only %d image(s): too few for one in each of train and %s; "
                "some of these splits will have none of it",
                names[label] if names else label,
                len(indices),
                " and ".join(fractions),
            )
        order = np.random.default_rng([seed, label]).permutation(len(indices))
        start = 0
        for name, share in fractions.items():
            n = int(round(share * len(indices)))
            if len(indices) > len(fractions):
                n = max(n, 1)
            for j in order[start : start + n]:
                result[indices[j]] = name
            start += n
    return result


def find_masks(masks_root: Path | None, rels: list[str]) -> dict[str, str]:
    """The mask file of each image that has one, relative to ``masks_root``.

    The mask tree mirrors the image tree: the same relative path, in any image format (the
    same path with another extension also counts, e.g. ``glioma/001.jpg`` -> ``glioma/001.png``).
    Images without a mask file are simply absent from the result.
    """
    if masks_root is None or not masks_root.is_dir():
        return {}
    by_stem: dict[str, list[str]] = {}
    for path in masks_root.rglob("*"):
        if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
            rel = path.relative_to(masks_root)
            by_stem.setdefault(rel.with_suffix("").as_posix(), []).append(rel.as_posix())
    out = {}
    for rel in rels:
        candidates = by_stem.get(Path(rel).with_suffix("").as_posix())
        if candidates:
            out[rel] = rel if rel in candidates else sorted(candidates)[0]
    return out


def _fingerprint(
    spec: DatasetSpec,
    root: Path,
    found: dict,
    cfg: DataConfig,
    masks_root: Path | None,
    masks: dict[str, str],
) -> str:
    h = hashlib.sha256()
    h.update(
        json.dumps(
            [spec.id, str(root), cfg.val_fraction, cfg.test_fraction, cfg.split_seed]
        ).encode()
    )
    for part in sorted(found):
        for rel, label in found[part]:
            h.update(f"{part}|{rel}|{label}|{(root / rel).stat().st_size}\n".encode())
    if masks_root is not None:  # masks added (or changed) later give a new manifest and cache
        h.update(f"masks|{masks_root}\n".encode())
        for rel, mask in sorted(masks.items()):
            h.update(f"{rel}|{mask}|{(masks_root / mask).stat().st_size}\n".encode())
    return h.hexdigest()


def _unreadable_error(spec: DatasetSpec, root: Path, bad: list[dict]) -> DataError:
    lines = "\n".join(f"  {b['path']}: {b['reason']}" for b in bad)
    return DataError(
        f"dataset {spec.id!r}: {len(bad)} unreadable image file(s) under {root}:\n{lines}\n"
        "fix or remove them, or set data.skip_unreadable: true to leave them out"
    )


def _check_files(
    spec: DatasetSpec, root: Path, found: dict, cfg: DataConfig
) -> tuple[dict, list[dict]]:
    """Decode every file once: ``found`` without the unreadable files, and those files.

    Returns:
        The kept ``found`` and the skipped files as ``{"path", "reason"}`` (empty if none).

    Raises:
        DataError: unreadable files and ``cfg.skip_unreadable`` is off (all of them listed), or a
            class left without readable images.
    """
    rels = sorted({rel for items in found.values() for rel, _ in items})
    # Threads: Pillow and zlib decode without the GIL, so checking overlaps on several cores.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        reasons = dict(zip(rels, pool.map(lambda rel: check_image(root / rel), rels), strict=True))
    bad = [{"path": rel, "reason": reasons[rel]} for rel in rels if reasons[rel] is not None]
    if not bad:
        return found, []
    if not cfg.skip_unreadable:
        raise _unreadable_error(spec, root, bad)
    kept = {
        part: [(r, lab) for r, lab in items if reasons[r] is None] for part, items in found.items()
    }
    for part, items in kept.items():
        empty = sorted(set(range(spec.num_classes)) - {lab for _, lab in items})
        if empty:
            raise DataError(
                f"dataset {spec.id!r}: no readable images left for class(es) "
                f"{[spec.classes[i] for i in empty]} ({part}) after leaving out unreadable files"
            )
    _warn_skipped(spec, root, bad)
    return kept, bad


def _warn_skipped(spec: DatasetSpec, root: Path, skipped: list[dict]) -> None:
    log.warning(
        "dataset %r: leaving out %d unreadable image file(s) under %s "
        "(data.skip_unreadable; listed in the manifest's 'skipped'), e.g. %s: %s",
        spec.id,
        len(skipped),
        root,
        skipped[0]["path"],
        skipped[0]["reason"],
    )


def build_manifest(
    spec: DatasetSpec, root: Path, masks_root: Path | None, cfg: DataConfig, ws: Workspace
) -> Manifest:
    """Scan ``root``, check every file, split (own test folder where there is one), write it.

    Every file is decoded once; unreadable ones fail the build, or with ``cfg.skip_unreadable``
    are left out and recorded in ``Manifest.skipped``. An existing manifest with the same
    fingerprint is reused as is, without checking the files again (the fingerprint covers paths
    and sizes).

    Raises:
        DataError: a bad folder layout, or unreadable files (all listed with their reasons) while
            ``cfg.skip_unreadable`` is off, also when a reused manifest had left files out.
    """
    root = root.resolve()
    masks_root = masks_root.resolve() if masks_root else None
    found = scan_folder(spec, root)
    masks = find_masks(masks_root, [rel for part in found.values() for rel, _ in part])
    fingerprint = _fingerprint(spec, root, found, cfg, masks_root, masks)
    path = ws.manifests / f"{spec.id}-{fingerprint[:12]}.json"
    if path.is_file():
        manifest = Manifest(**json.loads(path.read_text()))
        if manifest.skipped and not cfg.skip_unreadable:  # skipping is no longer allowed
            raise _unreadable_error(spec, root, manifest.skipped)
        if manifest.skipped:
            _warn_skipped(spec, root, manifest.skipped)
        return manifest
    found, skipped = _check_files(spec, root, found, cfg)
    entries: list[dict] = []
    if "all" in found:
        items = found["all"]
        fractions = {"test": cfg.test_fraction, "val": cfg.val_fraction}
    else:
        items = found["train"]
        fractions = {"val": cfg.val_fraction}
        entries += [{"path": rel, "label": lab, "split": "test"} for rel, lab in found["test"]]
    names = stratified_split(
        [lab for _, lab in items], fractions, cfg.split_seed, list(spec.classes)
    )
    entries += [
        {"path": rel, "label": lab, "split": s} for (rel, lab), s in zip(items, names, strict=True)
    ]
    for entry in entries:
        if entry["path"] in masks:
            entry["mask"] = masks[entry["path"]]
    if masks_root is not None:
        log.info(
            "dataset %r: %d of %d images have a lesion mask under %s",
            spec.id,
            sum("mask" in e for e in entries),
            len(entries),
            masks_root,
        )
    manifest = Manifest(
        dataset=spec.id,
        root=str(root),
        masks_root=str(masks_root) if masks_root else None,
        class_names=list(spec.classes),
        fingerprint=fingerprint,
        entries=sorted(entries, key=lambda e: (SPLITS.index(e["split"]), e["path"])),
        skipped=skipped,
    )
    _atomic_write(path, json.dumps(manifest.__dict__, indent=1))
    return manifest


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _read(path: Path, size: int) -> np.ndarray:
    try:
        return read_image(path, size)
    except ImageError as exc:  # the manifest checked it: the file changed since (same size)
        raise DataError(f"{path}: {exc.reason}") from exc


def _load_split(manifest: Manifest, split: str, size: int) -> Split:
    entries = manifest.split_entries(split)
    root = Path(manifest.root)
    images = (
        np.stack([_read(root / e["path"], size) for e in entries])
        if entries
        else (np.zeros((0, 3, size, size), np.uint8))
    )
    labels = np.array([e["label"] for e in entries], dtype=np.int64)
    masks = None
    if manifest.masks_root and any("mask" in e for e in entries):
        mroot = Path(manifest.masks_root)
        empty = np.zeros((size, size), bool)
        masks = np.stack(
            [_read_mask(mroot / e["mask"], size) if "mask" in e else empty for e in entries]
        )
    return Split(images, labels, masks)


def _read_mask(path: Path, size: int) -> np.ndarray:
    try:
        return read_mask(path, size)
    except (OSError, ValueError) as exc:  # PIL's UnidentifiedImageError is an OSError
        raise DataError(f"lesion mask {path}: unreadable ({exc})") from exc


def load_splits(manifest: Manifest, size: int, ws: Workspace) -> dict[str, Split]:
    """All splits as arrays, read once and cached in ``<workspace>/cache``."""
    path = ws.cache / f"{manifest.dataset}-{manifest.fingerprint[:12]}-{size}.npz"
    if path.is_file():
        with np.load(path) as z:
            return {
                s: Split(z[f"{s}_images"], z[f"{s}_labels"], z.get(f"{s}_masks")) for s in SPLITS
            }
    splits = {s: _load_split(manifest, s, size) for s in SPLITS}
    arrays: dict[str, np.ndarray] = {}
    for s, split in splits.items():
        arrays[f"{s}_images"] = split.images
        arrays[f"{s}_labels"] = split.labels
        if split.masks is not None:
            arrays[f"{s}_masks"] = split.masks
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)
    return splits


def synthetic_root(cfg: DataConfig, dataset_id: str, ws: Workspace) -> Path:
    """Generate the synthetic stand-in once (atomically) and return its folder."""
    s = cfg.synthetic
    folder = ws.data / "synthetic" / f"{dataset_id}-n{s.n_per_class}-s{s.size}-seed{s.seed}"
    if (folder / "images").is_dir():
        return folder
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    synthetic.generate(dataset_id, tmp / "images", tmp / "masks", s.n_per_class, s.size, s.seed)
    try:
        tmp.rename(folder)
    except OSError:  # another process finished the same generation first
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def prepare_manifest(cfg: DataConfig, dataset_id: str, ws: Workspace) -> Manifest:
    """Real folder (``data.roots``) or synthetic stand-in -> checked, split manifest (no arrays).

    Raises:
        DataError: a bad folder, or unreadable files (see :func:`build_manifest`).
    """
    spec = get_spec(dataset_id)
    if dataset_id in cfg.roots:
        root = Path(cfg.roots[dataset_id]).expanduser()
        masks = cfg.masks_roots.get(dataset_id)
        masks_root = Path(masks).expanduser() if masks else None
    else:
        folder = synthetic_root(cfg, dataset_id, ws)
        root, masks_root = folder / "images", folder / "masks"
    return build_manifest(spec, root, masks_root, cfg, ws)


def preflight(cfg: DataConfig, ws: Workspace) -> None:
    """What must hold before any work starts: a writable workspace with room, and every
    configured dataset's files readable and split (manifests written). Needs neither torch nor
    Ray nor MLflow, so a bad input is reported in about a second.

    Raises:
        WorkspaceError: the workspace cannot be written or its disk is full.
        DataError: a bad folder, or unreadable files (listed together).
    """
    ws.check()
    for dataset in cfg.datasets:
        prepare_manifest(cfg, dataset, ws)


def prepare_dataset(cfg: DataConfig, dataset_id: str, ws: Workspace) -> PreparedData:
    """:func:`prepare_manifest`, then the arrays (cached)."""
    manifest = prepare_manifest(cfg, dataset_id, ws)
    return PreparedData(
        get_spec(dataset_id),
        manifest,
        cfg.image_size,
        load_splits(manifest, cfg.image_size, ws),
        source=DataSource.from_config(cfg, dataset_id),
    )


def in_memory_synthetic(
    dataset_id: str,
    n_per_class: int,
    size: int,
    seed: int = 0,
    val_fraction: float = 0.25,
    test_fraction: float = 0.25,
) -> PreparedData:
    """Synthetic data straight into memory (no files, no workspace): for tests and benchmarks."""
    spec = get_spec(dataset_id)
    images, labels, masks = synthetic.make_arrays(dataset_id, n_per_class, size, seed)
    images = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    names = np.array(
        stratified_split(labels.tolist(), {"test": test_fraction, "val": val_fraction}, seed)
    )
    splits = {s: Split(images[names == s], labels[names == s], masks[names == s]) for s in SPLITS}
    fingerprint = hashlib.sha256(
        f"memory|{dataset_id}|{n_per_class}|{size}|{seed}".encode()
    ).hexdigest()
    manifest = Manifest(dataset_id, "<memory>", None, list(spec.classes), fingerprint)
    source = DataSource("synthetic", n_per_class=n_per_class, size=size, seed=seed)
    return PreparedData(spec, manifest, size, splits, source=source)
