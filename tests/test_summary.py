"""The run summary: the KD gain paired by seed, with its uncertainty, or the honest lack of one."""

from __future__ import annotations

from dataclasses import replace

import pytest

from kdray.champion import ChampionResult
from kdray.summary import DatasetSummary, format_summary
from kdray.summary import paired_gain as _paired_gain


def _row(dataset: str, seeds: str, gain: float, std: float = float("nan"), p: float = float("nan")):
    return DatasetSummary(
        dataset=dataset,
        teacher_test_accuracy=0.95,
        teacher_test_f1=0.95,
        student_test_accuracy=0.9,
        student_test_f1=0.9,
        baseline_test_accuracy=0.9 - gain,
        baseline_test_f1=0.88,
        kd_gain=gain,
        alpha=0.5,
        temperature=4.0,
        widths="16-32",
        lr=1e-3,
        teacher_params=7_000_000,
        student_params=100_000,
        teacher_flops=10**8,
        student_flops=10**7,
        seeds=seeds,
        student_test_accuracy_std=0.01,
        baseline_test_accuracy_std=0.01,
        teacher_reused=False,
        trials=4,
        seconds=1.0,
        parent_run_id="x",
        teacher_test_ece=0.05,
        student_test_ece=0.04,
        baseline_test_ece=0.06,
        kd_gain_std=std,
        kd_gain_p=p,
    )


def test_the_gain_says_whether_it_exceeds_its_uncertainty():
    text = format_summary(
        [
            _row("brain_tumor", "0 1 2", 0.030, 0.004, 0.01),
            _row("eye_disease", "0 1 2", -0.010, 0.030, 0.62),
            _row("alzheimer", "0", 0.058),
        ]
    )
    assert (
        "- brain_tumor +0.030 ± 0.004 over 3 seeds, paired t-test p = 0.01: larger than its uncertainty"
        in text
    )
    assert "- eye_disease -0.010 ± 0.030 over 3 seeds, paired t-test p = 0.62: within noise" in text
    assert "- alzheimer +0.058 (one seed: no uncertainty; set `seeds: [0, 1, 2]`)" in text
    assert "| ECE |" in text and "| 0.050 |" in text


def test_the_gain_is_paired_seed_by_seed():
    champion = ChampionResult(
        run_id="r",
        trial_run_id="t",
        version="1",
        alpha=0.5,
        temperature=4.0,
        widths=[16],
        lr=1e-3,
        params=1,
        flops=1,
        val_accuracy=0.9,
        test_metrics={"accuracy": 0.9},
        baseline_run_id="b",
        baseline_test={},
        seeds=[0, 1, 2],
        champion_seed_accuracy=[0.90, 0.92, 0.95],
        baseline_seed_accuracy=[0.88, 0.90, 0.93],  # every seed +0.02: no spread, clearly a gain
    )
    gain = _paired_gain(champion)
    assert gain["kd_gain_std"] == pytest.approx(0.0, abs=1e-12) and gain["kd_gain_p"] < 1e-6
    shuffled = _paired_gain(replace(champion, baseline_seed_accuracy=[0.93, 0.88, 0.90]))
    assert shuffled["kd_gain_p"] > 0.5  # the same numbers unpaired carry no evidence
    assert _paired_gain(replace(champion, champion_seed_accuracy=[])) == {}  # an older state


def test_the_summary_gives_teacher_student_agreement_beside_a_random_map():
    row = replace(
        _row("brain_tumor", "0", 0.01),
        agreement={
            "agreement.predictions": 0.9375,
            "agreement.predictions_test": 0.91,
            "agreement.rank_correlation.gradcam": 0.62,
            "agreement.rank_correlation_random.gradcam": 0.03,
            "agreement.top10_overlap.gradcam": 0.41,
            "agreement.top10_overlap_random.gradcam": 0.05,
        },
    )
    text = format_summary([row, _row("eye_disease", "0", 0.0)])  # no report: no agreement line
    assert "- brain_tumor: labels 0.94 (0.91); Grad-CAM 0.62 / 0.41 (0.03 / 0.05)" in text
    assert "- eye_disease:" not in text
    assert "Teacher–student agreement" not in format_summary([_row("eye_disease", "0", 0.0)])


def test_the_summary_says_whether_the_teacher_is_above_the_ce_baseline():
    above = replace(
        _row("brain_tumor", "0 1 2", 0.0),
        teacher_test_accuracy=0.95,
        baseline_test_accuracy=0.90,
        baseline_test_accuracy_std=0.02,
    )
    level = replace(above, dataset="alzheimer", teacher_test_accuracy=0.93)  # 1.5 std: within 2
    below = replace(above, dataset="eye_disease", teacher_test_accuracy=0.75)
    one_seed = replace(above, dataset="x", seeds="0", teacher_test_accuracy=0.89)
    text = format_summary([above, level, below, one_seed])
    assert (
        "- brain_tumor +0.050 (+2.5 × the baseline's seed std 0.020): above it, the paper's setting"
        in text
    )
    assert "- alzheimer +0.030 (+1.5 × the baseline's seed std 0.020): level with it" in text
    assert "- eye_disease -0.150 (-7.5 × the baseline's seed std 0.020): below it;" in text
    assert "does not test the paper's claim" in text.split("- eye_disease -0.150")[1]
    assert "- x -0.010 (one seed: no spread): below it;" in text


def test_the_summary_says_how_many_training_images_each_side_saw():
    rows = [
        replace(
            _row("eye_disease", "0 1 2", 0.0), teacher_train_images=840, student_train_images=212
        ),
        replace(
            _row("brain_tumor", "0 1 2", 0.0), teacher_train_images=816, student_train_images=204
        ),
    ]
    text = format_summary(rows)
    assert (
        "Training images, teacher / students (KD and CE-only alike): eye_disease 840 / 212; "
        "brain_tumor 816 / 204." in text
    )
    # A summary written before kdray counted them says nothing about it.
    assert "Training images" not in format_summary([_row("eye_disease", "0 1 2", 0.0)])


def test_the_smallest_detectable_gain_has_the_power_it_claims():
    """At the returned difference, a paired t-test rejects in 80 % of simulated experiments."""
    import numpy as np
    from scipy import stats

    from kdray.metrics import minimum_detectable_difference, paired_difference

    rng = np.random.default_rng(0)
    for n, std in ((3, 0.03), (10, 0.02)):
        mde = minimum_detectable_difference(std, n)
        d = rng.normal(mde, std, size=(20000, n))
        t = d.mean(1) / (d.std(1, ddof=1) / np.sqrt(n))
        rejected = 2 * stats.t.sf(np.abs(t), n - 1) < 0.05
        assert rejected.mean() == pytest.approx(0.8, abs=0.015), (n, mde)
    # more seeds, smaller detectable gains; large n tends to (z_.975 + z_.8) std / sqrt(n)
    assert minimum_detectable_difference(0.03, 10) < minimum_detectable_difference(0.03, 3)
    assert minimum_detectable_difference(1.0, 400) == pytest.approx(2.8016 / 20, rel=0.01)
    assert minimum_detectable_difference(0.0, 3) == 0.0
    assert np.isnan(minimum_detectable_difference(0.03, 1))
    assert paired_difference([0.9, 0.92, 0.95], [0.88, 0.91, 0.90])["mde"] > 0


def test_a_verdict_within_noise_says_how_large_a_gain_could_have_been_missed():
    row = replace(_row("eye_disease", "0 1 2", -0.004, 0.030, 0.91), kd_gain_mde=0.105)
    text = format_summary([row, replace(row, dataset="alzheimer", kd_gain_p=0.01)])
    assert (
        "- eye_disease -0.004 ± 0.030 over 3 seeds, paired t-test p = 0.91: within noise; with 3 "
        "seeds and this spread the test detects a gain of ±0.105 or more (80 % power), so a "
        "smaller one may have been missed" in text
    )
    assert "p = 0.01: larger than its uncertainty; with 3 seeds and this spread the test " in text
    assert "(80 % power)\n" in text  # no "missed" clause on a detected gain


def test_the_summary_carries_each_datasets_sanity_checks():
    row = replace(
        _row("brain_tumor", "0", 0.01),
        sanity={
            "student.randomisation.feature_maps": 0.83,
            "student.randomisation.gradcam": 0.04,
            "teacher.randomisation.gradcam": 0.61,
            "student.blank_test.gradcam": 6.0,
            "teacher.blank_test.gradcam": 2.0,
            "localisation_test.images": 180.0,
        },
    )
    text = format_summary([row])
    assert (
        "- brain_tumor: student Grad-CAM 0.04 passes, feature maps 0.83 fails; teacher Grad-CAM "
        "0.61 fails; blank Grad-CAM student 6, teacher 2 of 180 images" in text
    )


def test_the_teacher_margin_says_when_the_teacher_saw_more_images():
    row = replace(_row("brain_tumor", "0 1 2", 0.01), teacher_train_images=816)
    assert "the teacher saw" not in format_summary([row])  # an older summary: no counts
    text = format_summary([replace(row, student_train_images=204)])
    assert (
        "[the teacher saw 816 training images, the students 204: on the synthetic stand-ins "
        "the margin comes partly from the teacher's extra data]" in text
    )
