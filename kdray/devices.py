"""Where a Ray worker computes: the GPU Ray assigned to it, else the CPU, with its own CPU share.

Ray reserves resources but does not move tensors: a worker that asked for ``num_gpus`` sees
its GPU(s) through ``CUDA_VISIBLE_DEVICES`` (so the first visible device is its own), and a
worker that asked for ``num_cpus=k`` should run k torch threads, not one per core of the machine,
or concurrent workers oversubscribe the cores.
"""

from __future__ import annotations

import torch

__all__ = ["assigned_cpus", "assigned_device", "use_assigned_threads"]


def _assigned_resources() -> dict[str, float]:
    try:
        import ray

        if ray.is_initialized():
            return dict(ray.get_runtime_context().get_assigned_resources())
    except Exception:  # outside Ray, or a Ray without a runtime context here
        pass
    return {}


def assigned_device(
    resources: dict[str, float] | None = None, cuda_available: bool | None = None
) -> torch.device:
    """``cuda:0`` when Ray assigned this worker a GPU share and CUDA works, else ``cpu``.

    Args:
        resources: the worker's assigned resources (default: asked from Ray).
        cuda_available: default ``torch.cuda.is_available()``.
    """
    resources = _assigned_resources() if resources is None else resources
    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    return torch.device("cuda", 0) if resources.get("GPU", 0) > 0 and cuda else torch.device("cpu")


def assigned_cpus(resources: dict[str, float] | None = None, default: int = 1) -> int:
    """Whole CPUs Ray assigned to this worker (at least 1; ``default`` when none were)."""
    resources = _assigned_resources() if resources is None else resources
    cpus = resources.get("CPU")
    return max(1, int(cpus)) if cpus else default


def use_assigned_threads(default: int = 1) -> int:
    """Set torch's intra-op threads to :func:`assigned_cpus`; return the number set."""
    threads = assigned_cpus(default=default)
    torch.set_num_threads(threads)
    return threads
