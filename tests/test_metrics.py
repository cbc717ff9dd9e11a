from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from kdray.metrics import calibration, classification_metrics, paired_difference


def test_metrics_match_scikit_learn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 200)
    p = np.where(rng.random(200) < 0.7, y, rng.integers(0, 4, 200))
    p[p == 3] = 2  # class 3 never predicted: precision 0 by convention
    m = classification_metrics(y, p, ["a", "b", "c", "d"])
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, p))
    for ours, avg in (
        ("precision_macro", skm.precision_score),
        ("recall_macro", skm.recall_score),
        ("f1_macro", skm.f1_score),
    ):
        assert m[ours] == pytest.approx(avg(y, p, average="macro", zero_division=0))
    assert m["confusion"] == skm.confusion_matrix(y, p, labels=[0, 1, 2, 3]).tolist()
    assert m["per_class"]["d"]["precision"] == 0.0
    assert sum(c["support"] for c in m["per_class"].values()) == 200


def test_a_class_absent_from_the_split_does_not_count_in_macro_scores(caplog):
    y = np.array([0, 0, 1, 1, 2, 2])
    p = np.array([0, 1, 1, 1, 2, 0])
    with caplog.at_level("WARNING", logger="kdray"):
        m = classification_metrics(y, p, ["a", "b", "c", "d"])  # no "d" at all
    for ours, avg in (
        ("precision_macro", skm.precision_score),
        ("recall_macro", skm.recall_score),
        ("f1_macro", skm.f1_score),
    ):
        assert m[ours] == pytest.approx(avg(y, p, average="macro", zero_division=0))
    assert m["per_class"]["d"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert "['d']" in caplog.text


def test_perfect_and_invalid():
    m = classification_metrics([0, 1, 2], [0, 1, 2], ["x", "y", "z"])
    assert m["accuracy"] == 1.0 and m["f1_macro"] == 1.0
    with pytest.raises(ValueError):
        classification_metrics([0, 1], [0], ["x", "y"])
    with pytest.raises(ValueError):
        classification_metrics([], [], ["x"])


def _independent_ece(p: np.ndarray, y: np.ndarray, bins: int) -> float:
    """ECE written out sample by sample, to check the vectorised one."""
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        members = [
            i for i in range(len(y)) if lo < p[i].max() <= hi or (b == 0 and p[i].max() == 0)
        ]
        if members:
            acc = np.mean([p[i].argmax() == y[i] for i in members])
            conf = np.mean([p[i].max() for i in members])
            total += len(members) / len(y) * abs(acc - conf)
    return total


def test_calibration_error_matches_its_definition():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(300, 4)) * 3
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    y = rng.integers(0, 4, 300)
    c = calibration(p, y, bins=10)
    assert c["ece"] == pytest.approx(_independent_ece(p, y, 10), abs=1e-9)
    assert sum(c["bin_count"]) == 300
    assert c["ece"] > 0.3  # random labels, confident model: badly calibrated


def test_a_calibrated_model_has_no_error_and_overconfidence_shows():
    # 80 % confident and right 80 % of the time: perfectly calibrated.
    p = np.tile([0.8, 0.2], (100, 1))
    y = np.array([0] * 80 + [1] * 20)
    assert calibration(p, y)["ece"] == pytest.approx(0.0, abs=1e-12)
    # 99 % confident, right 80 % of the time: the gap is the error.
    p = np.tile([0.99, 0.01], (100, 1))
    assert calibration(p, y)["ece"] == pytest.approx(0.19)
    with pytest.raises(ValueError):
        calibration(p, y[:50])


def test_paired_difference_is_scipys_paired_t_test():
    from scipy import stats

    student, baseline = [0.91, 0.93, 0.90, 0.94], [0.90, 0.90, 0.89, 0.90]
    d = paired_difference(student, baseline)
    assert d["n"] == 4 and d["mean"] == pytest.approx(0.0225)
    assert d["std"] == pytest.approx(np.std(np.subtract(student, baseline), ddof=1))
    assert d["p"] == pytest.approx(stats.ttest_rel(student, baseline).pvalue)
    one = paired_difference([0.9], [0.8])
    assert one["mean"] == pytest.approx(0.1) and np.isnan(one["p"]) and np.isnan(one["std"])
