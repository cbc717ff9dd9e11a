"""Teacher-student agreement scores against hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from kdray.explain.agreement import prediction_agreement, rank_correlation, top_overlap
from kdray.explain.faithfulness import random_maps


def test_prediction_agreement_is_the_share_of_equal_labels():
    assert prediction_agreement([0, 1, 2, 3], [0, 1, 0, 3]) == 0.75
    with pytest.raises(ValueError):
        prediction_agreement([0, 1], [0])


def test_rank_correlation_by_hand():
    a = np.array([[[1.0, 2.0], [3.0, 4.0]]])
    b = np.array([[[1.0, 3.0], [2.0, 4.0]]])  # ranks 1 3 2 4: d^2 sums to 2
    assert rank_correlation(a, b)[0] == pytest.approx(1 - 6 * 2 / (4 * (16 - 1)))  # 0.8
    assert rank_correlation(a, a**3)[0] == pytest.approx(1.0)  # ranks, not values
    assert rank_correlation(a, -a)[0] == pytest.approx(-1.0)
    ties = np.array([[[0.0, 0.0], [1.0, 2.0]]])
    assert rank_correlation(ties, a)[0] == pytest.approx(
        stats.spearmanr(ties.ravel(), a.ravel())[0]
    )
    flat = np.zeros_like(a)
    assert np.isnan(rank_correlation(flat, a)[0])  # nothing to rank


def test_top_overlap_by_hand():
    a = np.arange(10.0).reshape(1, 1, 10)  # top 20 %: pixels 8 and 9
    b = a.copy()
    b[0, 0, [7, 8]] = b[0, 0, [8, 7]]  # top 20 %: pixels 7 and 9
    assert top_overlap(a, b, 0.2)[0] == pytest.approx(1 / 3)  # {9} of {7, 8, 9}
    assert top_overlap(a, a, 0.2)[0] == 1.0
    tied = np.zeros((1, 1, 10))
    tied[0, 0, 8:] = 1.0  # a coarse map: its peak covers two pixels, both are in its top 10 %
    assert top_overlap(tied, a, 0.1)[0] == pytest.approx(1 / 2)  # {9} of {8, 9}
    assert np.isnan(top_overlap(np.zeros((1, 1, 10)), a, 0.1)[0])
    with pytest.raises(ValueError):
        top_overlap(a, a, 0.0)


def test_random_maps_barely_agree_and_a_shared_signal_does():
    rng = np.random.default_rng(0)
    rand = random_maps(32, (32, 32), seed=1)
    other = random_maps(32, (32, 32), seed=2)
    assert abs(np.nanmean(rank_correlation(rand, other))) < 0.15
    # Independent top-10 % sets overlap by about 0.1 * 0.1 / 0.19, 0.05; smooth fields vary more.
    assert np.nanmean(top_overlap(rand, other)) < 0.15
    noisy = rand + 0.3 * rand.std() * rng.standard_normal(rand.shape)
    assert np.nanmean(rank_correlation(rand, noisy)) > 0.8
    assert np.nanmean(top_overlap(rand, noisy)) > 0.5


def test_average_ranks_are_scipys_rankdata_ties_included():
    from scipy.stats import rankdata

    from kdray.explain.agreement import average_ranks

    rng = np.random.default_rng(0)
    for x in (rng.random((3, 50)), rng.integers(0, 4, (5, 37)).astype(float), np.zeros((1, 9))):
        assert np.array_equal(average_ranks(x), rankdata(x, axis=1))
