"""The Ray Serve deployments behind the HTTP gateway: batched prediction and explanations.

Deployments are split by workload, each holding every served dataset's model (students are
about a megabyte): ``Predictor`` batches concurrent predictions into one forward pass per
dataset; ``Explainer`` computes feature maps and Grad-CAM; the same class bound as
``ShapExplainer`` takes SHAP, seconds of work that must not stall the others. Each is sized
(replicas, CPUs/GPUs, ``max_ongoing_requests``) in ``serve/config.yaml``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from ray import serve

from kdray.data.specs import get_spec
from kdray.devices import assigned_device, use_assigned_threads
from kdray.engine import to_input
from kdray.explain.api import Explanation, explain
from kdray.serving.settings import load_settings
from kdray.serving.store import LoadedModel, ModelStore, Role

__all__ = ["Explainer", "Predictor", "model_entry"]

FAST_METHODS = ("feature_maps", "gradcam")


def model_entry(m: LoadedModel) -> dict[str, Any]:
    """What ``/v1/models`` shows of one loaded model (see :class:`kdray.serving.schemas.ModelEntry`)."""
    spec, reg = m.registered.spec, m.registered
    methods = [*FAST_METHODS, *(["shap"] if m.background is not None else [])]
    return {
        "registry": {"name": reg.name, "alias": reg.alias, "version": reg.version, "run_id": reg.run_id},
        "architecture": "-".join(map(str, spec.widths)) if spec.kind == "student" else spec.arch,
        "params": int(reg.metrics.get("params", sum(p.numel() for p in m.model.parameters()))),
        "flops": int(reg.metrics.get("flops", 0)),
        "test_metrics": {k: v for k, v in reg.metrics.items() if k.startswith("test_")},
        "methods": methods,
    }


def _status(store: ModelStore) -> dict[str, Any]:
    store.retry_missing()
    return {
        "ready": store.ready(),
        "loaded": [f"{m.dataset}/{m.role}" for m in store.loaded()],
        "errors": store.errors(),
        "cards": {f"{m.dataset}/{m.role}": {"title": get_spec(m.dataset).title,
                                             "classes": m.class_names, "image_size": m.image_size,
                                             "entry": model_entry(m)} for m in store.loaded()},
    }


@serve.deployment(name="Predictor", max_ongoing_requests=32, ray_actor_options={"num_cpus": 1})
class Predictor:
    """The students, predicting batches: ``@serve.batch`` groups concurrent requests.

    The forward pass runs on one worker thread, off the replica's event loop, so requests keep
    queueing into the next batch while one is computed. Inputs arrive decoded and checked (the
    gateway does that), so one bad upload cannot fail a batch.
    """

    def __init__(self, settings: dict[str, Any]) -> None:
        s = load_settings(settings)
        self.threads = use_assigned_threads()
        self.device = assigned_device()
        self.store = ModelStore(s.resolved_tracking_uri(), s.datasets, s.alias, ("student",),
                                device=self.device)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="predict")

    def reconfigure(self, config: dict[str, Any]) -> None:
        """``user_config``: ``max_batch_size`` (1 turns batching off), ``batch_wait_timeout_s``."""
        self._batched.set_max_batch_size(int(config.get("max_batch_size", 16)))
        self._batched.set_batch_wait_timeout_s(float(config.get("batch_wait_timeout_s", 0.005)))

    def status(self) -> dict[str, Any]:
        return _status(self.store)

    async def predict(self, dataset: str, image: np.ndarray) -> list[float]:
        """Class probabilities of one uint8 (3, S, S) image at the model's input size.

        Raises:
            ModelUnavailable: the dataset's student is not loaded (before joining a batch).
        """
        self.store.get(dataset)
        return await self._batched(dataset, image)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _batched(self, datasets: list[str], images: list[np.ndarray]) -> list[list[float]]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._forward, datasets, images)

    @torch.inference_mode()
    def _forward(self, datasets: Sequence[str], images: Sequence[np.ndarray]) -> list[list[float]]:
        """One forward pass per dataset present in the batch; results in request order."""
        out: list[list[float]] = [[] for _ in images]
        for dataset in dict.fromkeys(datasets):
            idx = [i for i, d in enumerate(datasets) if d == dataset]
            x = to_input(torch.from_numpy(np.stack([images[i] for i in idx])), self.device)
            probs = torch.softmax(self.store.get(dataset).model(x).float(), dim=1).cpu().tolist()
            for i, p in zip(idx, probs, strict=True):
                out[i] = p
        return out


@serve.deployment(name="Explainer", max_ongoing_requests=4, ray_actor_options={"num_cpus": 1})
class Explainer:
    """Students and teachers, explained with :func:`kdray.explain.explain` (CPU).

    Requests run on Serve's thread pool; work on one model is serialised by its lock
    (:mod:`kdray.explain.hooks`), so the student and the teacher are explained in parallel.
    Its own copies of the models: explanation hooks never see the Predictor's forward passes.
    """

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = load_settings(settings)
        self.threads = use_assigned_threads()
        roles: tuple[Role, ...] = ("student", "teacher") if self.settings.teacher else ("student",)
        self.store = ModelStore(self.settings.resolved_tracking_uri(), self.settings.datasets,
                                self.settings.alias, roles)

    def status(self) -> dict[str, Any]:
        return _status(self.store)

    def explain(self, dataset: str, role: Role, image: np.ndarray, methods: list[str],
                nsamples: int, include_arrays: bool, target: int | None) -> Explanation:
        """Explain one uint8 (3, S, S) image with ``methods`` of ``role``'s model.

        Raises:
            ModelUnavailable: that model is not loaded.
        """
        m = self.store.get(dataset, role)
        cfg = self.settings.explain.model_copy(update={"shap_nsamples": nsamples})
        return explain(m.model, image, methods, background=m.background, class_names=m.class_names,
                       target=target, cfg=cfg, include_arrays=include_arrays)
