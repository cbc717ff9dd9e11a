"""The models a server replica holds: registry versions by name@alias, loaded with kdray's code.

A model that cannot be loaded (not registered yet, tracking server down) is recorded with its
reason instead of failing the replica; :meth:`ModelStore.retry_missing` tries again, so a server
started before ``make run`` finished becomes ready once the champions are registered.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from mlflow import MlflowClient
from torch import nn

from kdray.data.specs import DATASETS
from kdray.explain.background import load_background
from kdray.explain.scoring import load_cam_choice
from kdray.models import load_model
from kdray.registry import RegisteredModel, fetch_registered, registered_name

__all__ = ["LoadedModel", "ModelStore", "ModelUnavailable", "Role", "redact"]

log = logging.getLogger("kdray.serve")
Role = Literal["student", "teacher"]


class ModelUnavailable(RuntimeError):
    """The model asked for is not loaded; the message says why (for a 503)."""


@dataclass
class LoadedModel:
    dataset: str
    role: Role
    registered: RegisteredModel
    model: nn.Module
    background: np.ndarray | None
    # The predict path on onnxruntime (kdray.edge.runtime.OnnxPredictor), when the store was
    # asked for it and the version's export matched its torch weights; None: torch predicts.
    onnx: Any = None
    runtime_note: str = "torch"  # what predicts, and why (shown in the model card)
    # The ONNX explain graph (kdray.edge.runtime.OnnxExplainer) when asked for and it matched.
    explain_graph: Any = None
    explain_note: str = "torch"
    # The CAM variant and layer measured for this model (its cam.json, kdray.explain.scoring);
    # None for a version registered before kdray measured them.
    cam: tuple[str, str] | None = None

    @property
    def class_names(self) -> list[str]:
        return list(self.registered.spec.class_names)

    @property
    def image_size(self) -> int:
        return int(self.registered.spec.image_size)


_URI = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://\S+")


def redact(text: str, tracking_uri: str) -> str:
    """``text`` without the tracking URI or any other URI in it: a URI can hold a database
    password, and these errors reach ``/readyz`` and 503 bodies."""
    return _URI.sub("<uri>", text.replace(tracking_uri, "<tracking uri>"))


def discover_datasets(tracking_uri: str, alias: str) -> list[str]:
    """Datasets whose champion ``kdray-<id>@alias`` exists in the registry."""
    client = MlflowClient(tracking_uri=tracking_uri)
    found = []
    for dataset in DATASETS:
        try:
            client.get_model_version_by_alias(registered_name(dataset), alias)
        except Exception:  # not registered (or no alias): not served
            continue
        found.append(dataset)
    return found


class ModelStore:
    """The student (and, with ``roles``, teacher) of each dataset, as one replica holds them.

    Args:
        tracking_uri: where the registry is.
        datasets: the datasets to serve; None: those with a registered champion (looked up
            again on every retry while none is found).
        alias: the alias to load.
        roles: ``("student",)`` or ``("student", "teacher")``.
        device: where the models live (see :func:`kdray.devices.assigned_device`).
        channels_last: keep the weights in channels-last memory format, for forward passes only:
            on CPU the students' max-pooling is then about 2x faster (same outputs to 1e-8).
        runtime: ``onnx``: students also load their ONNX export for prediction
            (:mod:`kdray.edge.runtime`); ``torch``: torch only.
        onnx_threads: onnxruntime intra-op threads per prediction.
        explain_graph: students also load their ONNX explain graph (feature maps and Grad-CAM in
            one pass, :class:`kdray.edge.runtime.OnnxExplainer`), checked against torch.
    """

    def __init__(
        self,
        tracking_uri: str,
        datasets: list[str] | None,
        alias: str,
        roles: tuple[Role, ...],
        device: torch.device | str = "cpu",
        channels_last: bool = False,
        runtime: Literal["onnx", "torch"] = "torch",
        onnx_threads: int = 1,
        explain_graph: bool = False,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.runtime = runtime
        self.onnx_threads = onnx_threads
        self.explain_graph = explain_graph
        self.device = torch.device(device)
        self.channels_last = channels_last
        self.alias = alias
        self.roles = roles
        self._wanted = datasets
        self._models: dict[tuple[str, Role], LoadedModel] = {}
        self._errors: dict[tuple[str, Role], str] = {}
        self._registry_error: str | None = None  # no dataset to serve could be found
        self._dir = tempfile.mkdtemp(prefix="kdray-serve-")
        self._lock = threading.Lock()
        self._last_try = 0.0
        self.retry_missing(min_interval_s=0.0)

    @property
    def datasets(self) -> list[str]:
        if self._wanted is not None:
            return list(self._wanted)
        return sorted({d for d, _ in self._models} | {d for d, _ in self._errors})

    def _load(self, dataset: str, role: Role) -> LoadedModel:
        name = registered_name(dataset, teacher=role == "teacher")
        dest = tempfile.mkdtemp(prefix=f"{name}-", dir=self._dir)
        try:
            return self._load_into(dataset, role, name, dest)
        except BaseException:
            shutil.rmtree(dest, ignore_errors=True)  # each failed attempt left a folder
            raise

    def _load_into(self, dataset: str, role: Role, name: str, dest: str) -> LoadedModel:
        registered = fetch_registered(name, self.alias, dest, self.tracking_uri)
        model, _ = load_model(registered.directory, device=self.device)
        model.requires_grad_(False)  # inference only; explanations enable what they need
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        choice = load_cam_choice(registered.directory)
        loaded = LoadedModel(
            dataset,
            role,
            registered,
            model,
            load_background(registered.directory),
            cam=(choice.method, choice.layer) if choice else None,
        )
        if role == "student" and (self.runtime == "onnx" or self.explain_graph):
            from kdray.edge import runtime

            export = runtime.fetch_export(name, self.alias, dest, self.tracking_uri)
            args = (export, model, self.onnx_threads, loaded.background)
            if self.runtime == "onnx":
                loaded.onnx, loaded.runtime_note = runtime.load_onnx_predictor(*args)
                log.info("%s v%s predicts with %s", name, registered.version, loaded.runtime_note)
            if self.explain_graph:
                loaded.explain_graph, loaded.explain_note = runtime.load_onnx_explainer(*args)
                log.info("%s v%s explains with %s", name, registered.version, loaded.explain_note)
        return loaded

    def retry_missing(self, min_interval_s: float = 10.0) -> None:
        """Try to load every configured model that is not loaded (at most every ``min_interval_s``)."""
        with self._lock:
            if time.monotonic() - self._last_try < min_interval_s:
                return
            self._last_try = time.monotonic()
            wanted = self._wanted
            if wanted is None:
                try:
                    wanted = discover_datasets(self.tracking_uri, self.alias)
                except Exception as exc:  # tracking store unreachable
                    self._registry_error = redact(f"registry unreachable: {exc}", self.tracking_uri)
                    return
                self._registry_error = (
                    None
                    if wanted
                    else (
                        f"no registered model kdray-<dataset>@{self.alias} in the registry "
                        "(args.tracking_uri); run `make run` (tune/run.py) first"
                    )
                )
            for dataset in wanted:
                for role in self.roles:
                    key = (dataset, role)
                    if key in self._models:
                        continue
                    try:
                        self._models[key] = self._load(dataset, role)
                        self._errors.pop(key, None)
                        log.info(
                            "loaded %s v%s",
                            self._models[key].registered.name,
                            self._models[key].registered.version,
                        )
                    except Exception as exc:
                        name = registered_name(dataset, teacher=role == "teacher")
                        text = f"{name}@{self.alias}: {type(exc).__name__}: {exc}"
                        self._errors[key] = redact(text, self.tracking_uri)[:500]

    def get(self, dataset: str, role: Role = "student") -> LoadedModel:
        """The loaded model.

        Raises:
            ModelUnavailable: not loaded (with the load error), or a role this store does not hold.
        """
        model = self._models.get((dataset, role))
        if model is not None:
            return model
        self.retry_missing()
        model = self._models.get((dataset, role))
        if model is not None:
            return model
        if role not in self.roles:
            raise ModelUnavailable(f"the server does not load {role} models (args.teacher: false)")
        raise ModelUnavailable(
            self._errors.get((dataset, role))
            or self._registry_error
            or f"{dataset}: not served by this server"
        )

    def errors(self) -> dict[str, str]:
        """Why models are missing (``<dataset>/<role>`` -> reason); empty when all are in."""
        out = {f"{d}/{r}": e for (d, r), e in self._errors.items()}
        if self._registry_error:
            out["registry"] = self._registry_error
        return out

    def ready(self) -> bool:
        """Every configured model loaded (and at least one dataset to serve)."""
        return (
            bool(self.datasets)
            and not self.errors()
            and all((d, r) in self._models for d in self.datasets for r in self.roles)
        )

    def loaded(self) -> list[LoadedModel]:
        return list(self._models.values())

    def close(self) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)
