"""The run summary: the KD gain paired by seed, with its uncertainty, or the honest lack of one."""

from __future__ import annotations

from dataclasses import replace

import pytest

from kdray.champion import ChampionResult
from kdray.pipeline import DatasetSummary, _paired_gain, format_summary


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
