"""Audit a whole dataset on Ray Data: every image predicted and explained by student and teacher.

The pipeline: list the files (:mod:`kdray.audit.sources`) -> ``ray.data.from_items`` ->
``map_batches`` on an actor pool (:class:`kdray.audit.scorer.AuditScorer`: each actor loads the
registered student and teacher once, decodes its batch with kdray's decoder and scores it with
torch threads = its CPUs) -> per-image rows, streamed back to the driver as they finish
(progress, rows/s, ETA) -> one Parquet table, the aggregates and the look-first lists
(:mod:`kdray.audit.cases`), ``audit.md`` with thumbnails, all logged as an MLflow run.

Decoding happens inside the actors: only paths travel through Ray's object store, never pixels,
and no separate decode stage competes with the actors for CPUs (on a small machine a task stage
beside an actor pool that holds every CPU would never be scheduled). Ray Data restarts an actor
that dies and retries its batch, so a killed actor loses no row.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from kdray.audit.cases import Case, aggregates, look_first, strip_png
from kdray.audit.scorer import CHEAP_METHODS, AuditScorer, Settings
from kdray.audit.sources import AuditSource, folder_source, manifest_source, mark_shap
from kdray.config import ExperimentConfig
from kdray.console import eta
from kdray.data.folders import DataError
from kdray.data.specs import get_spec
from kdray.workspace import Workspace

__all__ = [
    "AuditRequest",
    "AuditResult",
    "Prepared",
    "audit_experiment",
    "prepare_audit",
    "run_audit",
]

log = logging.getLogger("kdray.audit")
METHODS = ("feature_maps", "gradcam", "shap")
TABLE = "audit.parquet"
ACTOR_START_TIMEOUT_S = 600
# The per-image table MLflow's UI shows (scores, no maps): the Parquet holds everything.
UI_COLUMNS_EXCLUDE = ("thumbnail", "path", "node")


@dataclass
class AuditRequest:
    """What ``tune/audit.py`` asks for (see its ``--help``)."""

    dataset: str
    root: str | None = None
    masks_root: str | None = None
    split: str | None = None  # default: test (workspace), all (folder)
    methods: tuple[str, ...] = CHEAP_METHODS
    shap_sample: int = 100
    alias: str = "champion"
    teacher: bool = True
    actors: int | None = None  # default: the cluster's CPUs / cpus_per_actor
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    batch_size: int | None = None
    top: int = 10
    out: str | None = None
    log_mlflow: bool = True
    # The student version and what it saw (kdray.lineage.Lineage); looked up by alias if None.
    lineage: Any = None


@dataclass
class AuditResult:
    dataset: str
    source: AuditSource
    out_dir: Path
    table: Path
    markdown: Path
    metrics: dict[str, float]
    cases: list[Case]
    versions: dict[str, str]
    run_id: str | None = None
    run_url: str | None = None
    stats: str = ""
    nodes: dict[str, int] = field(default_factory=dict)  # node id -> rows scored there


def audit_experiment(cfg: ExperimentConfig) -> str:
    """The MLflow experiment audits are logged to (beside the training runs' one)."""
    return f"{cfg.mlflow.experiment}-audit"


def _source(cfg: ExperimentConfig, ws: Workspace, req: AuditRequest) -> AuditSource:
    """A ``--root`` folder, else the model's own split: only once ``cfg`` is known to give the
    model the data it was trained on (the same input size, source and split; the manifest's
    split digest the model's), never another data set's."""
    spec = get_spec(req.dataset)
    if req.root:
        return folder_source(spec, req.root, req.masks_root, req.split or "all")
    if req.masks_root:
        raise DataError("--masks-root applies to a --root folder (the workspace has its masks)")
    from kdray.data.prepare import prepare_manifest
    from kdray.lineage import LineageError, check_manifest, contradiction_message

    lineage = req.lineage
    problems = lineage.record.contradictions(cfg.data)
    if problems:
        raise LineageError(
            contradiction_message(
                lineage,
                problems,
                "the config",
                "or pass --root DIR to audit another folder at the model's input size",
            )
        )
    manifest = prepare_manifest(cfg.data, req.dataset, ws)
    check_manifest(manifest, lineage)
    return manifest_source(manifest, req.split or "test", lineage.record.describe())


def _fetch_models(
    req: AuditRequest, tracking_uri: str, tmp: Path
) -> tuple[dict[str, tuple[dict[str, bytes], np.ndarray | None]], dict[str, str], list[str], int]:
    """The registered versions (resolved once, pinned for every actor) as bytes; the student is
    the version whose lineage was checked."""
    from kdray.explain.background import load_background
    from kdray.models import model_files
    from kdray.registry import fetch_registered, registered_name

    models: dict[str, tuple[dict[str, bytes], np.ndarray | None]] = {}
    versions: dict[str, str] = {}
    sizes = set()
    class_names: list[str] = []
    for role in ("student", "teacher") if req.teacher else ("student",):
        name = registered_name(req.dataset, teacher=role == "teacher")
        pinned = req.lineage.version if role == "student" and req.lineage else None
        reg = fetch_registered(name, req.alias, tmp / role, tracking_uri, version=pinned)
        models[role] = (model_files(reg.directory), load_background(reg.directory))
        versions[role] = f"{name}/{reg.version}"
        versions[f"{role}.run_id"] = reg.run_id
        sizes.add(int(reg.spec.image_size))
        class_names = list(reg.spec.class_names)
    if len(sizes) != 1:
        raise DataError(f"student and teacher take different input sizes {sorted(sizes)}")
    return models, versions, class_names, sizes.pop()


def _actors(req: AuditRequest, n_items: int) -> int:
    import ray

    if req.actors is not None:
        return max(1, req.actors)
    cpus = float(ray.cluster_resources().get("CPU", 1.0))
    return max(1, min(int(cpus // max(req.cpus_per_actor, 1e-6)), max(1, n_items)))


def _batch_size(req: AuditRequest, n_items: int, actors: int) -> int:
    """Batches small enough that every actor gets several (so work spreads and a retry is
    cheap), at most 32 images."""
    if req.batch_size is not None:
        return max(1, req.batch_size)
    return max(1, min(32, math.ceil(n_items / (actors * 4))))


@dataclass
class Prepared:
    """What an audit needs before Ray: the listing and the registered models (as bytes)."""

    source: AuditSource
    models: dict[str, tuple[dict[str, bytes], np.ndarray | None]]
    versions: dict[str, str]
    class_names: list[str]
    size: int
    shap_n: int


def prepare_audit(cfg: ExperimentConfig, ws: Workspace, req: AuditRequest) -> Prepared:
    """List the images and fetch the registered models; no Ray (a bad input fails in seconds).

    Raises:
        DataError: bad methods, folder, split or masks, or a model pair that does not fit.
        MlflowException: the registered models cannot be found.
        kdray.lineage.LineageError: ``cfg`` would audit the model's split on other data than
            the model was trained on.
    """
    from kdray.lineage import model_lineage
    from kdray.registry import registered_name
    from kdray.tracking import resolve_tracking_uri

    unknown = sorted(set(req.methods) - set(METHODS))
    if unknown or not req.methods:
        raise DataError(f"--methods: unknown {unknown}; choose from {list(METHODS)}")
    if req.lineage is None:
        req.lineage = model_lineage(
            registered_name(req.dataset), req.alias, resolve_tracking_uri(cfg.mlflow, ws)
        )
    source = _source(cfg, ws, req)
    if not source.items:
        raise DataError(f"{req.dataset}: no images in the {source.description}")
    shap_n = mark_shap(source, req.shap_sample, cfg.seed) if "shap" in req.methods else 0
    tmp = Path(tempfile.mkdtemp(prefix="kdray-audit-"))
    try:
        models, versions, class_names, size = _fetch_models(
            req, resolve_tracking_uri(cfg.mlflow, ws), tmp
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Prepared(source, models, versions, class_names, size, shap_n)


def run_audit(
    cfg: ExperimentConfig,
    ws: Workspace,
    req: AuditRequest,
    *,
    prepared: Prepared | None = None,
    scorer_cls: type = AuditScorer,
    progress: Callable[[str], None] = log.info,
    progress_every_s: float = 5.0,
) -> AuditResult:
    """Run one audit on the Ray cluster this process is connected to (see the module docstring).

    Raises:
        DataError: a bad source (folder, split, masks) or a model pair that does not fit.
        MlflowException: the registered models cannot be found.
    """
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    started = time.perf_counter()
    prep = prepared or prepare_audit(cfg, ws, req)
    source, models, versions, class_names = (
        prep.source,
        prep.models,
        prep.versions,
        prep.class_names,
    )
    size, shap_n = prep.size, prep.shap_n
    out_dir = Path(req.out) if req.out else ws.reports / "audits" / _stamp(req.dataset)
    out_dir.mkdir(parents=True, exist_ok=True)
    n = len(source.items)
    actors = _actors(req, n)
    batch = _batch_size(req, n, actors)
    settings = Settings(
        methods=tuple(m for m in METHODS if m in req.methods),
        explain=cfg.explain,
        seed=cfg.seed,
        threads=max(1, int(req.cpus_per_actor)),
    )
    progress(
        f"audit {req.dataset}: {n} images from {source.description}, {actors} actor(s) x "
        f"{req.cpus_per_actor:g} CPU, batches of {batch}, methods {list(settings.methods)}"
        + (f" (SHAP on {shap_n} sampled)" if shap_n else "")
    )
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False  # kdray prints its own progress lines
    # Every actor up (models loaded) before the first batch is handed out: otherwise the first
    # actor ready queues batches meant for the others (on a cluster, the node that had to unpack
    # the job's code last would get little or nothing). Ten minutes to find room, then an error.
    ctx.wait_for_min_actors_s = ACTOR_START_TIMEOUT_S
    remote_args = {"num_gpus": req.gpus_per_actor} if req.gpus_per_actor else {}
    # Shipped once through the object store, to actors on any node; the reference is held until
    # the audit ends, so an actor Ray restarts reads the weights again.
    models_ref = ray.put(models)
    ds = ray.data.from_items(
        source.rows(), override_num_blocks=max(1, math.ceil(n / batch))
    ).map_batches(
        scorer_cls,
        fn_constructor_kwargs={"models": models_ref, "settings": settings},
        compute=ActorPoolStrategy(size=actors),
        num_cpus=req.cpus_per_actor,
        batch_size=batch,
        batch_format="numpy",
        **remote_args,
    )
    tables: list[pa.Table] = []
    done, last = 0, time.perf_counter()
    scoring_started = time.perf_counter()
    first_row_s: float | None = None  # the actors' start-up and first batch
    for part in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        tables.append(part)
        done += part.num_rows
        now = time.perf_counter()
        first_row_s = now - scoring_started if first_row_s is None else first_row_s
        if now - last >= progress_every_s or done == n:
            elapsed = now - scoring_started
            progress(
                f"audit {req.dataset}: {done}/{n} images, {done / max(elapsed, 1e-9):.1f} rows/s"
                + eta(elapsed, done, n)
            )
            last = now
    scoring_s = time.perf_counter() - scoring_started
    del models_ref
    table = pa.concat_tables(tables).sort_by("index") if tables else None
    if table is None or table.num_rows != n:
        got = 0 if table is None else table.num_rows
        raise RuntimeError(f"audit {req.dataset}: {got} rows for {n} images")
    pq.write_table(table, out_dir / TABLE)
    stats = ds.stats()
    (out_dir / "ray_data_stats.txt").write_text(stats)
    df = table.to_pandas()
    metrics = aggregates(df, class_names, list(settings.methods))
    metrics["rows_per_s"] = n / max(scoring_s, 1e-9)
    metrics["seconds"] = time.perf_counter() - started
    metrics["actors"] = float(actors)
    metrics["first_row_seconds"] = float(first_row_s or 0.0)
    cases = look_first(df, class_names, req.top)
    nodes = df["node"].value_counts().to_dict()
    result = AuditResult(
        req.dataset,
        source,
        out_dir,
        out_dir / TABLE,
        out_dir / "audit.md",
        metrics,
        cases,
        versions,
        stats=stats,
        nodes={str(k): int(v) for k, v in nodes.items()},
    )
    _write_markdown(result, df, class_names, settings, req, size, shap_n)
    _write_summary(result, class_names, settings, req, size)
    if req.log_mlflow:
        _log(cfg, ws, result, df, req, settings, actors, batch, shap_n)
    progress(
        f"audit {req.dataset}: written to {out_dir} "
        f"({time.perf_counter() - started - scoring_s:.1f} s outside the scoring, "
        f"{first_row_s or 0.0:.1f} s to the first row)"
    )
    return result


SUMMARY = "audit.json"  # what the viewer reads: the lists, the aggregates, the models


def _write_summary(
    r: AuditResult, class_names: list[str], settings: Settings, req: AuditRequest, size: int
) -> None:
    summary = {
        "dataset": r.dataset,
        "source": r.source.description,
        "labelled": r.source.labelled,
        "class_names": class_names,
        "image_size": size,
        "methods": list(settings.methods),
        "roles": ["student", "teacher"] if req.teacher else ["student"],
        "versions": r.versions,
        "metrics": r.metrics,
        "cases": [asdict(c) for c in r.cases],
    }
    (r.out_dir / SUMMARY).write_text(json.dumps(summary, indent=1))


def _stamp(dataset: str) -> str:
    return f"{dataset}-{time.strftime('%Y%m%d-%H%M%S')}"


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def _write_markdown(
    r: AuditResult,
    df: pd.DataFrame,
    class_names: list[str],
    settings: Settings,
    req: AuditRequest,
    size: int,
    shap_n: int,
) -> None:
    m = r.metrics
    thumbs = r.out_dir / "thumbs"
    thumbs.mkdir(exist_ok=True)
    by_index = df.set_index("index", drop=False)
    roles = ["student", "teacher"] if req.teacher else ["student"]
    lines = [
        f"# Audit: `{r.dataset}`, {r.source.description}",
        "",
        f"{int(m['images'])} images ({int(m['unreadable'])} unreadable), {size}x{size}; "
        f"models {', '.join(r.versions[k] for k in roles)} (`@{req.alias}`); methods "
        f"{', '.join(settings.methods)}"
        + (f" (SHAP on a seeded sample of {shap_n})" if shap_n else "")
        + f"; {m['rows_per_s']:.1f} images/s on {int(m['actors'])} actor(s), "
        f"{m['seconds']:.0f} s in all.",
        "",
        "| | " + " | ".join(roles) + " |",
        "|---|" + "---:|" * len(roles),
    ]
    rows = [("Accuracy", "accuracy"), ("ECE", "ece"), ("Mean confidence", "confidence")]
    for method in settings.methods:
        rows.append((f"Pointing game, {method}", f"pointing_game.{method}"))
        rows.append((f"Energy in mask, {method}", f"energy_in_mask.{method}"))
    for label, key in rows:
        lines.append(
            f"| {label} | " + " | ".join(_fmt(m.get(f"{r_}.{key}")) for r_ in roles) + " |"
        )
    if "agreement.predictions" in m:
        lines += ["", f"Teacher-student label agreement: {_fmt(m['agreement.predictions'])}."]
    if not r.source.labelled:
        lines += ["", "Unlabelled folder: accuracy and calibration are not audited."]
    lines += ["", "## Look at these first", ""]
    for case in r.cases:
        lines += [f"### {case.title} ({case.matched})", "", f"_{case.rule}._", ""]
        if not case.rows:
            lines += ["None.", ""]
            continue
        lines += ["| # | file | why | input, student, teacher CAM |", "|---:|---|---|---|"]
        for row in case.rows:
            picture = ""
            if case.kind != "unreadable":
                png = strip_png(by_index.loc[row["index"]].to_dict())
                if png:
                    (thumbs / f"{row['index']}.png").write_bytes(png)
                    picture = f"![](thumbs/{row['index']}.png)"
            lines.append(f"| {row['index']} | `{row['name']}` | {row['why']} | {picture} |")
        lines.append("")
    lines += [
        f"The per-image table: `{TABLE}` (one row per file; maps as uint8 at each layer's "
        "resolution). Ray Data's operator stats: `ray_data_stats.txt`.",
        "",
    ]
    r.markdown.write_text("\n".join(lines))


def _log(
    cfg: ExperimentConfig,
    ws: Workspace,
    r: AuditResult,
    df: pd.DataFrame,
    req: AuditRequest,
    settings: Settings,
    actors: int,
    batch: int,
    shap_n: int,
) -> None:
    from mlflow import MlflowClient

    from kdray.tracking import Tracker, runs_url

    tracker = Tracker.open(cfg.mlflow.model_copy(update={"experiment": audit_experiment(cfg)}), ws)
    client: MlflowClient = tracker.client
    student = r.versions["student"]
    run_id = tracker.start_run(
        f"audit-{r.dataset}",
        r.dataset,
        "audit",
        tags={"kdray.audit": student, "kdray.audit.source": r.source.description[:250]},
    )
    params = {
        "dataset": r.dataset,
        "source": r.source.description[:500],
        "split": req.split or ("all" if req.root else "test"),
        "methods": ",".join(settings.methods),
        "shap_sample": shap_n,
        "alias": req.alias,
        "actors": actors,
        "cpus_per_actor": req.cpus_per_actor,
        "batch_size": batch,
        **{f"model.{k}": v for k, v in r.versions.items()},
    }
    for key, value in params.items():
        client.log_param(run_id, key, str(value))
    for key, value in r.metrics.items():
        client.log_metric(run_id, key, value)
    client.log_artifacts(run_id, str(r.out_dir))
    scalar = [
        c
        for c in df.columns
        if c not in UI_COLUMNS_EXCLUDE
        and not df[c].map(lambda v: isinstance(v, bytes | list | np.ndarray)).any()
    ]
    client.log_table(run_id, df[scalar], "audit_table.json")
    client.set_terminated(run_id, "FINISHED")
    name, version = student.rsplit("/", 1)
    try:  # the link from the champion's version to its latest audit
        client.set_model_version_tag(name, version, "kdray.audit.last_run", run_id)
    except Exception as exc:  # noqa: BLE001 - the audit is logged either way
        log.warning("could not tag %s: %s", student, exc)
    r.run_id = run_id
    r.run_url = f"{runs_url(tracker.tracking_uri, tracker.experiment_id)}/{run_id}"
