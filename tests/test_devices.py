"""The device rule of every student job: Ray's assigned GPU, else the CPU, with the job's CPUs."""

from __future__ import annotations

import pytest
import torch

import kdray.trial as trial
from kdray.config import ExperimentConfig
from kdray.devices import assigned_cpus, assigned_device, use_assigned_threads
from kdray.trial import StudentJob

from conftest import tiny_data


@pytest.mark.parametrize(
    ("resources", "cuda", "expected"),
    [
        ({"CPU": 1.0, "GPU": 0.25}, True, "cuda:0"),  # a fraction of a GPU is still that GPU
        ({"CPU": 1.0, "GPU": 1.0}, True, "cuda:0"),  # CUDA_VISIBLE_DEVICES: its own GPU is first
        ({"CPU": 1.0, "GPU": 0.25}, False, "cpu"),  # reserved, but CUDA does not work here
        ({"CPU": 2.0}, True, "cpu"),  # a GPU machine, but none assigned to this job
        ({}, False, "cpu"),  # outside Ray
    ],
)
def test_the_assigned_gpu_else_the_cpu(resources, cuda, expected):
    assert assigned_device(resources, cuda_available=cuda) == torch.device(expected)


def test_threads_follow_the_assigned_cpus():
    assert assigned_cpus({"CPU": 2.0}) == 2
    assert assigned_cpus({"CPU": 0.5}) == 1  # a fractional share still runs one thread
    assert assigned_cpus({}, default=3) == 3


def test_outside_a_ray_worker_the_rule_is_the_cpu():
    assert assigned_device() == torch.device("cpu")  # the driver has no assignment, GPU or not


@pytest.mark.integration
def test_a_ray_task_runs_as_many_torch_threads_as_cpus_it_asked_for(ray_local):
    import ray

    @ray.remote(num_cpus=2)
    def two():
        return use_assigned_threads(), torch.get_num_threads(), str(assigned_device())

    @ray.remote(num_cpus=1)
    def one():
        return use_assigned_threads(), torch.get_num_threads(), str(assigned_device())

    assert ray.get(two.remote()) == (2, 2, "cpu")
    assert ray.get(one.remote()) == (1, 1, "cpu")


class _Seen(Exception):
    pass


def test_train_student_trains_on_the_assigned_device(monkeypatch):
    """The model, the epoch and the validation go where the rule says (``meta`` stands in for a GPU)."""
    seen = {}

    def train_epoch(model, loader, loss_fn, optimizer, device="cpu", scaler=None, augment=None):
        seen["model"] = next(model.parameters()).device
        seen["device"] = torch.device(device)
        seen["optimizer"] = optimizer.param_groups[0]["params"][0].device
        raise _Seen

    monkeypatch.setattr(trial, "assigned_device", lambda: torch.device("meta"))
    monkeypatch.setattr(trial, "train_epoch", train_epoch)
    data = tiny_data(n_per_class=4, size=16)
    cfg = ExperimentConfig.model_validate({"student": {"epochs": 1, "batch_size": 4}})
    job = StudentJob(
        cfg,
        "eye_disease",
        list(data.spec.classes),
        16,
        data.splits["train"],
        data.splits["val"],
        teacher_logits=torch.zeros(len(data.splits["train"]), 4).numpy(),
    )
    with pytest.raises(_Seen):
        trial.train_student(job, 0.5, 4.0, [4, 8, 8, 8])
    assert seen == {
        "model": torch.device("meta"),
        "device": torch.device("meta"),
        "optimizer": torch.device("meta"),
    }
    seen.clear()
    with pytest.raises(_Seen):  # an explicit device wins over the rule
        trial.train_student(job, 0.5, 4.0, [4, 8, 8, 8], device="cpu")
    assert seen["model"] == seen["device"] == torch.device("cpu")
