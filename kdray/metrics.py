"""Classification metrics on any split: one place, used by teacher, trials and champions."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["calibration", "classification_metrics", "confusion_matrix", "paired_difference"]

log = logging.getLogger("kdray")


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows: true class; columns: predicted class."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return matrix


def classification_metrics(
    y_true: Sequence[int] | np.ndarray,
    y_pred: Sequence[int] | np.ndarray,
    class_names: Sequence[str],
) -> dict[str, Any]:
    """Accuracy, macro precision / recall / F1, a per-class report and the confusion matrix.

    Macro averages run over the classes that occur in ``y_true`` or ``y_pred`` (scikit-learn's
    default): a class absent from a small split altogether would otherwise count as a 0 and
    drag every macro score down; it is logged as a warning and keeps its 0 row in
    ``per_class``. A class that is present but never predicted gets precision 0, as in
    scikit-learn's ``zero_division=0``.

    Returns:
        ``{"accuracy", "precision_macro", "recall_macro", "f1_macro", "per_class", "confusion"}``;
        ``per_class`` maps class name to precision, recall, f1 and support.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true {y_true.shape} and y_pred {y_pred.shape} differ in shape")
    if y_true.size == 0:
        raise ValueError("no samples to score")
    k = len(class_names)
    cm = confusion_matrix(y_true, y_pred, k)
    tp = np.diag(cm).astype(float)
    predicted = cm.sum(axis=0).astype(float)
    support = cm.sum(axis=1).astype(float)
    precision = np.divide(tp, predicted, out=np.zeros(k), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros(k), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros(k), where=denom > 0)
    present = (support > 0) | (predicted > 0)
    if not present.all():
        log.warning(
            "classes %s occur neither in the labels nor in the predictions of this split: "
            "macro scores average over the other %d",
            [class_names[i] for i in np.flatnonzero(~present)],
            int(present.sum()),
        )
    per_class = {
        name: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, name in enumerate(class_names)
    }
    return {
        "accuracy": float(tp.sum() / y_true.size),
        "precision_macro": float(precision[present].mean()),
        "recall_macro": float(recall[present].mean()),
        "f1_macro": float(f1[present].mean()),
        "per_class": per_class,
        "confusion": cm.tolist(),
    }


def calibration(
    probabilities: np.ndarray, labels: Sequence[int] | np.ndarray, bins: int = 15
) -> dict[str, Any]:
    """Expected calibration error of the top label, over ``bins`` equal-width confidence bins.

    ECE = sum over bins of (share of samples in the bin) x |accuracy - mean confidence| (Guo et
    al. 2017); 0 is perfectly calibrated. Also returns each bin's mean confidence, accuracy and
    count (NaN for empty bins), for a reliability diagram.

    Args:
        probabilities: (N, classes), rows summing to 1.
        labels: (N,) true classes.
    """
    p = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if p.ndim != 2 or p.shape[0] != y.shape[0] or y.size == 0:
        raise ValueError(f"probabilities {p.shape} and labels {y.shape} do not match")
    confidence = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    index = np.minimum((confidence * bins).astype(np.int64), bins - 1)
    count = np.bincount(index, minlength=bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(index, confidence, bins) / count
        accuracy = np.bincount(index, correct, bins) / count
    gaps = np.where(count > 0, np.abs(accuracy - mean_confidence), 0.0)
    return {
        "ece": float((count / y.size * gaps).sum()),
        "bin_confidence": mean_confidence.tolist(),
        "bin_accuracy": accuracy.tolist(),
        "bin_count": count.astype(np.int64).tolist(),
    }


def paired_difference(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Mean and spread of ``a - b`` over paired runs (the same seeds), with a paired t-test.

    Returns:
        ``mean``, ``std`` (sample std of the differences), ``n``, ``p``: the two-sided p-value
        of a paired t-test (mean difference 0), and ``mde``: the smallest mean difference that
        test detects with 80 % power at the 5 % level given ``std`` and ``n``
        (:func:`minimum_detectable_difference`); NaN with fewer than two pairs.
    """
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if d.ndim != 1 or d.size == 0:
        raise ValueError(f"need two equal, non-empty series (got {np.shape(a)} and {np.shape(b)})")
    n, mean = int(d.size), float(d.mean())
    if n < 2:
        return {"mean": mean, "std": float("nan"), "n": n, "p": float("nan"), "mde": float("nan")}
    std = float(d.std(ddof=1))
    if std == 0.0:
        p = 1.0 if mean == 0.0 else 0.0
    else:
        from scipy import stats

        p = float(2.0 * stats.t.sf(abs(mean / (std / np.sqrt(n))), n - 1))
    return {"mean": mean, "std": std, "n": n, "p": p, "mde": minimum_detectable_difference(std, n)}


def minimum_detectable_difference(
    std: float, n: int, alpha: float = 0.05, power: float = 0.8
) -> float:
    """The smallest true mean difference a two-sided paired t-test over ``n`` pairs detects
    with probability ``power`` at level ``alpha``, when the differences' std is ``std``.

    Exact: the t statistic of a true difference d is noncentral t with n - 1 degrees of freedom
    and noncentrality d * sqrt(n) / std; d is found where the test rejects with ``power``.
    0 when ``std`` is 0; NaN with fewer than two pairs or a non-finite ``std``.
    """
    if n < 2 or not np.isfinite(std):
        return float("nan")
    if std == 0.0:
        return 0.0
    from scipy import optimize, stats

    df = n - 1
    crit = stats.t.ppf(1.0 - alpha / 2.0, df)

    def shortfall(nc: float) -> float:
        # scipy's nct returns NaN where a tail underflows: that tail is then 0
        upper_tail = float(np.nan_to_num(stats.nct.sf(crit, df, nc), nan=1.0))
        lower_tail = float(np.nan_to_num(stats.nct.cdf(-crit, df, nc), nan=0.0))
        return upper_tail + lower_tail - power

    # the noncentrality lies below twice the normal approximation's (scipy's nct is NaN far out)
    upper = 2.0 * (crit + stats.norm.ppf(power)) + 5.0
    nc = optimize.brentq(shortfall, 0.0, upper)
    return float(nc * std / np.sqrt(n))
