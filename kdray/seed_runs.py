"""Per-seed runs of a chosen student: retrained (or its trial's own), scored on test, summarised.

With ``seeds: [...]`` :mod:`kdray.champion` retrains the champion and the CE-only baseline per
seed at their chosen hyper-parameters (:func:`retrain_and_score`, a Ray task) or scores a
finished trial's checkpoint as the run of its seed (:func:`score_checkpoint`). Each seed gives one
row: validation and test accuracy, macro F1, ECE, test transparency and its parts (each seed's
model at the layer its validation images choose, :func:`test_transparency`) and its test-split
class probabilities; :func:`log_seed_rows` logs the rows and their mean ± std.
"""

from __future__ import annotations

import logging
import statistics
from typing import Any

import numpy as np
import ray
import torch

from kdray.data.prepare import Split
from kdray.devices import use_assigned_threads
from kdray.engine import evaluate, softmax
from kdray.explain.scoring import ScoringSet, score_model
from kdray.models import build_model, load_model
from kdray.tracking import Tracker
from kdray.trial import StudentJob, TrialOutcome, train_student

__all__ = [
    "PROBABILITIES",
    "SEED_KEYS",
    "TRANSPARENCY_PARTS",
    "log_seed_rows",
    "retrain_and_score",
    "score_checkpoint",
    "seed_rows",
    "seed_transparency",
    "test_transparency",
]

log = logging.getLogger("kdray")

PROBABILITIES = "test_probabilities"  # a retrain's test-split class probabilities, not a metric


def retrain_and_score(
    job: StudentJob,
    alpha: float,
    temperature: float,
    widths: list[int],
    lr: float,
    seed: int,
    test: Split,
) -> dict[str, float]:
    """Train one student from scratch (best epoch by validation) and score it on ``test``.

    Runs as a Ray task: torch threads from the task's CPUs, the GPU Ray assigned if any.
    """
    use_assigned_threads(default=torch.get_num_threads())
    best = build_model(job.student_spec(widths))
    final = train_student(job, alpha, temperature, widths, lr=lr, seed=seed, best_model_out=best)
    return _seed_row(best, test, job, final["best_val_accuracy"], seed)


TRANSPARENCY_PARTS = ("blank_rate", "pointing_game", "energy_in_mask", "deletion", "insertion")


def test_transparency(
    model: torch.nn.Module, test: Split, job: StudentJob, seed: int
) -> dict[str, float]:
    """A model's transparency on the whole test split, at the layer its validation images choose
    (never chosen on test): ``test_transparency`` and ``test_<part>`` (NaN where a part does not
    apply), ``layer``; empty without a scoring set."""
    if job.scoring is None:
        return {}
    cfg = job.cfg
    method = cfg.explain.cam_method
    chosen = score_model(model, job.scoring, cfg.transparency, method, seed=seed)
    on_test = ScoringSet.from_split(test, len(test), seed, "test")
    scored = score_model(
        model, on_test, cfg.transparency, method, layers=[chosen.layer], sanity=False, seed=seed
    ).chosen
    out = {"test_transparency": scored.score}
    out.update({f"test_{part}": getattr(scored, part) for part in TRANSPARENCY_PARTS})
    return out


def _seed_row(
    model: torch.nn.Module, test: Split, job: StudentJob, val_accuracy: float, seed: int
) -> dict[str, Any]:
    """One seed's model scored on ``test``: the row the seed statistics are made of."""
    metrics, logits = evaluate(model, test, job.class_names)
    return {
        "val_accuracy": val_accuracy,
        "test_accuracy": metrics["accuracy"],
        "test_f1_macro": metrics["f1_macro"],
        "test_ece": metrics["ece"],
        **test_transparency(model, test, job, seed),
        "seed": seed,
        PROBABILITIES: softmax(logits).astype(np.float32),
    }


def score_checkpoint(
    outcome: TrialOutcome, test: Split, job: StudentJob, seed: int
) -> dict[str, Any]:
    """A finished trial's best-epoch model scored on ``test``, as the run of ``seed``."""
    with outcome.checkpoint.as_directory() as d:
        model, _ = load_model(d)
    return _seed_row(model, test, job, outcome.best_val_accuracy, seed)


def seed_rows(
    outcome: TrialOutcome,
    seeds: list[int],
    refs: dict[int, Any],
    test: Split,
    job: StudentJob,
    side: str,
) -> list[dict[str, Any]]:
    """One scored row per seed, in the order of ``seeds``: retrained (``refs``) or the trial's own."""
    rows = []
    for i, seed in enumerate(seeds, 1):
        if seed in refs:
            rows.append(ray.get(refs[seed]))
        else:
            rows.append(score_checkpoint(outcome, test, job, seed))
        log.info(
            "%s: %s seed %d (%d/%d, %s): test acc %.3f",
            job.dataset,
            side,
            seed,
            i,
            len(seeds),
            "retrained" if seed in refs else "its trial's run",
            rows[-1]["test_accuracy"],
        )
    return rows


SEED_KEYS = (
    "test_accuracy",
    "test_f1_macro",
    "test_ece",
    "test_transparency",
    *(f"test_{part}" for part in TRANSPARENCY_PARTS),
)


def _mean_std(rows: list[dict[str, float]]) -> dict[str, float]:
    out = {}
    for key in SEED_KEYS:
        values = [r[key] for r in rows if key in r and np.isfinite(r[key])]
        if len(values) < len(rows) or not values:
            continue  # a part that does not apply (localisation without masks)
        out[f"{key}_mean"] = statistics.fmean(values)
        out[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return out


def seed_transparency(rows: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Per seed, in order: ``test_transparency`` and the parts every row has (finite)."""
    keys = ("test_transparency", *(f"test_{part}" for part in TRANSPARENCY_PARTS))
    return {
        k: [float(r[k]) for r in rows]
        for k in keys
        if rows and all(k in r and np.isfinite(r[k]) for r in rows)
    }


def log_seed_rows(tracker: Tracker, run_id: str, rows: list[dict[str, float]]) -> dict[str, float]:
    for step, row in enumerate(rows):
        tracker.log_metrics(
            run_id, {f"seed_{k}": v for k, v in row.items() if k != PROBABILITIES}, step=step
        )
    stats = _mean_std(rows)
    tracker.log_metrics(run_id, stats)
    return stats
