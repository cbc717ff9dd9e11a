"""What a model saw: one record of its data, written when it is trained, read by every step after.

A :class:`DataRecord` says which dataset and classes, the input size and channel handling, where
the images came from (a real folder, or the synthetic stand-in's generator parameters), how they
were split (seed, fractions, the manifest's digests and counts) and what share of the training
split the students saw. It is written once per trained model:

* ``data.json`` beside ``model.json`` in every saved model folder (teacher and champion), so it
  travels with the registered version (``model/artifacts/kdray_model/data.json``) to the Serve
  model store, the MLflow pyfunc and the ONNX export;
* as ``kdray.data.*`` tags on the registered version (the MLflow UI's model page);
* in the workspace's run state (``state/<dataset>.json``, key ``data``).

The post-run commands (audit, export, report) and the server read it instead of whatever config
is at hand (:mod:`kdray.lineage`); reports, figures and model cards describe the data from it.
Public answers use :meth:`DataRecord.public`, which names a real folder but never its absolute
path.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from kdray.config import DataConfig
    from kdray.data.prepare import Manifest, PreparedData

__all__ = [
    "RECORD_FILE",
    "DataRecord",
    "DataSource",
    "load_record",
    "record_for",
    "save_record",
    "split_digest",
]

RECORD_FILE = "data.json"
# The stand-in's folder, as kdray.data.prepare.synthetic_root lays it out:
# <workspace>/data/synthetic/<dataset>-n<n_per_class>-s<size>-seed<seed>/images
_SYNTHETIC_ROOT = re.compile(
    r"(^|/)data/synthetic/(?P<dataset>[a-z_]+)-n(?P<n>\d+)-s(?P<size>\d+)-seed(?P<seed>\d+)"
    r"/images/?$"
)
CHANNELS = "RGB; grayscale files repeated to three channels"
RESIZE = "bilinear (Pillow), to a square of image_size"


@dataclass(frozen=True)
class DataSource:
    """Where a dataset's images came from.

    Attributes:
        kind: ``synthetic`` (kdray's stand-in, made from the generator parameters below) or
            ``folder`` (a real copy under ``root``).
        root: the folder's absolute path (``folder`` only; never shown in public answers).
        masks_root: the lesion masks' folder, if any (``folder`` only).
        n_per_class, size, seed: the stand-in's generator parameters (``synthetic`` only).
    """

    kind: Literal["synthetic", "folder"]
    root: str = ""
    masks_root: str | None = None
    n_per_class: int = 0
    size: int = 0
    seed: int = 0

    @classmethod
    def from_config(cls, cfg: DataConfig, dataset: str) -> DataSource:
        """The source ``cfg`` gives ``dataset``: its ``data.roots`` entry, else the stand-in."""
        if dataset in cfg.roots:
            masks = cfg.masks_roots.get(dataset)
            return cls(
                "folder",
                root=str(Path(cfg.roots[dataset]).expanduser().resolve()),
                masks_root=str(Path(masks).expanduser().resolve()) if masks else None,
            )
        s = cfg.synthetic
        return cls("synthetic", n_per_class=s.n_per_class, size=s.size, seed=s.seed)

    @classmethod
    def from_root(cls, root: str, masks_root: str | None = None) -> DataSource:
        """The source a manifest's root stands for: the stand-in's folder (its parameters read
        from the folder's name) or a real folder."""
        found = _SYNTHETIC_ROOT.search(root.replace("\\", "/"))
        if found:
            return cls(
                "synthetic",
                n_per_class=int(found["n"]),
                size=int(found["size"]),
                seed=int(found["seed"]),
            )
        return cls("folder", root=root, masks_root=masks_root)

    @property
    def synthetic(self) -> bool:
        return self.kind == "synthetic"

    @property
    def folder_name(self) -> str:
        """The real folder's own name (what public answers show), e.g. ``brain-tumor-mri``."""
        return PurePath(self.root).name or self.root

    @property
    def label(self) -> str:
        """Short, for menus and titles: ``synthetic stand-in`` or the folder's name."""
        return "synthetic stand-in" if self.synthetic else self.folder_name

    def describe(self) -> str:
        """One phrase, public: ``synthetic stand-in (300 images per class generated at 96 px,
        seed 0)`` or ``folder `brain-tumor-mri```."""
        if self.synthetic:
            return (
                f"synthetic stand-in ({self.n_per_class} images per class generated at "
                f"{self.size} px, seed {self.seed})"
            )
        return f"folder `{self.folder_name}`"

    def public(self) -> dict[str, Any]:
        """This source without server paths."""
        if self.synthetic:
            return {
                "kind": self.kind,
                "n_per_class": self.n_per_class,
                "size": self.size,
                "seed": self.seed,
            }
        return {"kind": self.kind, "folder": self.folder_name, "masks": self.masks_root is not None}


def split_digest(manifest: Manifest) -> str:
    """12 hex digits over every entry's split, path (relative to the root) and label: which
    images, labelled how, in which split.

    Unlike the manifest's fingerprint it leaves out where the folder is, so a copy of the same
    files elsewhere (a moved workspace, a cluster's mount) has the same digest; lesion masks,
    which no model trains on, are left out too.
    """
    h = hashlib.sha256()
    for e in sorted(manifest.entries, key=lambda e: (e["split"], e["path"])):
        h.update(f"{e['split']}|{e['path']}|{e['label']}\n".encode())
    return h.hexdigest()[:12]


@dataclass(frozen=True)
class DataRecord:
    """What one trained model saw (see the module docstring).

    Attributes:
        dataset: kdray's dataset id.
        classes: class names in label order.
        image_size: side of the square model input.
        source: where the images came from.
        split_seed, val_fraction, test_fraction: how the manifest split them (``test_fraction``
            only for a folder without its own test folder).
        student_fraction: the share of each class of the training split the students trained on.
        manifest: the manifest's fingerprint (12 hex digits; the MLflow dataset inputs' digest).
        digest: :func:`split_digest` of the manifest (the same files and split wherever they are).
        counts: images per split (train, val, test).
        train_images: training images this model trained on (a teacher the whole training
            split, a student its share).
        channels, resize: how every file becomes the model input.
    """

    dataset: str
    classes: list[str]
    image_size: int
    source: DataSource
    split_seed: int
    val_fraction: float
    test_fraction: float
    student_fraction: float = 1.0
    manifest: str = ""
    digest: str = ""
    counts: dict[str, int] = field(default_factory=dict)
    train_images: int = 0
    channels: str = CHANNELS
    resize: str = RESIZE

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataRecord:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**{**known, "source": DataSource(**known["source"])})

    @classmethod
    def from_config(cls, cfg: DataConfig, dataset: str, classes: list[str]) -> DataRecord:
        """What a config says a model of ``dataset`` saw, without its manifest (no digests):
        the record of a version registered before kdray wrote records, rebuilt from its run's
        logged config."""
        return cls(
            dataset=dataset,
            classes=list(classes),
            image_size=cfg.image_size,
            source=DataSource.from_config(cfg, dataset),
            split_seed=cfg.split_seed,
            val_fraction=cfg.val_fraction,
            test_fraction=cfg.test_fraction,
            student_fraction=cfg.student_fraction(dataset),
        )

    def describe(self) -> str:
        """The data in one public phrase (the source's), e.g. for a report's first line."""
        return self.source.describe()

    def trained_on(self, task: str) -> str:
        """A model card's line, public: what this model trained on."""
        train = self.counts.get("train", 0)
        share = (
            f" ({self.train_images / train:.0%} of the training split)"
            if train and 0 < self.train_images < train
            else ""
        )
        images = f"{self.train_images:,} training images{share}" if self.train_images else ""
        if self.source.synthetic:
            head = f"{self.describe()} for {task}, not the public dataset"
            return f"{head}: {images}" if images else head
        return f"{images or 'the training split'} from {self.describe()}"

    def title(self, task: str) -> str:
        """A figure or menu title: ``Brain Tumor MRI · synthetic stand-in``; a stand-in is
        never called by the public dataset's catalogue title."""
        return f"{task} · {self.source.label}"

    def public(self) -> dict[str, Any]:
        """The record as public answers show it (a folder's name, no absolute paths)."""
        out = self.to_dict()
        out["source"] = self.source.public()
        out["description"] = self.describe()
        return out

    def tags(self) -> dict[str, str]:
        """``kdray.data.*`` tags for the registered version (the MLflow UI's model page)."""
        return {
            "kdray.data.source": self.describe(),
            "kdray.data.image_size": str(self.image_size),
            "kdray.data.digest": self.digest,
            "kdray.data.manifest": self.manifest,
        }

    def contradictions(self, cfg: DataConfig) -> list[tuple[str, Any, Any]]:
        """Where ``cfg`` would give this model other data: ``(key, model's value, config's)``.

        The input size, the source's kind and generator parameters, the masks and the split
        settings. A real folder's path may differ (a copy elsewhere): its files are checked
        against :attr:`digest` once the manifest is built (:func:`kdray.lineage.check_manifest`).
        """
        out: list[tuple[str, Any, Any]] = []
        if cfg.image_size != self.image_size:
            out.append(("data.image_size", self.image_size, cfg.image_size))
        theirs = DataSource.from_config(cfg, self.dataset)
        ours = self.source
        if theirs.kind != ours.kind:
            key = f"data.roots.{self.dataset}"
            out.append((key, ours.describe(), theirs.describe()))
        elif ours.synthetic:
            for name in ("n_per_class", "size", "seed"):
                if getattr(ours, name) != getattr(theirs, name):
                    out.append(
                        (f"data.synthetic.{name}", getattr(ours, name), getattr(theirs, name))
                    )
        elif (ours.masks_root is None) != (theirs.masks_root is None):
            out.append((f"data.masks_roots.{self.dataset}", ours.masks_root, theirs.masks_root))
        split_keys = [("data.split_seed", self.split_seed, cfg.split_seed)]
        split_keys.append(("data.val_fraction", self.val_fraction, cfg.val_fraction))
        split_keys.append(("data.test_fraction", self.test_fraction, cfg.test_fraction))
        out += [(k, a, b) for k, a, b in split_keys if a != b]
        return out


def record_for(cfg: DataConfig, data: PreparedData, student: bool) -> DataRecord:
    """The record of a model trained on ``data`` prepared with ``cfg``: a student (its share of
    the training split, ``data.synthetic.student_fraction``) or a teacher (all of it).

    ``data`` is the whole prepared dataset (not the students' cut copy)."""
    dataset = data.spec.id
    fraction = cfg.student_fraction(dataset)
    seen = (
        len(data.student_indices(fraction, cfg.split_seed))
        if student
        else len(data.splits["train"])
    )
    return DataRecord(
        dataset=dataset,
        classes=list(data.spec.classes),
        image_size=data.image_size,
        source=data.source,
        split_seed=cfg.split_seed,
        val_fraction=cfg.val_fraction,
        test_fraction=cfg.test_fraction,
        student_fraction=fraction,
        manifest=data.manifest.fingerprint[:12],
        digest=split_digest(data.manifest),
        counts=(
            data.manifest.counts()
            if data.manifest.entries
            else {name: len(split) for name, split in data.splits.items()}
        ),
        train_images=seen,
    )


def save_record(folder: str | Path, record: DataRecord) -> None:
    """Write ``data.json`` into a saved model folder."""
    (Path(folder) / RECORD_FILE).write_text(json.dumps(record.to_dict(), indent=1))


def load_record(folder: str | Path) -> DataRecord | None:
    """The model folder's ``data.json``; None for a model saved before kdray wrote records."""
    path = Path(folder) / RECORD_FILE
    if not path.is_file():
        return None
    return DataRecord.from_dict(json.loads(path.read_text()))
