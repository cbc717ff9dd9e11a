"""After the sweep: pick the champion, score it, register it, and measure the KD gain.

Selection rule (``tune.champion``): ``transparent`` (the default) takes, among the trials within
``tune.selection_tolerance`` of the best validation accuracy, the one with the best transparency
score (:mod:`kdray.explain.scoring`), then the fewest FLOPs; ``accuracy`` takes the fewest FLOPs
within that band (a small student is the point of distillation). Both picks are recorded: the
report and the summary say what the champion gains in transparency over the accuracy-only pick
and what it gives up in accuracy. The champion gets its own MLflow run (role ``champion``) and is
registered as ``kdray-<dataset>@champion``, with its CAM variant and layer (``cam.json``).

The KD ablation, role ``baseline``, is the champion's architecture trained with cross-entropy
only (alpha = 1), tuned as fairly as the champion: its own Tune search with the same budget
(``tune.num_samples`` trials, sampler and scheduler) over what it can tune, the learning rate,
over the same range; the trial with the best validation accuracy is the baseline (runs with
role ``baseline-trial``). With ``seeds: [...]`` champion and baseline are each retrained per
seed at their chosen hyper-parameters and reported as mean ± std, test accuracy and test
transparency alike (each seed's model at the layer its validation images choose): the paired
comparisons of accuracy and of transparency. The per-seed retraining, scoring and statistics are
:mod:`kdray.seed_runs`.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray

from kdray.data.prepare import Split
from kdray.data.record import save_record
from kdray.evaluation import SCALAR_METRICS, evaluate_and_log
from kdray.explain.background import save_background, select_background
from kdray.explain.scoring import cam_choice
from kdray.models import load_model, save_model
from kdray.registry import log_model_folder, register_model, registered_name
from kdray.seed_runs import (
    PROBABILITIES,
    log_seed_rows,
    retrain_and_score,
    seed_rows,
    seed_transparency,
    test_transparency,
)
from kdray.sweep import baseline_search_space, run_sweep
from kdray.tracking import Tracker
from kdray.trial import StudentJob, TrialOutcome
from kdray.workspace import Workspace

__all__ = ["ChampionResult", "baseline_probabilities_path", "crown_champion", "select_champion"]

log = logging.getLogger("kdray")


@dataclass
class ChampionResult:
    run_id: str
    trial_run_id: str
    version: str
    alpha: float
    temperature: float
    widths: list[int]
    lr: float
    params: int
    flops: int
    val_accuracy: float
    test_metrics: dict[str, Any]
    baseline_run_id: str
    baseline_test: dict[
        str, float
    ]  # test_accuracy / test_f1_macro / test_ece: mean and std over seeds
    champion_seeds: dict[str, float] = field(default_factory=dict)  # same, champion retrains
    seeds: list[int] = field(default_factory=list)
    # Test accuracy per seed, in the order of ``seeds``: the KD gain is paired by seed. With
    # one seed, the champion's is its own test accuracy.
    champion_seed_accuracy: list[float] = field(default_factory=list)
    baseline_seed_accuracy: list[float] = field(default_factory=list)
    # How the baseline was chosen: its lr and the number of its search's finished trials (NaN
    # and 0 in the state of a run made before the baseline had its own search).
    baseline_lr: float = float("nan")
    baseline_trials: int = 0
    # Transparency: the rule that chose, the champion's CAM variant and layer, its validation
    # score; the accuracy-only pick's trial run and scores (the comparison the report makes);
    # per seed, the test transparency and its parts of champion and baseline (``test_*`` keys).
    rule: str = "accuracy"
    cam_method: str = ""
    cam_layer: str = ""
    transparency: float = float("nan")
    accuracy_pick_run_id: str = ""
    accuracy_pick: dict[str, float] = field(default_factory=dict)
    champion_seed_transparency: dict[str, list[float]] = field(default_factory=dict)
    baseline_seed_transparency: dict[str, list[float]] = field(default_factory=dict)


def baseline_probabilities_path(ws: Workspace, dataset: str) -> Path:
    """The CE baseline's (first seed's) test-split probabilities, written by the champion stage."""
    return ws.champions / f"{dataset}-baseline-test-probabilities.npy"


def select_champion(
    outcomes: list[TrialOutcome], tolerance: float, rule: str = "accuracy"
) -> TrialOutcome:
    """The trial the rule picks among those within ``tolerance`` of the best validation accuracy.

    ``accuracy``: the fewest FLOPs (then higher accuracy). ``transparent``: the best transparency
    score (an unscored trial ranks last), then the fewest FLOPs, then higher accuracy.

    Raises:
        RuntimeError: no outcome.
        ValueError: an unknown rule.
    """
    if not outcomes:
        raise RuntimeError("no finished trial to choose from")
    if rule not in ("accuracy", "transparent"):
        raise ValueError(f"unknown champion rule {rule!r}; expected 'accuracy' or 'transparent'")
    best = max(o.best_val_accuracy for o in outcomes)
    eligible = [o for o in outcomes if o.best_val_accuracy >= best - tolerance - 1e-12]
    if rule == "transparent":
        return min(
            eligible,
            key=lambda o: (
                -(o.transparency if np.isfinite(o.transparency) else -1.0),
                o.flops,
                -o.best_val_accuracy,
            ),
        )
    return min(eligible, key=lambda o: (o.flops, -o.best_val_accuracy))


def _is_seed_run(outcome: TrialOutcome, seed: int, cfg: Any) -> bool:
    """Is this finished trial exactly what a retrain with ``seed`` would do? (Trials train with
    the config's seed; one the scheduler stopped early did not run every epoch.)"""
    return seed == cfg.seed and outcome.epochs_run >= cfg.student.epochs


def crown_champion(
    job: StudentJob,
    outcomes: list[TrialOutcome],
    test: Split,
    ws: Workspace,
    tracker: Tracker,
    parent_run_id: str,
    baseline_sweep: str,
    restore: bool = False,
) -> ChampionResult:
    """Select, save, score, register the champion; search, train and log the CE-only baseline.

    Args:
        baseline_sweep: the Tune experiment name of the baseline's search.
        restore: continue that search if an earlier, killed run started it.

    Safe to run again after the driver was killed half-way: the champion and baseline runs
    under ``parent_run_id`` are resumed, the baseline's search is restored, and the champion
    run registers one version only.
    """
    cfg, dataset = job.cfg, job.dataset
    chosen = select_champion(outcomes, cfg.tune.selection_tolerance, cfg.tune.champion)
    by_accuracy = select_champion(outcomes, cfg.tune.selection_tolerance, "accuracy")
    alpha, temperature = float(chosen.config["alpha"]), float(chosen.config["temperature"])
    seeds = list(cfg.seeds) or [cfg.seed]

    # Multi-seed champion retrains run as Ray tasks while the champion is scored and the
    # baseline searched. The selected trial itself is the run of seed ``seed`` when it trained
    # every epoch: that seed is scored from its checkpoint instead of being trained again.
    remote = ray.remote(num_cpus=cfg.tune.cpus_per_trial, num_gpus=cfg.tune.gpus_per_trial)(
        retrain_and_score
    )
    job_ref = ray.put(job)
    champion_refs = (
        {
            s: remote.remote(job_ref, alpha, temperature, chosen.widths, chosen.lr, s, test)
            for s in seeds
            if not _is_seed_run(chosen, s, cfg)
        }
        if cfg.seeds
        else {}
    )

    target = ws.champions / dataset
    with chosen.checkpoint.as_directory() as d:
        model, spec = load_model(d)
    shutil.rmtree(target, ignore_errors=True)
    save_model(model, spec, target)
    if job.record is not None:  # what it saw travels with the registered version
        save_record(target, job.record)
    # Its CAM variant and layer, measured on the validation images (cam.json): what the report,
    # the audit, the server and the ONNX export read its maps at.
    cam = (
        cam_choice(cfg, model, target, job.scoring, agreement=alpha < 1.0)
        if job.scoring is not None
        else None
    )
    # The SHAP background travels with the registered version: a server needs only the registry.
    save_background(
        target,
        select_background(
            job.train.images, job.train.labels, cfg.explain.shap_background, cfg.seed
        ),
    )

    run_id, _ = tracker.resume_or_start_run(
        f"champion-{dataset}",
        dataset,
        "champion",
        parent_run_id,
        tags={"kdray.source_trial_run": chosen.run_id},
    )
    tracker.log_params(
        run_id,
        {
            "alpha": alpha,
            "temperature": temperature,
            "widths": "-".join(map(str, chosen.widths)),
            "depth": len(chosen.widths),
            "lr": chosen.lr,
        },
    )
    # A tag, not a param: a resume that finishes a trial that had failed may count one more.
    tracker.set_tags(
        run_id,
        {
            "kdray.selected_from": len(outcomes),
            "kdray.champion_rule": cfg.tune.champion,
            "kdray.accuracy_pick_run": by_accuracy.run_id,
            **({"kdray.cam.method": cam.method, "kdray.cam.layer": cam.layer} if cam else {}),
        },
    )
    tracker.log_config(run_id, cfg.to_dict())
    tracker.log_inputs(run_id, job.inputs("train", "val", "test"))
    tracker.log_metrics(
        run_id,
        {
            "val_accuracy": chosen.best_val_accuracy,
            "params": chosen.params,
            "flops": chosen.flops,
            **(cam.metrics() if cam else {}),
        },
    )
    test_metrics = evaluate_and_log(
        model, test, spec.class_names, tracker, run_id, title=f"student · {dataset}"
    )
    champion_test = test_transparency(model, test, job, cfg.seed)
    tracker.log_metrics(run_id, {k: v for k, v in champion_test.items() if np.isfinite(v)})
    log_model_folder(tracker.client, run_id, target)  # an MLflow pyfunc holding kdray's files
    version = register_model(
        tracker.client,
        registered_name(dataset),
        run_id,
        "champion",
        tags={"kdray.dataset": dataset, **(job.record.tags() if job.record else {})},
    )
    tracker.set_tags(run_id, {"kdray.registered_model": f"{registered_name(dataset)}/{version}"})
    log.info(
        "%s: champion alpha %.2f T %.1f widths %s lr %.4f (val acc %.3f, test acc %.3f, "
        "transparency %.3f at %s), registered %s v%s",
        dataset,
        alpha,
        temperature,
        "-".join(map(str, chosen.widths)),
        chosen.lr,
        chosen.best_val_accuracy,
        test_metrics["accuracy"],
        cam.score if cam else float("nan"),
        cam.layer if cam else "n/a",
        registered_name(dataset),
        version,
    )
    if by_accuracy is not chosen:
        log.info(
            "%s: the accuracy-only rule would have taken widths %s (val acc %.3f, transparency "
            "%.3f); the champion's transparency %.3f",
            dataset,
            "-".join(map(str, by_accuracy.widths)),
            by_accuracy.best_val_accuracy,
            by_accuracy.transparency,
            chosen.transparency,
        )

    log.info(
        "%s: CE-only baseline: searching lr over %d trials (alpha 1, widths %s)",
        dataset,
        cfg.tune.num_samples,
        "-".join(map(str, chosen.widths)),
    )
    baseline_outcomes = run_sweep(
        job,
        ws,
        baseline_sweep,
        restore=restore,
        role="baseline-trial",
        search=baseline_search_space(cfg, chosen.widths, temperature, chosen.lr),
    )
    base = select_champion(baseline_outcomes, 0.0)  # one architecture: best validation accuracy
    baseline_refs = (
        {
            s: remote.remote(job_ref, 1.0, temperature, base.widths, base.lr, s, test)
            for s in seeds
            if not _is_seed_run(base, s, cfg)
        }
        if cfg.seeds
        else {}
    )

    champion_rows = (
        seed_rows(chosen, seeds, champion_refs, test, job, "KD champion") if cfg.seeds else []
    )
    champion_seeds = log_seed_rows(tracker, run_id, champion_rows) if champion_rows else {}
    tracker.end_run(run_id)

    baseline_rows = seed_rows(base, seeds, baseline_refs, test, job, "CE baseline")
    baseline_run, _ = tracker.resume_or_start_run(
        f"baseline-{dataset}",
        dataset,
        "baseline",
        parent_run_id,
        tags={"kdray.champion_run": run_id, "kdray.source_trial_run": base.run_id},
    )
    tracker.log_params(
        baseline_run,
        {
            "alpha": 1.0,
            "temperature": temperature,
            "widths": "-".join(map(str, base.widths)),
            "depth": len(base.widths),
            "lr": base.lr,
            "seeds": seeds,
        },
    )
    tracker.set_tags(baseline_run, {"kdray.selected_from": len(baseline_outcomes)})
    tracker.log_config(baseline_run, cfg.to_dict())
    tracker.log_inputs(baseline_run, job.inputs("train", "val", "test"))
    stats = log_seed_rows(tracker, baseline_run, baseline_rows)
    tracker.log_metrics(
        baseline_run,
        {
            "val_accuracy": base.best_val_accuracy,
            "test_accuracy": stats["test_accuracy_mean"],
            "test_f1_macro": stats["test_f1_macro_mean"],
            "test_ece": stats["test_ece_mean"],
            "params": base.params,
            "flops": base.flops,
        },
    )
    log.info(
        "%s: CE-only baseline lr %.4f (val acc %.3f, best of %d), test acc %.3f over seeds %s",
        dataset,
        base.lr,
        base.best_val_accuracy,
        len(baseline_outcomes),
        stats["test_accuracy_mean"],
        seeds,
    )
    # The report's reliability diagram shows the baseline beside teacher and champion.
    np.save(baseline_probabilities_path(ws, dataset), baseline_rows[0][PROBABILITIES])
    tracker.end_run(baseline_run)
    return ChampionResult(
        run_id=run_id,
        trial_run_id=chosen.run_id,
        version=version,
        alpha=alpha,
        temperature=temperature,
        widths=chosen.widths,
        lr=chosen.lr,
        params=chosen.params,
        flops=chosen.flops,
        val_accuracy=chosen.best_val_accuracy,
        test_metrics={k: test_metrics[k] for k in SCALAR_METRICS},
        baseline_run_id=baseline_run,
        baseline_test=stats,
        champion_seeds=champion_seeds,
        seeds=seeds,
        champion_seed_accuracy=(
            [r["test_accuracy"] for r in champion_rows]
            if champion_rows
            else [test_metrics["accuracy"]]
        ),
        baseline_seed_accuracy=[r["test_accuracy"] for r in baseline_rows],
        baseline_lr=base.lr,
        baseline_trials=len(baseline_outcomes),
        rule=cfg.tune.champion,
        cam_method=cam.method if cam else "",
        cam_layer=cam.layer if cam else "",
        transparency=chosen.transparency,
        accuracy_pick_run_id=by_accuracy.run_id,
        accuracy_pick={
            "val_accuracy": by_accuracy.best_val_accuracy,
            "transparency": by_accuracy.transparency,
            "flops": float(by_accuracy.flops),
            "params": float(by_accuracy.params),
        },
        champion_seed_transparency=(
            seed_transparency(champion_rows)
            if champion_rows
            else seed_transparency([champion_test])
        ),
        baseline_seed_transparency=seed_transparency(baseline_rows),
    )
