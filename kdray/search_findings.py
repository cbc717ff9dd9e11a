"""What a dataset's KD search found: every trial as a point, parameter importances, the seed gap.

Read back from MLflow (one run per trial, role ``trial``, under the dataset's parent run), so the
findings are the same after a resume or a rebuild (``tune/report.py``) as right after the sweep.

A trial's score is its best validation accuracy so far, stopped trials included: that is the
value the search's sampler and scheduler saw. Importances are Optuna's fANOVA (a random forest
of the score over the searched parameters, each parameter's share of the variance it explains),
over every trial; with fewer than :data:`MIN_TRIALS` trials there are none.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402

from kdray.tracking import PARENT_TAG, TAG_ROLE, Tracker  # noqa: E402

__all__ = [
    "MIN_TRIALS",
    "across_datasets",
    "SearchFindings",
    "TrialPoint",
    "find",
    "importances",
    "log_findings",
    "panels_figure",
    "trials_from_mlflow",
]

log = logging.getLogger("kdray")
MIN_TRIALS = 5  # fewer trials than this: no importances (a forest on 4 points says nothing)
LOG_SCALE = ("lr",)  # searched on a log scale (kdray.sweep.search_space); α and T uniformly


@dataclass
class TrialPoint:
    """One trial of a search: its hyper-parameters and its score."""

    run_id: str
    alpha: float
    temperature: float
    lr: float
    widths: list[int]
    val_accuracy: float  # best validation accuracy (so far, if the scheduler stopped it)
    epochs_run: int = 0
    first: bool = False  # the search's seed point (the config's own kd / student settings)
    transparency: float = math.nan  # the best epoch's model's score (kdray.explain.scoring)
    flops: float = math.nan

    @property
    def base_width(self) -> int:
        return self.widths[0]

    @property
    def depth(self) -> int:
        return len(self.widths)

    def params(self) -> dict[str, float]:
        return {
            "alpha": self.alpha,
            "temperature": self.temperature,
            "lr": self.lr,
            "base_width": float(self.base_width),
            "depth": float(self.depth),
        }


@dataclass
class SearchFindings:
    """One dataset's search, summed up (what the parent run, the report and the summary show)."""

    trials: int
    stopped_early: int
    importances: dict[str, float] = field(default_factory=dict)
    best: dict[str, Any] = field(default_factory=dict)  # the top trial's params and score
    seed_point: dict[str, Any] = field(default_factory=dict)  # the first trial's
    seed_rank: int = 0  # 1 = the seed point is the top trial

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def sentence(self) -> str:
        """One line: trials, the best point, the seed point's rank, the top importances."""
        if not self.trials:
            return "no KD trials"
        b, s = self.best, self.seed_point
        top = ", ".join(f"{k} {v:.2f}" for k, v in list(self.importances.items())[:3])
        return (
            f"{self.trials} KD trials ({self.stopped_early} stopped early); best α "
            f"{b['alpha']:.2f}, T {b['temperature']:.1f}, widths {b['widths']}, lr {b['lr']:.4f} "
            f"(val acc {b['val_accuracy']:.3f}); the seed point ranks {self.seed_rank} of "
            f"{self.trials} ({s['val_accuracy']:.3f}, {b['val_accuracy'] - s['val_accuracy']:+.3f} "
            f"to the best); importance: {top or 'n/a (too few trials)'}"
        )


def trials_from_mlflow(
    tracker: Tracker,
    parent_run_id: str,
    role: str = "trial",
    seed_point: dict[str, Any] | None = None,
) -> list[TrialPoint]:
    """The search's trials (runs of ``role`` under ``parent_run_id``), oldest first.

    ``seed_point`` (``alpha``, ``temperature``, ``lr``, ``widths``: the search's first point)
    marks the trial that ran it; without it, or if none matches, the oldest run. (Trials start
    two at a time: the oldest run is not always the first point.)
    """
    runs = tracker.client.search_runs(
        [tracker.experiment_id],
        filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}' and tags.`{TAG_ROLE}` = '{role}'",
        order_by=["attributes.start_time ASC"],
    )
    points = []
    for run in runs:
        p, m, tags = run.data.params, run.data.metrics, run.data.tags
        if "best_val_accuracy" not in m or "widths" not in p:
            continue  # a trial that never finished an epoch
        points.append(
            TrialPoint(
                run.info.run_id,
                float(p["alpha"]),
                float(p["temperature"]),
                float(p["lr"]),
                [int(w) for w in p["widths"].split("-")],
                float(m["best_val_accuracy"]),
                int(tags.get("kdray.epochs_run", m.get("epoch", -1) + 1)),
                transparency=float(m.get("transparency", math.nan)),
                flops=float(m.get("flops", math.nan)),
            )
        )
    if points:
        match = [p for p in points if seed_point is not None and _is_point(p, seed_point)]
        (match or points)[0].first = True
    return points


def _is_point(p: TrialPoint, point: dict[str, Any]) -> bool:
    return (
        math.isclose(p.alpha, float(point["alpha"]), rel_tol=1e-9)
        and math.isclose(p.temperature, float(point["temperature"]), rel_tol=1e-9)
        and math.isclose(p.lr, float(point["lr"]), rel_tol=1e-9)
        and p.widths == list(point["widths"])
    )


def _searched(points: Sequence[TrialPoint]) -> list[str]:
    """The parameters that vary between the trials (a fixed one has no importance)."""
    names = list(points[0].params())
    return [n for n in names if len({p.params()[n] for p in points}) > 1]


def importances(points: Sequence[TrialPoint], seed: int = 0) -> dict[str, float]:
    """fANOVA importance of each searched parameter (shares summing to 1), highest first.

    Empty with fewer than :data:`MIN_TRIALS` trials, or when every trial scored the same.
    """
    if len(points) < MIN_TRIALS:
        return {}
    names = _searched(points)
    scores = [p.val_accuracy for p in points]
    if not names or max(scores) - min(scores) <= 0:
        return {}
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution
    from optuna.importance import FanovaImportanceEvaluator, get_param_importances

    def distribution(name: str) -> Any:
        values = sorted({p.params()[name] for p in points})
        if name in ("base_width", "depth"):
            return CategoricalDistribution(values)
        return FloatDistribution(values[0], values[-1], log=name in LOG_SCALE)

    dists = {name: distribution(name) for name in names}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize")
    study.add_trials(
        [
            optuna.trial.create_trial(
                params={n: p.params()[n] for n in names},
                distributions=dists,
                value=p.val_accuracy,
            )
            for p in points
        ]
    )
    try:
        found = get_param_importances(
            study, evaluator=FanovaImportanceEvaluator(seed=seed), normalize=True
        )
    except (RuntimeError, ValueError) as exc:  # e.g. all trees without variance
        log.warning("search importances not computed: %s", exc)
        return {}
    return {k: float(v) for k, v in found.items() if math.isfinite(v)}


def _point_dict(p: TrialPoint) -> dict[str, Any]:
    return {
        "alpha": p.alpha,
        "temperature": p.temperature,
        "lr": p.lr,
        "widths": "-".join(map(str, p.widths)),
        "val_accuracy": p.val_accuracy,
        "run_id": p.run_id,
    }


def find(points: Sequence[TrialPoint], seed: int = 0) -> SearchFindings:
    """Importances, the top trial and where the seed point ranks."""
    if not points:
        return SearchFindings(0, 0)
    ranked = sorted(points, key=lambda p: -p.val_accuracy)
    epochs = max(p.epochs_run for p in points)
    first = next((p for p in points if p.first), points[0])
    return SearchFindings(
        trials=len(points),
        stopped_early=sum(p.epochs_run < epochs for p in points),
        importances=importances(points, seed),
        best=_point_dict(ranked[0]),
        seed_point=_point_dict(first),
        # Ties share the better rank: a seed point as good as the best is "rank 1".
        seed_rank=1 + sum(p.val_accuracy > first.val_accuracy for p in points),
    )


def panels_figure(points: Sequence[TrialPoint], champion_run_id: str | None, title: str) -> Figure:
    """Validation accuracy against alpha, T, lr, base width and depth: one point per trial,
    the champion's trial a red star, the seed point a black ring, stopped trials hollow."""
    names = ["alpha", "temperature", "lr", "base_width", "depth"]
    labels = {"alpha": "α", "temperature": "T", "lr": "lr", "base_width": "base width"}
    fig = Figure(figsize=(3.0 * len(names), 3.0))
    axes = fig.subplots(1, len(names), sharey=True)
    epochs = max((p.epochs_run for p in points), default=0)
    rng = np.random.default_rng(0)
    for ax, name in zip(axes, names, strict=True):
        xs = np.array([p.params()[name] for p in points], dtype=float)
        if name in ("base_width", "depth"):  # categorical: a little jitter to see every point
            span = max(np.ptp(xs), 1.0)
            xs = xs + rng.uniform(-0.04, 0.04, len(xs)) * span
        ys = np.array([p.val_accuracy for p in points])
        full = np.array([p.epochs_run >= epochs for p in points])
        ax.scatter(xs[full], ys[full], s=18, c="tab:blue", label="ran all epochs")
        ax.scatter(
            xs[~full], ys[~full], s=18, facecolors="none", edgecolors="tab:blue", label="stopped"
        )
        for i, p in enumerate(points):
            if p.first:
                ax.scatter(xs[i], ys[i], s=90, facecolors="none", edgecolors="black", label="seed")
            if p.run_id == champion_run_id:
                ax.scatter(xs[i], ys[i], s=120, marker="*", c="tab:red", label="champion")
        if name in LOG_SCALE:
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())
        if name in ("base_width", "depth"):
            ax.set_xticks(sorted({p.params()[name] for p in points}))
        ax.set_xlabel(labels.get(name, name))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("best val accuracy")
    handles, texts = axes[0].get_legend_handles_labels()
    unique = dict(zip(texts, handles, strict=True))
    fig.legend(unique.values(), unique.keys(), loc="upper right", fontsize=8, ncol=4)
    fig.suptitle(title, x=0.01, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    return fig


def markdown(findings: SearchFindings, dataset: str, figure: str | None) -> str:
    """The report's section on the search."""
    f = findings
    if not f.trials:
        return ""
    lines = [
        "## What the search found",
        "",
        f"{f.trials} KD trials ({f.stopped_early} stopped early by the scheduler). Best: "
        f"α {f.best['alpha']:.2f}, T {f.best['temperature']:.1f}, widths {f.best['widths']}, "
        f"lr {f.best['lr']:.4f}, val accuracy {f.best['val_accuracy']:.3f}. The seed point "
        f"(the config's α {f.seed_point['alpha']:.2f}, T {f.seed_point['temperature']:.1f}, "
        f"widths {f.seed_point['widths']}) scored {f.seed_point['val_accuracy']:.3f}, rank "
        f"{f.seed_rank} of {f.trials}.",
        "",
    ]
    if f.importances:
        lines += [
            "Parameter importance (fANOVA over every trial's best val accuracy; shares of 1):",
            "",
            "| parameter | importance |",
            "|---|---:|",
            *(f"| {k} | {v:.2f} |" for k, v in f.importances.items()),
            "",
        ]
    else:
        lines += [f"No importances: fewer than {MIN_TRIALS} trials, or all scored the same.", ""]
    if figure:
        lines += [f"![search panels: {dataset}]({figure})", ""]
    return "\n".join(lines)


def log_findings(
    tracker: Tracker,
    parent_run_id: str,
    champion_trial_run_id: str | None,
    out_dir: Path,
    dataset: str,
    seed: int = 0,
    seed_point: dict[str, Any] | None = None,
) -> SearchFindings:
    """Read the search from MLflow; write ``search.png`` and ``search.md`` into ``out_dir``; log
    the importances (``search.importance.<param>``), the trial count and the seed point's gap to
    the best as metrics of the parent run, the files under its ``search/`` artifacts."""
    points = trials_from_mlflow(tracker, parent_run_id, seed_point=seed_point)
    findings = find(points, seed)
    if not points:
        return findings
    out_dir.mkdir(parents=True, exist_ok=True)
    fig = panels_figure(points, champion_trial_run_id, f"{dataset}: {len(points)} KD trials")
    fig.savefig(out_dir / "search.png", dpi=100)
    (out_dir / "search.md").write_text(markdown(findings, dataset, "search.png"))
    metrics = {f"search.importance.{k}": v for k, v in findings.importances.items()}
    metrics.update(
        {
            "search.trials": findings.trials,
            "search.stopped_early": findings.stopped_early,
            "search.seed_rank": findings.seed_rank,
            "search.seed_gap": findings.best["val_accuracy"] - findings.seed_point["val_accuracy"],
        }
    )
    tracker.log_metrics(parent_run_id, metrics)
    for name in ("search.png", "search.md"):
        tracker.client.log_artifact(parent_run_id, str(out_dir / name), "search")
    return findings


ALPHA_AGREE = 0.2  # best alphas within this of each other "agree"
T_AGREE = 2.0  # best temperatures within this factor of each other "agree"


def across_datasets(searches: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """Do the datasets' best α and T agree? (The paper uses one setting for all three.)

    The rule, stated in the sentence: best α within :data:`ALPHA_AGREE` of each other and best
    T within a factor :data:`T_AGREE`.
    """
    best = [(name, s["best"]) for name, s in searches if s.get("best")]
    if len(best) < 2:
        return "one dataset searched: nothing to compare across datasets"
    alphas = [b["alpha"] for _, b in best]
    temps = [b["temperature"] for _, b in best]
    alpha_ok = max(alphas) - min(alphas) <= ALPHA_AGREE
    t_ok = max(temps) / min(temps) <= T_AGREE
    listed = ", ".join(f"{n} α {b['alpha']:.2f} T {b['temperature']:.1f}" for n, b in best)
    verdict = (
        "they agree: one setting for all datasets, as the paper uses, is supported"
        if alpha_ok and t_ok
        else "they differ: a per-dataset setting is better supported than the paper's single one"
    )
    return (
        f"across datasets: {listed}; {verdict} (rule: best α within {ALPHA_AGREE} and best T "
        f"within a factor {T_AGREE:g} of each other)"
    )
