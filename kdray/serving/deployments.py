"""What the HTTP gateway computes with: batched prediction in its own replica, explanations in
deployments of their own.

Prediction runs inside the ingress replica (:class:`BatchPredictor`): on CPU a forward pass of
the student costs about 5 ms at 224 px (2 cores) and each extra hop between Serve processes about
3 ms, so a separate predictor deployment would add more than half to every prediction. Explanations, which take
tens of milliseconds to seconds, run in :class:`Explainer` replicas (feature maps and Grad-CAM) and
in the same class bound as ``ShapExplainer`` (SHAP only, bounded), so they never stall a
prediction. Each is sized in ``serve/config.yaml``.
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
from kdray.devices import use_assigned_threads
from kdray.engine import to_input
from kdray.explain.api import Explanation, Render, explain
from kdray.explain.hooks import model_lock
from kdray.serving.settings import load_settings
from kdray.serving.store import LoadedModel, ModelStore, Role

__all__ = ["BatchPredictor", "Explainer", "card_title", "model_entry", "store_status"]

FAST_METHODS = ("feature_maps", "gradcam")


def model_entry(m: LoadedModel) -> dict[str, Any]:
    """What ``/v1/models`` shows of one loaded model (see :class:`kdray.serving.schemas.ModelEntry`)."""
    spec, reg = m.registered.spec, m.registered
    methods = [*FAST_METHODS, *(["shap"] if m.background is not None else [])]
    return {
        "registry": {
            "name": reg.name,
            "alias": reg.alias,
            "version": reg.version,
            "run_id": reg.run_id,
        },
        "architecture": "-".join(map(str, spec.widths)) if spec.kind == "student" else spec.arch,
        "params": int(reg.metrics.get("params", sum(p.numel() for p in m.model.parameters()))),
        "flops": int(reg.metrics.get("flops", 0)),
        "test_metrics": {k: v for k, v in reg.metrics.items() if k.startswith("test_")},
        "methods": methods,
        "trained_on": reg.trained_on.get("text", ""),
        "data": reg.record.public() if reg.record is not None else {},
        "runtime": m.runtime_note,
        "cam": _cam_entry(m),
    }


def _cam_entry(m: LoadedModel) -> dict[str, Any]:
    """The model's CAM: variant, layer, and what computes it (the ONNX explain graph when it
    computes exactly that variant and layer, else torch, and why)."""
    method, layer = m.cam if m.cam else (None, None)
    graph = m.explain_graph
    exact = graph is not None and (method is None or graph.cam_method == method)
    return {
        "method": method or (graph.cam_method if graph is not None else "default"),
        "layer": layer or (graph.cam_layer if graph is not None else "default"),
        "measured": m.cam is not None,
        "computed_by": m.explain_note
        if exact
        else "torch"
        + (f" (the ONNX export computes {graph.cam_method})" if graph is not None else ""),
        "other_variants": "torch (pytorch-grad-cam), at the same layer",
    }


def card_title(m: LoadedModel) -> str:
    """The task and the data the model trained on (from its run), e.g. "Brain Tumor MRI ·
    synthetic stand-in": the catalogue's title names the public dataset, which the model may
    never have seen."""
    task = get_spec(m.dataset).title.split(" (")[0]
    trained = m.registered.trained_on
    return f"{task} · {trained['source']}" if trained else task


def store_status(store: ModelStore) -> dict[str, Any]:
    """What the gateway asks every replica: ready?, loaded models, load errors, model cards."""
    store.retry_missing()
    swaps = store.swaps()
    return {
        "ready": store.ready(),
        "loaded": [f"{m.dataset}/{m.role}" for m in store.loaded()],
        "errors": store.errors(),
        "swaps": swaps,
        "cards": {
            f"{m.dataset}/{m.role}": {
                "title": card_title(m),
                "classes": m.class_names,
                "image_size": m.image_size,
                "entry": {**model_entry(m), "update": swaps.get(f"{m.dataset}/{m.role}", "")},
            }
            for m in store.loaded()
        },
    }


def probabilities(
    model: torch.nn.Module, images: Sequence[np.ndarray], device: torch.device
) -> list[list[float]]:
    """Class probabilities of uint8 (3, S, S) images, one forward pass (call in inference mode)."""
    x = to_input(torch.from_numpy(np.stack(images)), device)
    return torch.softmax(model(x).float(), dim=1).cpu().tolist()


MAX_CONCURRENT_BATCHES = 8  # an upper bound; the worker threads decide how many run at once


class BatchPredictor:
    """The students of a :class:`ModelStore`, predicting batches inside the replica that owns it.

    ``@serve.batch`` groups concurrent requests; forward passes (one per dataset present in a
    batch) run on ``workers`` threads, off the replica's event loop, so requests keep queueing
    into the next batch while others are computed. On CPU the replica runs one forward pass per
    CPU it was given, each on one torch thread: measured on 2 cores at 224 px, two passes side by
    side do about three times the images of one pass on two threads, and batches of 8 cost less
    per image than batches of 16 (whose activations no longer fit the caches). On a GPU, one pass
    at a time. Inputs arrive decoded and checked, so one bad upload cannot fail a batch.
    """

    def __init__(self, store: ModelStore, workers: int = 1) -> None:
        self.store = store
        self.workers = workers
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="predict")

    def configure(self, max_batch_size: int, batch_wait_timeout_s: float) -> None:
        """``max_batch_size`` 1 turns batching off."""
        self._batched.set_max_batch_size(max_batch_size)
        self._batched.set_batch_wait_timeout_s(batch_wait_timeout_s)

    async def predict(self, dataset: str, image: np.ndarray) -> list[float]:
        """Class probabilities of one uint8 (3, S, S) image at the model's input size.

        Raises:
            ModelUnavailable: the dataset's student is not loaded (before joining a batch).
        """
        self.store.get(dataset)
        return await self._batched(dataset, image)

    @serve.batch(
        max_batch_size=8, batch_wait_timeout_s=0.0, max_concurrent_batches=MAX_CONCURRENT_BATCHES
    )
    async def _batched(self, datasets: list[str], images: list[np.ndarray]) -> list[list[float]]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._forward, datasets, images)

    @torch.inference_mode()
    def _forward(self, datasets: Sequence[str], images: Sequence[np.ndarray]) -> list[list[float]]:
        """One forward pass per dataset present in the batch; results in request order."""
        out: list[list[float]] = [[] for _ in images]
        for dataset in dict.fromkeys(datasets):
            idx = [i for i, d in enumerate(datasets) if d == dataset]
            loaded = self.store.get(dataset)
            batch = [images[i] for i in idx]
            probs = (
                loaded.onnx.probabilities(batch)
                if loaded.onnx is not None
                else probabilities(loaded.model, batch, self.store.device)
            )
            for i, p in zip(idx, probs, strict=True):
                out[i] = p
        return out


@serve.deployment(name="Explainer", max_ongoing_requests=4, ray_actor_options={"num_cpus": 0})
class Explainer:
    """Students and teachers, explained with :func:`kdray.explain.explain` (CPU).

    Requests run on Serve's thread pool; work on one model is serialised by its lock
    (:mod:`kdray.explain.hooks`), so the student and the teacher are explained in parallel.
    Its own copies of the models: explanation hooks never see a prediction's forward pass.
    """

    def __init__(self, settings: dict[str, Any]) -> None:
        # Grad-CAM's library (about 1.6 s of imports, lazy in kdray.explain.gradcam) while the
        # replica starts, not inside the first /explain request.
        import pytorch_grad_cam  # noqa: F401

        self.settings = load_settings(settings)
        self.threads = use_assigned_threads()
        roles: tuple[Role, ...] = ("student", "teacher") if self.settings.teacher else ("student",)
        self.store = ModelStore(
            self.settings.resolved_tracking_uri(),
            self.settings.datasets,
            self.settings.alias,
            roles,
            onnx_threads=self.threads,
            # runtime: onnx: the students' feature maps and Grad-CAM from their exported explain
            # graph (one onnxruntime pass, checked against torch at load); SHAP stays on torch.
            explain_graph=self.settings.runtime == "onnx",
            reload_interval_s=self.settings.reload_interval_s,  # a new champion, no restart
        )

    def __del__(self) -> None:  # Serve calls it when the replica shuts down
        store = getattr(self, "store", None)  # None: __init__ failed
        if store is not None:
            store.close()

    def status(self) -> dict[str, Any]:
        return store_status(self.store)

    @torch.inference_mode()
    def predict(self, dataset: str, role: Role, images: list[np.ndarray]) -> list[list[float]]:
        """Class probabilities of uint8 (3, S, S) images with ``role``'s model (the Open Inference
        Protocol's ``<dataset>-teacher``: the Gateway holds only the students).

        Raises:
            ModelUnavailable: that model is not loaded.
        """
        m = self.store.get(dataset, role)
        # Under the model's explanation lock: explanation hooks must not see this forward pass.
        with model_lock(m.model):
            return probabilities(m.model, images, self.store.device)

    def explain(
        self,
        dataset: str,
        role: Role,
        image: np.ndarray,
        methods: list[str],
        nsamples: int,
        include_arrays: bool,
        target: int | None,
        render: Render = "overlay",
        cam_method: str | None = None,
    ) -> Explanation:
        """Explain one uint8 (3, S, S) image with ``methods`` of ``role``'s model (the CAM:
        ``cam_method``, default the model's own variant, at the model's own layer).

        Raises:
            ModelUnavailable: that model is not loaded.
        """
        m = self.store.get(dataset, role)
        cfg = self.settings.explain.model_copy(update={"shap_nsamples": nsamples})
        # The model's own CAM (its measured variant and layer) unless the request names a variant.
        own_method, own_layer = m.cam if m.cam else (cfg.cam_method, None)
        # No feature-map strip: a client lays out the per-layer maps itself.
        return explain(
            m.model,
            image,
            methods,
            background=m.background,
            class_names=m.class_names,
            target=target,
            cfg=cfg,
            include_arrays=include_arrays,
            render=render,
            grid=False,
            graph=m.explain_graph,
            cam_layer=own_layer,
            cam_method=cam_method or own_method,
        )
