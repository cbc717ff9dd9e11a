from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from kdray.metrics import classification_metrics


def test_metrics_match_scikit_learn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 200)
    p = np.where(rng.random(200) < 0.7, y, rng.integers(0, 4, 200))
    p[p == 3] = 2  # class 3 never predicted: precision 0 by convention
    m = classification_metrics(y, p, ["a", "b", "c", "d"])
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, p))
    for ours, avg in (("precision_macro", skm.precision_score), ("recall_macro", skm.recall_score),
                      ("f1_macro", skm.f1_score)):
        assert m[ours] == pytest.approx(avg(y, p, average="macro", zero_division=0))
    assert m["confusion"] == skm.confusion_matrix(y, p, labels=[0, 1, 2, 3]).tolist()
    assert m["per_class"]["d"]["precision"] == 0.0
    assert sum(c["support"] for c in m["per_class"].values()) == 200


def test_perfect_and_invalid():
    m = classification_metrics([0, 1, 2], [0, 1, 2], ["x", "y", "z"])
    assert m["accuracy"] == 1.0 and m["f1_macro"] == 1.0
    with pytest.raises(ValueError):
        classification_metrics([0, 1], [0], ["x", "y"])
    with pytest.raises(ValueError):
        classification_metrics([], [], ["x"])
