"""The main job: for each dataset, data -> teacher (Ray Train) -> KD sweep (Ray Tune) -> champion."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray

from kdray.champion import ChampionResult, crown_champion
from kdray.config import ExperimentConfig, RayConfig
from kdray.data.mlflow_inputs import split_inputs
from kdray.data.prepare import PreparedData, preflight, prepare_dataset
from kdray.data.record import DataRecord, record_for, split_digest
from kdray.explain.sanity import PASS_BELOW
from kdray.metrics import paired_difference
from kdray.pareto_report import ParetoSummary, log_pareto
from kdray.registry import registered_name
from kdray.search_findings import SearchFindings, across_datasets, log_findings
from kdray.sweep import make_job, run_sweep, seed_point
from kdray.teacher import train_teacher
from kdray.tracking import Tracker
from kdray.transparency import report_dataset
from kdray.workspace import Workspace

__all__ = ["DatasetSummary", "format_summary", "ray_session", "rebuild_reports", "run_pipeline"]

log = logging.getLogger("kdray")


@dataclass
class DatasetSummary:
    dataset: str
    teacher_test_accuracy: float
    teacher_test_f1: float
    student_test_accuracy: float
    student_test_f1: float
    baseline_test_accuracy: float
    baseline_test_f1: float
    kd_gain: float  # student - CE-only baseline, test accuracy (means over seeds when given)
    alpha: float
    temperature: float
    widths: str
    lr: float
    teacher_params: int
    student_params: int
    teacher_flops: int
    student_flops: int
    seeds: str
    student_test_accuracy_std: float
    baseline_test_accuracy_std: float
    teacher_reused: bool
    trials: int
    seconds: float
    parent_run_id: str
    # Expected calibration error on the test split (means over seeds when given); NaN in the
    # summary of a run made before kdray measured it.
    teacher_test_ece: float = float("nan")
    student_test_ece: float = float("nan")
    baseline_test_ece: float = float("nan")
    # The KD gain paired by seed: spread of the per-seed gains and a paired t-test's p-value
    # (NaN with one seed).
    kd_gain_std: float = float("nan")
    kd_gain_p: float = float("nan")
    # The smallest gain that paired test detects with 80 % power, from the observed spread.
    kd_gain_mde: float = float("nan")
    # The baseline's own search: its chosen lr and how many trials it was chosen from.
    baseline_lr: float = float("nan")
    baseline_trials: int = 0
    # Teacher-student agreement from the transparency report (``agreement.*`` of its metrics;
    # empty without a report).
    agreement: dict[str, float] = field(default_factory=dict)
    # Training images each side saw (data.synthetic.student_fraction); 0 in an older summary.
    teacher_train_images: int = 0
    student_train_images: int = 0
    # What the KD search found (kdray.search_findings.SearchFindings.to_dict()); empty in an
    # older summary.
    search: dict[str, Any] = field(default_factory=dict)
    # The report's sanity checks (``*.randomisation.*``, ``*.random_logit.*``,
    # ``*.blank_test.*`` of its metrics; empty without a report or in an older summary).
    sanity: dict[str, float] = field(default_factory=dict)
    # The data, in the record's public phrase (kdray.data.record): "synthetic stand-in (...)" or
    # a real folder's name; empty in an older summary.
    data_source: str = ""
    # Transparency (kdray.explain.scoring): the champion rule, the champion's CAM variant and
    # layer and validation score, the Pareto front against the accuracy-only pick
    # (kdray.pareto_report.ParetoSummary), and KD against CE-only per test-transparency figure,
    # paired by seed ({"test_transparency": {"kd", "ce", "mean", "std", "p", "mde", "n"}, ...});
    # empty in an older summary.
    transparency: dict[str, Any] = field(default_factory=dict)


SANITY_KEYS = (".randomisation.", ".random_logit.", ".blank_test.", "localisation_test.images")


@contextmanager
def ray_session(cfg: RayConfig, ws: Workspace) -> Iterator[None]:
    """Join ``ray.address`` / ``$RAY_ADDRESS``, else start a private local Ray; shut down what we started."""
    if ray.is_initialized():
        yield
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ctrl-C stops the driver at once (KeyboardInterrupt); --resume continues from Tune's
    # periodically saved state, as after a kill, instead of Tune's own half-way shutdown.
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # Ray starts workers at nice 15; on a machine shared with other work that starves the
        # training processes (seen here: a 7x slower teacher epoch). kdray's own local Ray
        # runs them at normal priority unless the user sets RAY_worker_niceness.
        os.environ.setdefault("RAY_worker_niceness", "0")
        # address="local" never attaches to another Ray that happens to run on this machine.
        # The dashboard serves Ray's State API, which Ray Train's PlacementGroupCleaner asks
        # every second whether the Train controller still lives: without it the cleaner cannot
        # clean up after a dead controller and warns on every check (dozens of lines per fit).
        # It listens on 127.0.0.1 (8265, or the next free port).
        ray.init(
            address="local",
            num_cpus=cfg.num_cpus,
            include_dashboard=True,
            _temp_dir=cfg.temp_dir or f"/tmp/kdray-ray-{os.getuid()}",
        )
    try:
        yield
    finally:
        ray.shutdown()


def run_key(cfg: ExperimentConfig) -> str:
    """Identifies what a dataset's run trains and selects (not where it runs, logs, or how its
    report explains: of ``explain``, only ``cam_method``, which the champion is selected by)."""
    data = cfg.to_dict()
    data["data"].pop("datasets")  # the state is per dataset: the list around it does not matter
    kept = {k: v for k, v in data.items() if k not in ("ray", "mlflow", "explain", "export")}
    kept["cam_method"] = data["explain"]["cam_method"]
    blob = json.dumps(kept, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _state_path(ws: Workspace, dataset: str) -> Path:
    return ws.root / "state" / f"{dataset}.json"


def _save_state(ws: Workspace, dataset: str, state: dict) -> None:
    path = _state_path(ws, dataset)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(path)


def log_data(tracker: Tracker, run_id: str, data: PreparedData) -> None:
    """The splits as MLflow dataset inputs and their sizes as params; files left out as
    unreadable (``data.skip_unreadable``) as param ``n_unreadable`` and artifact
    ``data/unreadable_files.json`` (path and reason each)."""
    manifest = data.manifest
    tracker.log_inputs(run_id, split_inputs(data))
    tracker.log_params(run_id, {f"n_{k}": v for k, v in manifest.counts().items()})
    if manifest.skipped:
        tracker.log_params(run_id, {"n_unreadable": len(manifest.skipped)})
        tracker.client.log_dict(
            run_id,
            {"root": manifest.root, "skipped": manifest.skipped},
            "data/unreadable_files.json",
        )


def _export_champion(
    cfg: ExperimentConfig, data: PreparedData, ws: Workspace, tracker: Tracker, dataset: str
) -> None:
    """The champion as ONNX beside its registered version; a failed parity check is logged, not
    fatal (the run's models and results stand without the edge copy)."""
    from kdray.edge.export import ExportError
    from kdray.edge.publish import export_registered

    images = data.splits["test"].images[: cfg.export.parity_images]
    try:
        export, registered = export_registered(
            registered_name(dataset), "champion", images, ws.edge / dataset, tracker.tracking_uri
        )
    except ExportError as exc:
        log.warning("%s: no ONNX copy of the champion: %s", dataset, exc)
        return
    log.info(
        "%s: champion v%s exported to ONNX in %.1f s (%s): %s",
        dataset,
        registered.version,
        export.seconds,
        export.directory,
        export.parity.describe(),
    )


def run_dataset(
    cfg: ExperimentConfig, dataset: str, ws: Workspace, tracker: Tracker, resume: bool = False
) -> DatasetSummary:
    """One dataset end to end. With ``resume``, a finished dataset of the same config is returned
    as it was, and an unfinished one continues in its parent run and Tune experiment; stages
    that finished (teacher, sweep + champion) are not redone.

    Without ``resume``, an unfinished earlier run of this dataset in ``ws`` is abandoned: its
    parent run and the children still RUNNING are marked KILLED.
    """
    key = run_key(cfg)
    state_path = _state_path(ws, dataset)
    state = json.loads(state_path.read_text()) if state_path.is_file() else None
    if (
        state
        and not state.get("summary")
        and not resume
        and tracker.run_exists(state["parent_run_id"])
    ):
        tracker.abandon(state["parent_run_id"])
    if not (
        resume and state and state["run_key"] == key and tracker.run_exists(state["parent_run_id"])
    ):
        state = None
    if state and state.get("summary"):
        log.info("%s: finished in an earlier run (%s); not redone", dataset, state["parent_run_id"])
        return DatasetSummary(**state["summary"])
    started = time.perf_counter()
    data = prepare_dataset(cfg.data, dataset, ws)
    log.info("%s: %s images (train/val/test)", dataset, data.manifest.counts())
    fraction = cfg.data.student_fraction(dataset)
    n_students = len(data.student_indices(fraction, cfg.data.split_seed))
    if fraction < 1.0:
        log.info(
            "%s: the students train on %d of the %d training images "
            "(data.synthetic.student_fraction %.2f); the teacher on all of them",
            dataset,
            n_students,
            len(data.splits["train"]),
            fraction,
        )
    if state:
        parent, sweep_name = state["parent_run_id"], state["sweep"]
        tracker.client.update_run(parent, status="RUNNING")
        log.info("%s: resuming run %s", dataset, parent)
    else:
        parent = tracker.start_run(
            dataset, dataset, "parent", tags={"kdray.manifest": data.manifest.fingerprint[:12]}
        )
        sweep_name = f"sweep-{dataset}-{data.key}-{time.strftime('%Y%m%d-%H%M%S')}"
        tracker.log_config(parent, cfg.to_dict())
        log_data(tracker, parent, data)
        tracker.log_params(parent, {"n_train_students": n_students})
    # The run's config and what its models saw (kdray.data.record): what `tune/report.py`,
    # given no --config, rebuilds the reports with.
    base = {
        "run_key": key,
        "parent_run_id": parent,
        "sweep": sweep_name,
        "config": cfg.to_dict(),
        "data": record_for(cfg.data, data, student=True).to_dict(),
    }
    if not state:
        _save_state(ws, dataset, base)
    try:
        teacher = train_teacher(cfg, data, ws, tracker, parent)
        log.info(
            "%s: teacher %s, test accuracy %.3f",
            dataset,
            "reused" if teacher.reused else "trained",
            teacher.test_metrics["accuracy"],
        )
        if state and state.get("champion"):
            champion, trials = ChampionResult(**state["champion"]), state["trials"]
            log.info("%s: sweep and champion finished in an earlier run; not redone", dataset)
        else:
            job = make_job(cfg, data, teacher, tracker, parent)
            outcomes = run_sweep(job, ws, name=sweep_name, restore=state is not None)
            champion = crown_champion(
                job,
                outcomes,
                data.splits["test"],
                ws,
                tracker,
                parent,
                baseline_sweep=f"{sweep_name}-baseline",
                restore=state is not None,
            )
            trials = len(outcomes)
            _save_state(ws, dataset, {**base, "champion": asdict(champion), "trials": trials})
        # Before the report: it shows the search's panels (search.md, search.png).
        findings = log_findings(
            tracker,
            parent,
            champion.trial_run_id,
            ws.reports / dataset,
            dataset,
            cfg.seed,
            seed_point=seed_point(cfg),
        )
        log.info("%s: %s", dataset, findings.sentence())
        pareto = log_pareto(
            tracker,
            parent,
            champion.trial_run_id,
            champion.accuracy_pick_run_id or champion.trial_run_id,
            ws.reports / dataset,
            dataset,
            champion.rule,
            cfg.tune.selection_tolerance,
        )
        log.info("%s: %s", dataset, pareto.sentence())
        # Before the report: it finds the learning curves through these tags.
        tracker.set_tags(
            parent,
            {
                "kdray.teacher_run": teacher.run_id,
                "kdray.champion_run": champion.run_id,
                "kdray.baseline_run": champion.baseline_run_id,
            },
        )
        if cfg.export.onnx:
            _export_champion(cfg, data, ws, tracker, dataset)
        agreement: dict[str, float] = {}
        sanity: dict[str, float] = {}
        if cfg.explain.report:
            log.info("%s: transparency report (teacher vs champion)", dataset)
            report = report_dataset(
                cfg,
                data,
                teacher.model_dir,
                ws.champions / dataset,
                ws,
                tracker,
                parent,
                champion.run_id,
            )
            agreement = {k: v for k, v in report.metrics.items() if k.startswith("agreement.")}
            sanity = {k: v for k, v in report.metrics.items() if any(p in k for p in SANITY_KEYS)}
        seeds = champion.champion_seeds
        student_acc = seeds.get("test_accuracy_mean", champion.test_metrics["accuracy"])
        summary = DatasetSummary(
            dataset=dataset,
            teacher_test_accuracy=teacher.test_metrics["accuracy"],
            teacher_test_f1=teacher.test_metrics["f1_macro"],
            student_test_accuracy=student_acc,
            student_test_f1=seeds.get("test_f1_macro_mean", champion.test_metrics["f1_macro"]),
            baseline_test_accuracy=champion.baseline_test["test_accuracy_mean"],
            baseline_test_f1=champion.baseline_test["test_f1_macro_mean"],
            kd_gain=student_acc - champion.baseline_test["test_accuracy_mean"],
            alpha=champion.alpha,
            temperature=champion.temperature,
            widths="-".join(map(str, champion.widths)),
            lr=champion.lr,
            teacher_params=teacher.params,
            student_params=champion.params,
            teacher_flops=teacher.flops,
            student_flops=champion.flops,
            seeds=" ".join(map(str, champion.seeds)),
            student_test_accuracy_std=seeds.get("test_accuracy_std", 0.0),
            baseline_test_accuracy_std=champion.baseline_test["test_accuracy_std"],
            teacher_reused=teacher.reused,
            trials=trials,
            seconds=time.perf_counter() - started,
            parent_run_id=parent,
            teacher_test_ece=teacher.test_metrics.get("ece", float("nan")),
            student_test_ece=seeds.get(
                "test_ece_mean", champion.test_metrics.get("ece", float("nan"))
            ),
            baseline_test_ece=champion.baseline_test.get("test_ece_mean", float("nan")),
            **_paired_gain(champion),
            baseline_lr=champion.baseline_lr,
            baseline_trials=champion.baseline_trials,
            agreement=agreement,
            teacher_train_images=len(data.splits["train"]),
            student_train_images=n_students,
            search=findings.to_dict(),
            sanity=sanity,
            data_source=data.source.describe(),
            transparency={
                "rule": champion.rule,
                "cam_method": champion.cam_method,
                "cam_layer": champion.cam_layer,
                "pareto": pareto.to_dict(),
                "kd_vs_ce": _paired_transparency(champion),
            },
        )
        tracker.log_metrics(
            parent,
            {
                **{
                    k: v
                    for k, v in asdict(summary).items()
                    if isinstance(v, float | int) and not isinstance(v, bool)
                },
                # KD against CE-only, per test-transparency figure (kd_vs_ce.<figure>.<stat>)
                **{
                    f"kd_vs_ce.{key.removeprefix('test_')}.{stat}": value
                    for key, pair in summary.transparency["kd_vs_ce"].items()
                    for stat, value in pair.items()
                    if math.isfinite(value)
                },
            },
        )
    except KeyboardInterrupt:
        tracker.end_run(parent, "KILLED")
        raise
    except BaseException:
        tracker.end_run(parent, "FAILED")
        raise
    tracker.end_run(parent)
    _save_state(
        ws,
        dataset,
        {
            **base,
            "teacher_dir": str(teacher.model_dir),
            "champion_run_id": champion.run_id,
            "summary": asdict(summary),
        },
    )
    return summary


def _paired_transparency(champion: ChampionResult) -> dict[str, dict[str, float]]:
    """KD champion against CE-only baseline per test-transparency figure, paired by seed: the
    means, and the difference's mean, std, p and MDE (NaN with one seed)."""
    kd, ce = champion.champion_seed_transparency, champion.baseline_seed_transparency
    out = {}
    for key in kd:
        a, b = kd[key], ce.get(key, [])
        if not a or len(a) != len(b):
            continue
        out[key] = {"kd": float(np.mean(a)), "ce": float(np.mean(b)), **paired_difference(a, b)}
    return out


def _paired_gain(champion: ChampionResult) -> dict[str, float]:
    a, b = champion.champion_seed_accuracy, champion.baseline_seed_accuracy
    if not a or len(a) != len(b):  # a state written before kdray kept the per-seed figures
        return {}
    gain = paired_difference(a, b)
    return {"kd_gain_std": gain["std"], "kd_gain_p": gain["p"], "kd_gain_mde": gain["mde"]}


def _gain_words(r: DatasetSummary) -> str:
    n = len(r.seeds.split())
    if n < 2 or not math.isfinite(r.kd_gain_p):
        return f"{r.dataset} {r.kd_gain:+.3f} (one seed: no uncertainty; set `seeds: [0, 1, 2]`)"
    verdict = "larger than its uncertainty" if r.kd_gain_p < 0.05 else "within noise"
    power = ""
    if math.isfinite(r.kd_gain_mde):
        power = (
            f"; with {n} seeds and this spread the test detects a gain of ±{r.kd_gain_mde:.3f} "
            "or more (80 % power)"
        )
        if r.kd_gain_p >= 0.05:
            power += ", so a smaller one may have been missed"
    return (
        f"{r.dataset} {r.kd_gain:+.3f} ± {r.kd_gain_std:.3f} over {n} seeds, paired t-test "
        f"p = {r.kd_gain_p:.2f}: {verdict}{power}"
    )


def _teacher_words(r: DatasetSummary) -> str:
    """Is the teacher above what the student learns alone (the CE-only baseline)?

    Above / below when the margin exceeds twice the baseline's seed std (the teacher is one
    seed too, so a margin of one std is what two seeds of the same model can differ by); else
    level.
    """
    margin = r.teacher_test_accuracy - r.baseline_test_accuracy
    several = len(r.seeds.split()) > 1
    spread = r.baseline_test_accuracy_std if several else 0.0
    bar = 2.0 * spread
    if several and spread > 0:
        head = f"{r.dataset} {margin:+.3f} ({margin / spread:+.1f} × the baseline's seed std {spread:.3f})"
    elif several:
        head = f"{r.dataset} {margin:+.3f} (the baseline's seeds agree exactly)"
    else:
        head = f"{r.dataset} {margin:+.3f} (one seed: no spread)"
    if r.student_train_images and r.teacher_train_images > r.student_train_images:
        head += (
            f" [the teacher saw {r.teacher_train_images} training images, the students "
            f"{r.student_train_images}: on the synthetic stand-ins the margin comes partly from "
            "the teacher's extra data]"
        )
    if margin > bar:
        return f"{head}: above it, the paper's setting"
    if margin < -bar:
        return (
            f"{head}: below it; the teacher knows less than the student learns alone, so "
            "this KD gain does not test the paper's claim (docs/results.md: How strong the teacher "
            "is; configs/paper.yaml)"
        )
    return (
        f"{head}: level with it (within twice the baseline's seed std); the teacher has "
        "little to teach, the KD gain says little"
    )


def _lr(lr: float) -> str:
    return f"{lr:.4f}" if math.isfinite(lr) else "champion's"


def _chosen_from(trials: int) -> str:
    # A summary written before the baseline had its own search: one retrain at the champion's lr.
    return f"{trials} CE trials" if trials else "no search"


AGREEMENT_METHODS = {"gradcam": "Grad-CAM", "shap": "SHAP", "feature_maps": "feature maps"}


def _method_titles(r: DatasetSummary) -> dict[str, str]:
    """The methods' names in a run's words: its CAM is its variant (a summary written before
    variants: Grad-CAM)."""
    from kdray.explain.cam_methods import CAM_TITLES

    method = r.transparency.get("cam_method") or "gradcam"
    return {**AGREEMENT_METHODS, "gradcam": CAM_TITLES.get(method, method)}


def _agreement_words(r: DatasetSummary) -> str:
    a = r.agreement
    get = lambda key: f"{a[key]:.2f}" if math.isfinite(a.get(key, math.nan)) else "n/a"  # noqa: E731
    parts = [
        f"{r.dataset}: labels {get('agreement.predictions')} ({get('agreement.predictions_test')})"
    ]
    for method, title in _method_titles(r).items():
        if f"agreement.rank_correlation.{method}" in a or f"agreement.top10_overlap.{method}" in a:
            parts.append(
                f"{title} {get(f'agreement.rank_correlation.{method}')} / "
                f"{get(f'agreement.top10_overlap.{method}')} "
                f"({get(f'agreement.rank_correlation_random.{method}')} / "
                f"{get(f'agreement.top10_overlap_random.{method}')})"
            )
    return "; ".join(parts)


PART_TITLES = {
    "test_blank_rate": "blank maps",
    "test_pointing_game": "pointing game",
    "test_energy_in_mask": "energy in mask",
    "test_deletion": "deletion AUC",
    "test_insertion": "insertion AUC",
}


def _transparency_words(r: DatasetSummary) -> str:
    """The champion's CAM and what the rule gained over the accuracy-only pick (validation)."""
    from kdray.explain.cam_methods import CAM_TITLES

    t = r.transparency
    pareto = ParetoSummary(**t.get("pareto", {}))
    method = CAM_TITLES.get(t.get("cam_method", ""), t.get("cam_method") or "n/a")
    return f"{r.dataset}: {method} at `{t.get('cam_layer') or 'n/a'}`; {pareto.sentence()}"


def _kd_transparency_words(r: DatasetSummary) -> str:
    """KD against CE-only test transparency, paired by seed, with its parts."""
    pairs = r.transparency.get("kd_vs_ce", {})
    main = pairs.get("test_transparency")
    if not main:
        return f"{r.dataset}: not measured"
    parts = "; ".join(
        f"{title} {pairs[k]['kd']:.3f} vs {pairs[k]['ce']:.3f}"
        for k, title in PART_TITLES.items()
        if k in pairs
    )
    head = f"{r.dataset} {main['kd']:.3f} vs {main['ce']:.3f}, {main['mean']:+.3f}"
    n = int(main["n"])
    if n < 2 or not math.isfinite(main["p"]):
        return f"{head} (one seed: no uncertainty); {parts}"
    verdict = "larger than its uncertainty" if main["p"] < 0.05 else "within noise"
    power = (
        f"; {n} seeds detect ±{main['mde']:.3f} or more (80 % power)"
        if math.isfinite(main["mde"])
        else ""
    )
    return (
        f"{head} ± {main['std']:.3f} over {n} seeds, paired t-test p = {main['p']:.2f}: "
        f"{verdict}{power}; {parts}"
    )


def _sanity_words(r: DatasetSummary) -> str:
    s = r.sanity
    parts = []
    for model in ("student", "teacher"):
        checks = [
            f"{title} {s[key]:.2f} {'passes' if s[key] < PASS_BELOW else 'fails'}"
            for method, title in _method_titles(r).items()
            if math.isfinite(s.get(key := f"{model}.randomisation.{method}", math.nan))
        ]
        if checks:
            parts.append(f"{model} " + ", ".join(checks))
    blank = [
        f"{model} {int(s[f'{model}.blank_test.gradcam'])}"
        for model in ("student", "teacher")
        if f"{model}.blank_test.gradcam" in s
    ]
    if blank and "localisation_test.images" in s:
        parts.append(
            f"blank {_method_titles(r)['gradcam']} {', '.join(blank)} of "
            f"{int(s['localisation_test.images'])} images"
        )
    return f"{r.dataset}: " + "; ".join(parts)


def format_summary(rows: list[DatasetSummary]) -> str:
    """A Markdown table per run: teacher vs champion vs CE-only baseline, per dataset."""
    lines = []
    if any(r.data_source for r in rows):
        lines += [
            "Data: " + "; ".join(f"{r.dataset}: {r.data_source}" for r in rows if r.data_source),
            "",
        ]
        if any(r.data_source.startswith("synthetic") for r in rows):
            lines += [
                "A synthetic stand-in is kdray's generated imitation of the public dataset "
                "(same classes and folder layout, lesion masks): its figures describe models of "
                "the stand-in, not of the public data.",
                "",
            ]
    lines += [
        "| dataset | model | test acc | test F1 | ECE | params | MFLOPs | alpha | T | widths | lr | chosen from |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def pm(mean: float, std: float, seeds: str) -> str:
        return f"{mean:.3f} ± {std:.3f}" if len(seeds.split()) > 1 else f"{mean:.3f}"

    for r in rows:
        lines += [
            f"| {r.dataset} | teacher DenseNet121 | {r.teacher_test_accuracy:.3f} | {r.teacher_test_f1:.3f} "
            f"| {r.teacher_test_ece:.3f} "
            f"| {r.teacher_params:,} | {r.teacher_flops / 1e6:.1f} | | | | | |",
            f"| {r.dataset} | KD student (champion) | {pm(r.student_test_accuracy, r.student_test_accuracy_std, r.seeds)} "
            f"| {r.student_test_f1:.3f} | {r.student_test_ece:.3f} | {r.student_params:,} | {r.student_flops / 1e6:.1f} | {r.alpha:.2f} "
            f"| {r.temperature:.2f} | {r.widths} | {r.lr:.4f} | {r.trials} KD trials |",
            f"| {r.dataset} | CE-only baseline | {pm(r.baseline_test_accuracy, r.baseline_test_accuracy_std, r.seeds)} "
            f"| {r.baseline_test_f1:.3f} | {r.baseline_test_ece:.3f} | {r.student_params:,} | {r.student_flops / 1e6:.1f} | 1.00 | | {r.widths} "
            f"| {_lr(r.baseline_lr)} | {_chosen_from(r.baseline_trials)} |",
        ]
    if any(r.student_train_images for r in rows):
        lines.append("")
        lines.append(
            "Training images, teacher / students (KD and CE-only alike): "
            + "; ".join(
                f"{r.dataset} {r.teacher_train_images} / {r.student_train_images}"
                for r in rows
                if r.student_train_images
            )
            + ". On a synthetic stand-in the students see "
            "`data.synthetic.student_fraction` of the training split: the teacher's extra images "
            "stand in for the ImageNet pretraining of the paper's teacher."
        )
    lines.append("")
    lines.append(
        "How each side was chosen: the KD champion is the best of its dataset's KD trials "
        "(alpha, T, widths and lr searched) by validation accuracy, the fewest FLOPs among "
        "those within `tune.selection_tolerance` of the best; the CE-only baseline has the "
        "same search budget over what it can tune (the same number of trials, sampler and "
        "scheduler over lr in the same range, alpha = 1, the champion's widths), and its "
        "best trial by validation accuracy is taken. With seeds, both are retrained per "
        "seed at their chosen settings."
    )
    lines.append("")
    lines.append(
        "KD gain (student − baseline test accuracy, paired by seed; ± is the std of the "
        "per-seed gains, p a two-sided paired t-test, 'larger than its uncertainty' at "
        "p < 0.05):"
    )
    lines += [f"- {_gain_words(r)}" for r in rows]
    lines.append("")
    lines.append(
        "Teacher margin (teacher − CE-only baseline test accuracy: does the teacher know "
        "more than the student learns alone?):"
    )
    lines += [f"- {_teacher_words(r)}" for r in rows]
    if any(r.agreement for r in rows):
        lines.append("")
        lines.append(
            "Teacher–student agreement on the report's images: labels (whole test split in "
            "brackets); per method, rank correlation / top-10 % IoU of the two maps of an "
            "image, with a random map's in brackets:"
        )
        lines += [f"- {_agreement_words(r)}" for r in rows if r.agreement]
    if any(r.sanity for r in rows):
        lines.append("")
        lines.append(
            "Sanity checks (Adebayo et al. 2018; each report's section has the curves): each "
            "method's absolute rank correlation with its maps once the whole model is randomised "
            f"(passes below {PASS_BELOW}: the map depends on what the model learned), and the blank "
            "class activation maps on the masked test split (scored as misses):"
        )
        lines += [f"- {_sanity_words(r)}" for r in rows if r.sanity]
    scored = [r for r in rows if r.transparency]
    if scored:
        lines.append("")
        lines.append(
            "Transparency (docs/transparency.md: a blank map scores 0; localisation on the lesion "
            "masks, or deletion/insertion faithfulness without masks): the champion's CAM and "
            "layer, chosen on the validation images, and the Pareto front of the KD trials "
            "(validation accuracy against transparency) with what the champion rule gains over "
            "the accuracy-only pick:"
        )
        lines += [f"- {_transparency_words(r)}" for r in scored]
        lines.append("")
        lines.append(
            "Does distillation make the student more transparent? Test transparency of the KD "
            "champion against the CE-only baseline (same architecture, same search budget), "
            "paired by seed, each seed's model at the layer its validation images choose; then "
            "the parts, KD vs CE:"
        )
        lines += [f"- {_kd_transparency_words(r)}" for r in scored]
    searched = [r for r in rows if r.search.get("trials")]
    if searched:
        lines.append("")
        lines.append(
            "What the KD searches found (best trial by val accuracy; the seed point is the "
            "config's own α, T and widths, tried first; importance: fANOVA share of the val "
            "accuracy's variance over the trials):"
        )
        lines += [f"- {r.dataset}: {SearchFindings(**r.search).sentence()}" for r in searched]
        lines.append(f"- {across_datasets([(r.dataset, r.search) for r in searched])}")
    lines.append(
        "ECE: expected calibration error on the test split (15 bins, lower is better); "
        "reliability diagrams in each dataset's report."
    )
    return "\n".join(lines)


def _write_summary(rows: list[DatasetSummary], ws: Workspace) -> None:
    ws.reports.mkdir(parents=True, exist_ok=True)
    (ws.reports / "summary.md").write_text(format_summary(rows) + "\n")

    def flat(r: DatasetSummary) -> dict:
        row = asdict(r)
        search = row.pop("search")
        columns = {
            "search_trials": search.get("trials", 0),
            "search_seed_rank": search.get("seed_rank", 0),
            **{f"search_best_{k}": v for k, v in search.get("best", {}).items()},
            **{f"search_importance_{k}": v for k, v in search.get("importances", {}).items()},
        }
        t = row.pop("transparency")
        columns.update(
            {
                "cam_method": t.get("cam_method", ""),
                "cam_layer": t.get("cam_layer", ""),
                "champion_rule": t.get("rule", ""),
                "pareto_transparency_gain": ParetoSummary(**t.get("pareto", {})).transparency_gain,
                "pareto_accuracy_cost": ParetoSummary(**t.get("pareto", {})).accuracy_cost,
                **{
                    f"kd_vs_ce_{key.removeprefix('test_')}_{stat}": value
                    for key, pair in t.get("kd_vs_ce", {}).items()
                    for stat, value in pair.items()
                },
            }
        )
        return {**row, **row.pop("agreement"), **row.pop("sanity"), **columns}  # a column each

    flats = [flat(r) for r in rows]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for f in flats for k in f)))
    writer.writeheader()
    writer.writerows(flats)
    (ws.reports / "summary.csv").write_text(buf.getvalue())


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
        path = _state_path(ws, dataset)
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


def _run_concurrently(
    cfg: ExperimentConfig, ws: Workspace, tracker: Tracker, resume: bool
) -> list[DatasetSummary]:
    """``ray.max_concurrent_datasets`` dataset pipelines at once, each in a driver thread (Ray
    Train and Tune calls are thread-safe in the driver; Ray's scheduler shares the cluster
    between their trials). A dataset that fails does not stop the others: every one runs to its
    end, then the first error is raised (the finished ones keep their state for ``--resume``)."""
    datasets = list(cfg.data.datasets)
    workers = min(cfg.ray.max_concurrent_datasets, len(datasets))
    log.info("datasets %s: %d pipelines at once", ", ".join(datasets), workers)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kdray-dataset")
    futures = [pool.submit(run_dataset, cfg, dataset, ws, tracker, resume) for dataset in datasets]
    try:
        wait(futures)
    except BaseException:  # Ctrl-C: do not wait for the others; Ray's shutdown stops them
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    failed = [(d, f.exception()) for d, f in zip(datasets, futures, strict=True) if f.exception()]
    for dataset, exc in failed:
        log.error("%s: failed: %s: %s", dataset, type(exc).__name__, exc)
    if failed:
        raise failed[0][1]
    return [f.result() for f in futures]


def run_pipeline(
    cfg: ExperimentConfig, ws: Workspace, resume: bool = False, checked: bool = False
) -> list[DatasetSummary]:
    """Run every configured dataset; write ``reports/summary.{md,csv}`` in the workspace.

    Args:
        resume: continue the last run of the same config after the driver was stopped
            (Ctrl-C, lost node, kill): finished datasets are not redone, an unfinished sweep
            resumes from Tune's experiment state and its trials from their checkpoints.
    """
    # Every dataset's files are checked (and split) before MLflow or Ray start: an unreadable
    # file stops the run here, listed with the others, with nothing half started.
    if not checked:
        preflight(cfg.data, ws)
    tracker = Tracker.open(cfg.mlflow, ws)
    log.info(
        "workspace %s; MLflow %s (experiment %s)",
        ws.root,
        tracker.tracking_uri,
        cfg.mlflow.experiment,
    )
    with ray_session(cfg.ray, ws):
        if cfg.ray.max_concurrent_datasets > 1 and len(cfg.data.datasets) > 1:
            rows = _run_concurrently(cfg, ws, tracker, resume)
        else:
            rows = []
            for i, dataset in enumerate(cfg.data.datasets, 1):
                log.info("dataset %d/%d: %s", i, len(cfg.data.datasets), dataset)
                rows.append(run_dataset(cfg, dataset, ws, tracker, resume))
    _write_summary(rows, ws)
    for row in rows:  # every dataset's parent run carries the whole run's table
        tracker.client.log_artifact(row.parent_run_id, str(ws.reports / "summary.md"))
        tracker.client.log_artifact(row.parent_run_id, str(ws.reports / "summary.csv"))
    return rows
