"""Teacher stage: DenseNet121 trained data-parallel with Ray Train, then scored and cached.

A finished teacher lives in ``<workspace>/teachers/<dataset>-<key>/`` (weights without pickle,
``teacher.json`` with its MLflow run and test metrics, and ``train_logits.npy``, the teacher's
logits on the training split that the KD trials read instead of running the teacher). The key
covers the data (manifest + input size) and the teacher recipe, so re-running the pipeline reuses
a finished teacher and any change to data or recipe trains a new one.

This module is the driver's side (the stage, its MLflow run, the TorchTrainer, the finished
teacher's files); what every Ray Train worker runs is :mod:`kdray.teacher_worker`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ray.train.torch import TorchTrainer

from kdray.config import ExperimentConfig
from kdray.console import MetricWatcher, eta
from kdray.data.mlflow_inputs import split_inputs
from kdray.data.prepare import PreparedData
from kdray.data.record import record_for, save_record
from kdray.engine import predict_logits
from kdray.evaluation import evaluate_and_log
from kdray.explain.background import save_background, select_background
from kdray.explain.scoring import cam_choice, scoring_set
from kdray.models import ModelSpec, build_model, count_flops, count_params, save_model
from kdray.registry import log_model_folder, register_model, registered_name
from kdray.teacher_worker import STATE_FILE, train_loop_per_worker
from kdray.tracking import Tracker
from kdray.train_cleaner import confirming_cleaner
from kdray.workspace import Workspace

log = logging.getLogger("kdray")

__all__ = [
    "TeacherResult",
    "fit_teacher",
    "teacher_key",
    "train_teacher",
]

META_FILE = "teacher.json"
LOGITS_FILE = "train_logits.npy"
# Settings that change how the teacher is trained but not what it learns.
_SCALING_FIELDS = {"num_workers", "cpus_per_worker", "use_gpu", "amp", "max_failures"}


@dataclass
class TeacherResult:
    directory: Path
    run_id: str
    test_metrics: dict[str, Any]
    params: int
    flops: int
    reused: bool

    @property
    def model_dir(self) -> Path:
        return self.directory / "model"

    def train_logits(self) -> np.ndarray:
        return np.load(self.directory / LOGITS_FILE)


def teacher_key(cfg: ExperimentConfig, data: PreparedData) -> str:
    recipe = {k: v for k, v in cfg.teacher.model_dump().items() if k not in _SCALING_FIELDS}
    blob = json.dumps({"data": data.key, "teacher": recipe, "seed": cfg.seed}, sort_keys=True)
    return f"{data.key}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


class TeacherTrainer(TorchTrainer):
    """Ray's ``TorchTrainer`` whose placement-group cleaner removes a fit's group only after its
    controller died (kdray.train_cleaner: Ray 2.60's removes live fits' groups)."""

    def _create_default_callbacks(self) -> list:
        return confirming_cleaner(super()._create_default_callbacks())


def fit_teacher(
    cfg: ExperimentConfig,
    data: PreparedData,
    spec: ModelSpec,
    tracker: Tracker,
    run_id: str,
    name: str,
    storage_path: str,
    loop: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Fit the TorchTrainer and return the last checkpoint's state.

    Args:
        loop: the per-worker function; tests wrap
            :func:`kdray.teacher_worker.train_loop_per_worker` to observe it.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

    t = cfg.teacher
    loop_config = {
        # Arrays travel through Ray's object store: workers on other nodes need no shared disk.
        "data": ray.put({"train": data.splits["train"], "val": data.splits["val"]}),
        "spec": spec.to_dict(),
        "weights": t.weights,
        "epochs": t.epochs,
        "batch_size": t.batch_size,
        "lr": t.lr,
        "weight_decay": t.weight_decay,
        "patience": t.early_stopping_patience,
        "schedule": t.schedule,
        "amp": t.amp,
        "augment": t.augment,
        "seed": cfg.seed,
        "threads": t.cpus_per_worker,
        "class_names": list(data.spec.classes),
        "tracker": tracker,
        "run_id": run_id,
    }
    trainer = TeacherTrainer(
        loop or train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=t.num_workers,
            use_gpu=t.use_gpu,
            resources_per_worker={"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})},
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"teacher training {name} produced no checkpoint")
    with result.checkpoint.as_directory() as d:
        return torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)


def _epoch_progress(dataset: str, epochs: int, done_before: set[int]):
    """The console line per teacher epoch (val accuracy, best so far, ETA from this run's pace)."""
    started, best, fresh = time.perf_counter(), [-1.0], [0]

    def on_point(step: int, value: float) -> None:
        best[0] = max(best[0], value)
        if step in done_before:  # logged before a resume: not part of this run's pace
            return
        fresh[0] += 1
        log.info(
            "%s: teacher epoch %d/%d · val acc %.3f (best %.3f)%s",
            dataset,
            step + 1,
            epochs,
            value,
            best[0],
            eta(time.perf_counter() - started, fresh[0], epochs - len(done_before)),
        )

    return on_point


def train_teacher(
    cfg: ExperimentConfig,
    data: PreparedData,
    ws: Workspace,
    tracker: Tracker,
    parent_run_id: str | None = None,
) -> TeacherResult:
    """Train (or reuse) the teacher of ``data``'s dataset, score it on test, cache its logits."""
    dataset = data.spec.id
    key = teacher_key(cfg, data)
    directory = ws.teachers / f"{dataset}-{key}"
    meta_path = directory / META_FILE
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        return TeacherResult(
            directory,
            meta["run_id"],
            meta["test_metrics"],
            meta["params"],
            meta["flops"],
            reused=True,
        )

    spec = ModelSpec(
        kind="teacher",
        num_classes=data.spec.num_classes,
        image_size=data.image_size,
        class_names=list(data.spec.classes),
        arch=cfg.teacher.arch,
        dataset=dataset,
    )
    # An interrupted training of the same teacher goes on in its own MLflow run, and Ray Train
    # resumes it from the latest checkpoint under the same run name.
    pending = directory.with_name(f".{directory.name}.run")
    run_id = pending.read_text().strip() if pending.is_file() else None
    if run_id and tracker.run_exists(run_id):
        tracker.client.update_run(run_id, status="RUNNING")
    else:
        run_id = tracker.start_run(
            f"teacher-{dataset}", dataset, "teacher", parent_run_id, tags={"kdray.teacher_key": key}
        )
        tracker.log_config(run_id, cfg.to_dict())
        tracker.log_params(
            run_id,
            {
                "arch": cfg.teacher.arch,
                "epochs": cfg.teacher.epochs,
                "batch_size": cfg.teacher.batch_size,
                "lr": cfg.teacher.lr,
                "num_workers": cfg.teacher.num_workers,
                "image_size": data.image_size,
                **data.manifest.counts(),
            },
        )
        tracker.log_inputs(run_id, split_inputs(data))
        pending.parent.mkdir(parents=True, exist_ok=True)
        pending.write_text(run_id)
    t = cfg.teacher
    log.info(
        "%s: teacher %s, %d epoch%s on %d Ray Train worker%s × %d CPU%s",
        dataset,
        t.arch,
        t.epochs,
        "s" * (t.epochs != 1),
        t.num_workers,
        "s" * (t.num_workers != 1),
        t.cpus_per_worker,
        " + 1 GPU" if t.use_gpu else "",
    )
    try:
        with MetricWatcher(
            tracker.client,
            run_id,
            "val_accuracy",
            _epoch_progress(dataset, t.epochs, tracker.logged_steps(run_id, "val_accuracy")),
        ):
            state = fit_teacher(
                cfg,
                data,
                spec,
                tracker,
                run_id,
                f"teacher-{dataset}-{key}",
                ws.ray_storage(cfg.ray.storage_path),
            )
        model = build_model(spec)
        model.load_state_dict(state["best_model"])
        model.eval()
        params, flops = count_params(model), count_flops(model, data.image_size)
        tracker.log_metrics(
            run_id, {"best_epoch": state["best"]["epoch"], "params": params, "flops": flops}
        )
        test_metrics = evaluate_and_log(
            model,
            data.splits["test"],
            list(data.spec.classes),
            tracker,
            run_id,
            title=f"teacher · {dataset}",
        )
        tmp = directory.with_name(f".{directory.name}.tmp")
        save_model(model, spec, tmp / "model")
        record = record_for(cfg.data, data, student=False)
        save_record(tmp / "model", record)
        # The CAM layer measured on the validation images: part of the registered version.
        cam_choice(cfg, model, tmp / "model", scoring_set(cfg, data))
        train = data.splits["train"]
        save_background(
            tmp / "model",
            select_background(train.images, train.labels, cfg.explain.shap_background, cfg.seed),
        )
        np.save(tmp / LOGITS_FILE, predict_logits(model, data.splits["train"].images))
        meta = {
            "run_id": run_id,
            "params": params,
            "flops": flops,
            "best_epoch": state["best"]["epoch"],
            "test_metrics": {k: v for k, v in test_metrics.items() if k != "per_class"},
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
        log_model_folder(tracker.client, run_id, tmp / "model")
        register_model(
            tracker.client,
            registered_name(dataset, teacher=True),
            run_id,
            "champion",
            tags={"kdray.dataset": dataset, "kdray.teacher_key": key, **record.tags()},
        )
        tmp.replace(directory)  # the teacher counts as finished only once all its files exist
        pending.unlink(missing_ok=True)
    except BaseException as exc:
        tracker.end_run(run_id, "FAILED", error=exc)
        raise
    tracker.end_run(run_id)
    return TeacherResult(directory, run_id, meta["test_metrics"], params, flops, reused=False)
