"""Rebuilding the transparency reports of finished runs without training (``tune/report.py``):
:func:`finished_runs` finds each dataset with a finished run in a workspace and the config that
run used, and :func:`rebuild_reports` recomputes its report from the state :mod:`kdray.pipeline`
left, after checking that the config and the data are those the run's models saw."""

from __future__ import annotations

import json
from pathlib import Path

from kdray.config import ExperimentConfig
from kdray.data.prepare import prepare_dataset
from kdray.data.record import DataRecord, split_digest
from kdray.pipeline import run_key, state_file
from kdray.tracking import Tracker
from kdray.transparency import report_dataset
from kdray.workspace import Workspace

__all__ = ["finished_runs", "rebuild_reports"]


def finished_runs(
    ws: Workspace, overrides: list[str], given: ExperimentConfig
) -> list[tuple[str, ExperimentConfig]]:
    """Every dataset with a finished run in ``ws``, each with the config that run used (from its
    state, else its parent run's ``config.yaml``), ``overrides`` on top; where it runs and logs
    (``mlflow``, ``ray``) is ``given``'s. What ``tune/report.py`` rebuilds without ``--config``;
    ``--set data.datasets=[...]`` keeps those datasets only.

    Raises:
        RuntimeError: no finished run in ``ws``.
        ConfigError: a run's config does not load with the overrides.
    """
    import copy

    from kdray.config import apply_overrides, validate_config
    from kdray.lineage import run_config

    runs = []
    chosen = given.data.datasets if any(o.startswith("data.datasets=") for o in overrides) else None
    folder = ws.root / "state"
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        state = json.loads(path.read_text())
        if "summary" not in state or (chosen is not None and path.stem not in chosen):
            continue
        raw = state.get("config") or run_config(
            Tracker.open(given.mlflow, ws).client, state["parent_run_id"]
        )
        raw = apply_overrides(copy.deepcopy(raw), overrides)
        raw["mlflow"], raw["ray"] = given.mlflow.model_dump(), given.ray.model_dump()
        runs.append((path.stem, validate_config(raw, f"the config of the {path.stem} run")))
    if not runs:
        raise RuntimeError(f"no finished run in {ws.root}; run tune/run.py first")
    return runs


def rebuild_reports(
    runs: list[tuple[str, ExperimentConfig]], ws: Workspace, given: bool = True
) -> list[Path]:
    """Recompute the transparency report of each ``(dataset, config)``'s finished run in ``ws``
    (no training).

    Args:
        given: the configs are the user's (``--config``): each must be the one the run was made
            with. False: they are the runs' own (:func:`finished_runs`, which may fill keys a
            newer kdray added with their defaults).

    Raises:
        RuntimeError: a dataset has no finished run of that config in ``ws``; the message says
            what is there instead.
        kdray.lineage.LineageError: the data prepared now is not what the run's models saw.
    """
    paths = []
    for dataset, cfg in runs:
        tracker = Tracker.open(cfg.mlflow, ws)
        path = state_file(ws, dataset)
        state = json.loads(path.read_text()) if path.is_file() else {}
        if not state:
            raise RuntimeError(f"{dataset}: no run in {ws.root}; run tune/run.py first")
        if "summary" not in state:
            raise RuntimeError(
                f"{dataset}: the run in {ws.root} has not finished; continue it with "
                "tune/run.py --resume"
            )
        if given and state.get("run_key") != run_key(cfg):
            there = state.get("data")
            what = (
                f" (its models saw the {DataRecord.from_dict(there).describe()} at "
                f"{there['image_size']} px)"
                if there
                else ""
            )
            raise RuntimeError(
                f"{dataset}: the finished run in {ws.root} was made with another config{what}; "
                "leave out --config to rebuild the reports of the run that is there, or run "
                "tune/run.py with this config first"
            )
        data = prepare_dataset(cfg.data, dataset, ws)
        if state.get("data"):
            recorded = DataRecord.from_dict(state["data"])
            if recorded.digest and recorded.digest != split_digest(data.manifest):
                raise RuntimeError(
                    f"{dataset}: the files under {data.manifest.root} changed since the run "
                    f"(split digest {split_digest(data.manifest)}, the run's {recorded.digest})"
                )
        report = report_dataset(
            cfg,
            data,
            Path(state["teacher_dir"]),
            ws.champions / dataset,
            ws,
            tracker,
            state["parent_run_id"],
            state["champion_run_id"],
        )
        paths.append(report.paths["markdown"])
    return paths
