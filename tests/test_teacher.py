"""Teacher training on real Ray Train: DDP over 2 CPU workers, checkpoints, fault tolerance, reuse."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import ray.cloudpickle
import torch
import torch.nn.functional as F
from mlflow import MlflowClient

from kdray.config import ExperimentConfig, MLflowConfig
from kdray.engine import (
    amp_dtype,
    channels_last,
    cpu_has_amx,
    make_loader,
    predict_logits,
    train_epoch,
)
from kdray.models import ModelSpec, build_model
from kdray.teacher import fit_teacher, teacher_key
from kdray.tracking import Tracker

from conftest import tiny_data

# The observing loops below are defined here; Ray workers cannot import this test module.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class _FailAfterFirstBatch:
    """A loader that hands out one batch, then fails its worker: ``"raise"`` raises from inside
    the epoch, ``"kill"`` SIGKILLs the worker's own process."""

    def __init__(self, loader, how: str, snapshot: Path, epoch: int):
        self.loader, self.sampler = loader, loader.sampler
        self.how, self.snapshot, self.epoch = how, snapshot, epoch

    def _registered(self) -> bool:
        """Ray Train's controller has registered the previous epoch's checkpoint."""
        import json

        try:
            latest = json.loads(self.snapshot.read_text()).get("latest_checkpoint_result") or {}
        except (OSError, ValueError):  # not written yet, or caught mid-write
            return False
        return latest.get("metrics", {}).get("epoch", -1) >= self.epoch - 1

    def __iter__(self):
        import os
        import signal
        import time

        for i, batch in enumerate(self.loader):
            if i == 1:
                # The controller learns of a report by polling the workers (every 2 s): fail only
                # once it has registered the last checkpoint, so resuming from it is what the
                # test can demand (a failure inside that window repeats one more epoch).
                deadline = time.monotonic() + 60
                while not self._registered() and time.monotonic() < deadline:
                    time.sleep(0.2)
                if self.how == "raise":
                    raise RuntimeError("injected worker failure")
                os.kill(os.getpid(), signal.SIGKILL)
            yield batch

    def __len__(self):
        return len(self.loader)


def observing_loop(log_dir: Path, failures: dict[int, tuple[int, str]], run_dir: Path):
    """Wrap the product's per-worker loop: record what each rank trains on, and fail once at
    each epoch of ``failures`` (epoch -> (rank, "raise" | "kill")), after that epoch's first
    batch, once the controller registered the previous checkpoint in ``run_dir``."""

    def loop(config):
        import ray
        import ray.train

        import kdray.teacher_worker as kt
        from kdray.models import unwrap

        rank = ray.train.get_context().get_world_rank()
        start = 0
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                start = torch.load(Path(d) / kt.STATE_FILE, weights_only=True)["epoch"] + 1
        calls = {"n": 0}
        original = kt.train_epoch

        def train_epoch(model, loader, *args, **kwargs):
            epoch = start + calls["n"]
            calls["n"] += 1
            with open(log_dir / f"rank{rank}.log", "a") as f:
                f.write(f"{epoch} {' '.join(map(str, sorted(loader.sampler)))}\n")
            marker = log_dir / f"failed-at-{epoch}"
            fail_rank, how = failures.get(epoch, (None, ""))
            if fail_rank == rank and not marker.exists():
                marker.touch()
                snapshot = run_dir / "checkpoint_manager_snapshot.json"
                loader = _FailAfterFirstBatch(loader, how, snapshot, epoch)
            out = original(model, loader, *args, **kwargs)
            val = ray.get(config["data"])["val"].images
            np.save(log_dir / f"rank{rank}-logits.npy", predict_logits(unwrap(model), val))
            weights = torch.cat([p.detach().flatten() for p in unwrap(model).parameters()])
            np.save(log_dir / f"rank{rank}-weights.npy", weights.numpy())
            return out

        kt.train_epoch = train_epoch
        try:
            kt.train_loop_per_worker(config)
        finally:
            kt.train_epoch = original

    return loop


def _setup(tmp_path, **teacher):
    cfg = ExperimentConfig.model_validate(
        {
            "teacher": {
                "batch_size": 8,
                "cpus_per_worker": 1,
                "augment": {"enabled": False},
                **teacher,
            }
        }
    )
    data = tiny_data(n_per_class=8, size=32)  # 16 training images: splits evenly over 2 ranks
    tracker = Tracker.open(
        MLflowConfig(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}"), _ws(tmp_path)
    )
    spec = ModelSpec(
        kind="teacher", num_classes=4, image_size=32, class_names=list(data.spec.classes)
    )
    run_id = tracker.start_run("teacher-test", "eye_disease", "teacher")
    return cfg, data, tracker, spec, run_id


def _ws(tmp_path):
    from kdray.workspace import Workspace

    return Workspace(tmp_path)


def _epochs_logged(tracker: Tracker, run_id: str) -> list[int]:
    return sorted(
        m.step
        for m in MlflowClient(tracker.tracking_uri).get_metric_history(run_id, "val_accuracy")
    )


@pytest.mark.integration
def test_ddp_shards_are_disjoint_and_each_failure_resumes_from_the_last_checkpoint(
    ray_local, tmp_path
):
    """DDP over 2 Ray Train workers, and two failures of one fit: rank 0 raises inside epoch 1,
    then rank 1's process is killed inside epoch 2. Each time the group restarts from the last
    checkpoint, not from scratch. Every epoch (the interrupted ones too) splits the training
    split into disjoint shards; the replicas end with identical weights, the checkpoint (rank
    0's) restores their predictions, and one MLflow run holds each epoch once."""
    # Batches of 4, 2 images per rank: 4 steps an epoch, so each failure lands inside the epoch.
    cfg, data, tracker, spec, run_id = _setup(
        tmp_path, num_workers=2, epochs=4, max_failures=2, batch_size=4
    )
    state = fit_teacher(
        cfg,
        data,
        spec,
        tracker,
        run_id,
        "faults",
        str(tmp_path / "ray"),
        loop=observing_loop(
            tmp_path, {1: (0, "raise"), 2: (1, "kill")}, run_dir=tmp_path / "ray" / "faults"
        ),
    )
    assert (tmp_path / "failed-at-1").exists() and (tmp_path / "failed-at-2").exists()
    rows = {
        rank: [line.split() for line in (tmp_path / f"rank{rank}.log").read_text().splitlines()]
        for rank in (0, 1)
    }
    for rank in (0, 1):
        epochs_run = [int(row[0]) for row in rows[rank]]
        # Each interrupted epoch again, not from scratch: [0, 1 (raised), 1, 2 (killed), 2, 3].
        assert epochs_run == [0, 1, 1, 2, 2, 3], (rank, epochs_run)
    n_train = len(data.splits["train"])
    for line0, line1 in zip(rows[0], rows[1], strict=True):
        shard0, shard1 = {int(i) for i in line0[1:]}, {int(i) for i in line1[1:]}
        assert shard0.isdisjoint(shard1)
        assert shard0 | shard1 == set(range(n_train))
    # DDP keeps the replicas' weights identical; the checkpoint (rank 0) restores its predictions.
    np.testing.assert_allclose(
        np.load(tmp_path / "rank0-weights.npy"),
        np.load(tmp_path / "rank1-weights.npy"),
        rtol=1e-6,
        atol=1e-7,
    )
    restored = build_model(spec)
    restored.load_state_dict(state["model"])
    np.testing.assert_allclose(
        predict_logits(restored, data.splits["val"].images),
        np.load(tmp_path / "rank0-logits.npy"),
        rtol=1e-5,
        atol=1e-5,
    )
    assert state["epoch"] == 3
    assert _epochs_logged(tracker, run_id) == [0, 1, 2, 3]  # rank 0 alone logs, each epoch once
    assert len(MlflowClient(tracker.tracking_uri).search_runs([tracker.experiment_id])) == 1
    # teacher.amp on a CPU: bf16 where the CPU has AMX tiles, read here from /proc/cpuinfo
    # itself (not with the function under test)
    flags = next(
        (
            line.split(":", 1)[1].split()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("flags")
        ),
        [],
    )
    precision = "bfloat16" if "amx_bf16" in flags else "float32"
    assert tracker.client.get_run(run_id).data.tags["kdray.precision"] == precision


def test_teacher_key_tracks_data_and_recipe_not_scaling():
    data = tiny_data(n_per_class=2, size=16)
    base = ExperimentConfig()
    key = teacher_key(base, data)
    assert teacher_key(base.model_copy(deep=True), data) == key
    scaled = ExperimentConfig.model_validate(
        {"teacher": {"num_workers": 4, "cpus_per_worker": 1, "amp": False}}
    )
    assert teacher_key(scaled, data) == key
    assert teacher_key(ExperimentConfig.model_validate({"teacher": {"lr": 0.01}}), data) != key
    assert (
        teacher_key(
            ExperimentConfig.model_validate({"teacher": {"augment": {"rotation": 5}}}), data
        )
        != key
    )
    assert teacher_key(base, tiny_data(n_per_class=3, size=16)) != key


def test_the_cosine_schedule_anneals_the_teacher_lr_to_zero_and_plateau_waits_for_the_loss():
    from kdray.teacher_worker import make_scheduler, step_scheduler

    model = torch.nn.Linear(2, 2)
    cosine = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = make_scheduler(cosine, "cosine", epochs=4)
    lrs = []
    for _ in range(4):
        cosine.step()  # (an epoch's updates come first, as in the loop)
        step_scheduler(scheduler, val_loss=1.0)
        lrs.append(cosine.param_groups[0]["lr"])
    expected = [1e-3 * 0.5 * (1 + math.cos(math.pi * e / 4)) for e in range(1, 5)]
    assert lrs == pytest.approx(expected, abs=1e-12)
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)
    plateau = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = make_scheduler(plateau, "plateau", epochs=4)
    for loss in (1.0, 1.0, 1.0):  # no lower loss for 2 epochs after the first: still 1e-3
        plateau.step()
        step_scheduler(scheduler, loss)
    assert plateau.param_groups[0]["lr"] == pytest.approx(1e-3)
    step_scheduler(scheduler, 1.0)  # the third epoch without improvement halves it
    assert plateau.param_groups[0]["lr"] == pytest.approx(5e-4)


def test_mixed_precision_is_fp16_on_a_gpu_bf16_on_a_cpu_with_amx_else_fp32(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f amx_bf16 amx_tile\n")
    assert cpu_has_amx(str(cpuinfo))
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse avx2\n")
    assert not cpu_has_amx(str(cpuinfo))
    assert not cpu_has_amx(str(tmp_path / "absent"))
    assert amp_dtype(torch.device("cuda"), True) == torch.float16
    assert amp_dtype(torch.device("cpu"), True, amx=True) == torch.bfloat16
    assert amp_dtype(torch.device("cpu"), True, amx=False) is None
    assert (
        amp_dtype(torch.device("cuda"), False) is None
        and amp_dtype(torch.device("cpu"), False, amx=True) is None
    )


def test_a_bf16_epoch_computes_in_bf16_and_keeps_fp32_weights():
    data = tiny_data(n_per_class=4, size=16)
    spec = ModelSpec(
        kind="student",
        num_classes=4,
        image_size=16,
        class_names=list(data.spec.classes),
        widths=[4, 8],
    )
    torch.manual_seed(0)
    model = build_model(spec).to(memory_format=torch.channels_last)
    seen = []
    first_conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    first_conv.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    before = [p.detach().clone() for p in model.parameters()]
    loader = make_loader(
        (data.splits["train"].images, data.splits["train"].labels), 4, shuffle=True, seed=0
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    stats = train_epoch(
        model,
        loader,
        lambda logits, y, _e, _x: {"loss": F.cross_entropy(logits, y)},
        optimizer,
        "cpu",
        augment=channels_last(),
        autocast=torch.bfloat16,
    )
    assert seen and set(seen) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert np.isfinite(stats["loss"])
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
