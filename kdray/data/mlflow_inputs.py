"""The data a run saw, as MLflow dataset inputs (the runs table's "Dataset" column).

Each split is one MLflow dataset: named ``<dataset>-<split>``, its digest the manifest's
fingerprint (the same files and split give the same digest), its source the data root (or the
synthetic stand-in), its profile the image and per-class counts, tagged with the split as
MLflow's ``mlflow.data.context``. The students' training split, when cut to
``data.synthetic.student_fraction``, is its own dataset (``<dataset>-train-<percent>``, its own
digest). Plain entities, so they travel to Ray workers with a job.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
from mlflow.entities import Dataset, DatasetInput, InputTag

from kdray.data.prepare import PreparedData
from kdray.data.record import DataSource

__all__ = ["CONTEXT_TAG", "is_synthetic_root", "split_inputs", "trained_on"]

CONTEXT_TAG = "mlflow.data.context"  # MLflow's own tag: shown next to the dataset in the UI
DIGEST_LENGTH = 12


def split_inputs(
    data: PreparedData, splits: tuple[str, ...] = ("train", "val", "test")
) -> list[DatasetInput]:
    """One :class:`~mlflow.entities.DatasetInput` per split of ``data`` (those that exist)."""
    classes = list(data.spec.classes)
    manifest = data.manifest
    source = json.dumps({"uri": manifest.root, "masks": manifest.masks_root})
    out = []
    for split in splits:
        if split not in data.splits:
            continue
        labels = np.asarray(data.splits[split].labels)
        counts = {name: int((labels == i).sum()) for i, name in enumerate(classes)}
        profile = {
            "num_images": int(len(labels)),
            "class_counts": counts,
            "image_size": data.image_size,
        }
        schema = {
            "images": f"uint8 RGB {data.image_size}x{data.image_size}",
            "labels": f"int class index into {classes}",
        }
        name, digest = f"{manifest.dataset}-{split}", manifest.fingerprint
        if split == "train" and data.student_fraction < 1.0:
            name = f"{name}-{data.student_fraction:.0%}"
            profile["student_fraction"] = data.student_fraction
            digest = hashlib.sha256(f"{digest}|{data.student_fraction!r}".encode()).hexdigest()
        dataset = Dataset(
            name=name,
            digest=digest[:DIGEST_LENGTH],
            source_type="local",
            source=source,
            schema=json.dumps(schema),
            profile=json.dumps(profile),
        )
        out.append(DatasetInput(dataset, tags=[InputTag(CONTEXT_TAG, split)]))
    return out


def is_synthetic_root(root: str) -> bool:
    """Is this data root the synthetic stand-in's images folder
    (``<workspace>/data/synthetic/<id>-n..-s..-seed../images``, kdray.data.prepare.synthetic_root)
    rather than a real folder?"""
    return DataSource.from_root(root).synthetic


def trained_on(inputs: list[DatasetInput], task: str) -> dict[str, object]:
    """What a run's training split was, from its MLflow dataset inputs: ``{"synthetic",
    "images", "source", "text"}``; ``text`` is the line model cards show, public (a real folder
    by its name, no path). For versions registered before kdray wrote a data record
    (:mod:`kdray.data.record`), which is read instead where there is one. Empty when the run has
    no training input."""
    train = next(
        (
            d.dataset
            for d in inputs
            if any(t.key == CONTEXT_TAG and t.value == "train" for t in d.tags)
        ),
        None,
    )
    if train is None:
        return {}
    root = json.loads(train.source or "{}").get("uri", "")
    profile = json.loads(train.profile or "{}")
    images = int(profile.get("num_images", 0))
    source = DataSource.from_root(root)
    share = profile.get("student_fraction")
    cut = f" ({share:.0%} of the training split)" if share else ""
    text = (
        f"{source.describe()} for {task}, not the public dataset: {images:,} training images{cut}"
        if source.synthetic
        else f"{images:,} training images{cut} from {source.describe()}"
    )
    return {"synthetic": source.synthetic, "images": images, "source": source.label, "text": text}
