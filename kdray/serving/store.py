"""The models a server replica holds: registry versions by name@alias, loaded with kdray's code.

A model that cannot be loaded (not registered yet, tracking server down) is recorded with its
reason instead of failing the replica; :meth:`ModelStore.retry_missing` tries again, so a server
started before ``make run`` finished becomes ready once the champions are registered.

A new champion reaches a running service without a restart: with ``reload_interval_s`` the store
polls the registry, and when ``kdray-<dataset>@alias`` has moved it loads the new version beside
the one serving (its ONNX export checked against its torch weights, as at start), checks it
against the served contract (the same class names; an ONNX predict path where the old one had
one; finite probabilities on the check images) and swaps it in with one assignment: a request
holds the model it started with, the next one gets the new. A version that fails to load or
fails a check is never swapped in: the old one keeps serving, and the replica's status (so
``/readyz``'s body and the model card) says what failed; it is not tried again until the alias
moves again or ten minutes have passed. A version registered before its ONNX export is logged
(``tune/run.py`` registers the champion, then exports it) is waited for, not refused, where the
old one predicts on ONNX. Polling, not a ``user_config`` change: the alias is the contract ``make run`` (or
anyone) moves, the same locally under ``serve run`` and on a cluster, with no redeploy.
"""

from __future__ import annotations

import contextlib
import logging
import os
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
from kdray.engine import softmax
from kdray.explain.background import load_background
from kdray.explain.scoring import load_cam_choice
from kdray.models import load_model
from kdray.registry import RegisteredModel, fetch_registered, registered_name

__all__ = ["LoadedModel", "ModelStore", "ModelUnavailable", "Role", "redact"]

log = logging.getLogger("kdray.serve")
Role = Literal["student", "teacher"]


RETRY_S = 600.0  # a version refused is tried again after this, if the alias still names it


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
    folder: str = ""  # where its files were downloaded (removed once it is swapped out)

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
        reload_interval_s: poll the registry this often and swap in a version the alias moved
            to (see the module docstring); None: never.
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
        reload_interval_s: float | None = None,
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
        # Per model: the last swap, or why the alias's version was refused (``swaps()``), and
        # the version refused (not tried again until the alias moves on).
        self._swaps: dict[tuple[str, Role], str] = {}
        self._refused: dict[tuple[str, Role], tuple[str, float]] = {}
        self._closed = threading.Event()
        self.retry_missing(min_interval_s=0.0)
        if reload_interval_s:
            threading.Thread(
                target=self._watch, args=(reload_interval_s,), name="kdray-reload", daemon=True
            ).start()

    @property
    def datasets(self) -> list[str]:
        if self._wanted is not None:
            return list(self._wanted)
        return sorted({d for d, _ in self._models} | {d for d, _ in self._errors})

    def _load(self, dataset: str, role: Role, version: str | None = None) -> LoadedModel:
        name = registered_name(dataset, teacher=role == "teacher")
        dest = tempfile.mkdtemp(prefix=f"{name}-", dir=self._dir)
        try:
            return self._load_into(dataset, role, name, dest, version)
        except BaseException:
            shutil.rmtree(dest, ignore_errors=True)  # each failed attempt left a folder
            raise

    def _load_into(
        self, dataset: str, role: Role, name: str, dest: str, version: str | None = None
    ) -> LoadedModel:
        registered = fetch_registered(name, self.alias, dest, self.tracking_uri, version=version)
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
            folder=dest,
        )
        if role == "student" and (self.runtime == "onnx" or self.explain_graph):
            from kdray.edge import runtime

            # The export of this very version (the alias may move while it loads).
            export = runtime.fetch_export(
                name, self.alias, dest, self.tracking_uri, version=registered.version
            )
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

    def _watch(self, interval_s: float) -> None:
        # Loading a new version beside the one serving takes CPU the requests need: this thread
        # yields to them (a thread's own niceness, Linux).
        with contextlib.suppress(OSError, AttributeError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        while not self._closed.wait(interval_s):
            try:
                self.refresh()
            except Exception as exc:  # noqa: BLE001 - the next poll tries again
                log.warning("registry poll failed: %s", redact(str(exc), self.tracking_uri))

    def refresh(self) -> list[str]:
        """Swap in every loaded model whose alias moved to another version, once that version has
        loaded and passed its checks (see the module docstring). Returns what changed."""
        client = MlflowClient(tracking_uri=self.tracking_uri)
        changed = []
        for key, current in list(self._models.items()):
            dataset, role = key
            name = registered_name(dataset, teacher=role == "teacher")
            try:
                version = str(client.get_model_version_by_alias(name, self.alias).version)
            except Exception:  # noqa: BLE001 - unreachable or alias gone: keep serving
                continue
            old = current.registered.version
            refused, when = self._refused.get(key, ("", 0.0))
            if version == old or (refused == version and time.monotonic() - when < RETRY_S):
                continue
            if (
                role == "student"
                and current.onnx is not None
                and not self._has_export(client, name, version)
            ):
                self._swaps[key] = (
                    f"{name} v{version} (@{self.alias}): waiting for its ONNX export (tune/run.py "
                    f"logs it after registering; tune/export.py makes one); still serving v{old}"
                )
                continue
            started = time.perf_counter()
            new = None
            try:
                new = self._load(dataset, role, version)
                self._check_swap(current, new)
            except Exception as exc:  # noqa: BLE001 - never swapped in; the old one serves
                if new is not None and new.folder:  # loaded but refused: its files go
                    shutil.rmtree(new.folder, ignore_errors=True)
                self._refused[key] = (version, time.monotonic())
                reason = redact(f"{type(exc).__name__}: {exc}", self.tracking_uri)[:400]
                self._swaps[key] = (
                    f"{name} v{version} (@{self.alias}) not swapped in: {reason}; still "
                    f"serving v{old}"
                )
                log.warning(self._swaps[key])
                continue
            self._models[key] = new  # one assignment: a request sees the old model or the new
            self._refused.pop(key, None)
            self._swaps[key] = (
                f"{name}: v{old} -> v{version} (@{self.alias}), loaded and checked in "
                f"{time.perf_counter() - started:.1f} s, at {time.strftime('%H:%M:%S')}"
            )
            log.info(self._swaps[key])
            changed.append(self._swaps[key])
            # Its files only: the weights and sessions live in memory for requests still on it.
            if current.folder:
                shutil.rmtree(current.folder, ignore_errors=True)
        return changed

    def _has_export(self, client: MlflowClient, name: str, version: str) -> bool:
        from kdray.edge.publish import has_edge

        try:
            return has_edge(client, name, version)
        except Exception:  # noqa: BLE001 - asked again at the next poll
            return False

    def _check_swap(self, old: LoadedModel, new: LoadedModel) -> None:
        """What a new version must meet before it replaces ``old``.

        Raises:
            ValueError: other class names; no ONNX predict path where the old had one (its
                export missing or not matching its weights); non-finite probabilities.
        """
        if new.class_names != old.class_names:
            raise ValueError(f"other classes {new.class_names} (served: {old.class_names})")
        if old.onnx is not None and new.onnx is None:
            raise ValueError(f"no ONNX predict path: {new.runtime_note}")
        from kdray.edge.runtime import check_images
        from kdray.engine import predict_logits

        x = check_images(new.image_size, new.background)
        probabilities = (
            np.asarray(new.onnx.probabilities(list(x)))
            if new.onnx is not None
            else softmax(predict_logits(new.model, x))
        )
        if not np.isfinite(probabilities).all() or not np.allclose(probabilities.sum(1), 1, 1e-3):
            raise ValueError("its probabilities on the check images are not finite")

    def swaps(self) -> dict[str, str]:
        """Per model (``<dataset>/<role>``): its last swap, or why a new version was refused."""
        return {f"{d}/{r}": text for (d, r), text in self._swaps.items()}

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
        self._closed.set()
        shutil.rmtree(self._dir, ignore_errors=True)
