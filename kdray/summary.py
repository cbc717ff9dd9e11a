"""The run summary: a :class:`DatasetSummary` per dataset (teacher, KD champion and CE-only
baseline side by side, the KD gain and test transparency paired by seed by :func:`paired_gain`
and :func:`paired_transparency`), put into the Markdown table and prose of
``reports/summary.md`` by :func:`format_summary` and written with ``reports/summary.csv`` by
:func:`write_summary`."""

from __future__ import annotations

import csv
import io
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from kdray.champion import ChampionResult
from kdray.explain.sanity import PASS_BELOW
from kdray.metrics import paired_difference
from kdray.pareto_report import ParetoSummary
from kdray.search_findings import SearchFindings, across_datasets
from kdray.workspace import Workspace

__all__ = [
    "AGREEMENT_METHODS",
    "PART_TITLES",
    "DatasetSummary",
    "format_summary",
    "paired_gain",
    "paired_transparency",
    "write_summary",
]


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


def paired_transparency(champion: ChampionResult) -> dict[str, dict[str, float]]:
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


def paired_gain(champion: ChampionResult) -> dict[str, float]:
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


def write_summary(rows: list[DatasetSummary], ws: Workspace) -> None:
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
