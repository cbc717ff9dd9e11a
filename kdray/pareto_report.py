"""The KD search's Pareto front: validation accuracy against transparency, FLOPs as size and
colour, the champion and the accuracy-only pick marked, and what one gains over the other.

Read back from MLflow (the trial runs under a dataset's parent run, :mod:`kdray.search_findings`),
so it is the same after a resume or a rebuild as right after the sweep. Written as ``pareto.png``
and ``pareto.md`` into the dataset's report folder (the report appends the section), logged
under the parent run's ``pareto/`` artifacts with ``pareto.*`` metrics; the summary states the
gain (:meth:`ParetoSummary.sentence`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from kdray.pareto import pareto_front
from kdray.search_findings import TrialPoint, trials_from_mlflow
from kdray.tracking import Tracker

__all__ = ["ParetoSummary", "log_pareto", "pareto_figure", "pareto_markdown"]


@dataclass
class ParetoSummary:
    """One dataset's front, the two picks and their difference (validation figures)."""

    trials: int = 0
    scored: int = 0
    front: list[str] = field(default_factory=list)  # trial run ids on the front
    rule: str = "accuracy"
    tolerance: float = 0.0
    champion: dict[str, float] = field(default_factory=dict)
    accuracy_pick: dict[str, float] = field(default_factory=dict)
    same_pick: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def transparency_gain(self) -> float:
        return self.champion.get("transparency", math.nan) - self.accuracy_pick.get(
            "transparency", math.nan
        )

    @property
    def accuracy_cost(self) -> float:
        """Validation accuracy the champion gives up to the accuracy-only pick (negative: it has
        more; the pick is the fewest FLOPs within the tolerance of the best)."""
        return self.accuracy_pick.get("val_accuracy", math.nan) - self.champion.get(
            "val_accuracy", math.nan
        )

    def sentence(self) -> str:
        """The summary's line: what the champion gains in transparency, what it costs."""
        if not self.scored:
            return "no trial was scored for transparency"
        c, a = self.champion, self.accuracy_pick
        head = f"{len(self.front)} of {self.scored} scored trials on the front"
        if self.same_pick:
            return (
                f"{head}; the champion is also the accuracy-only pick (val acc "
                f"{c['val_accuracy']:.3f}, transparency {c['transparency']:.3f})"
            )
        # The accuracy-only pick is the fewest FLOPs within the tolerance of the best: the
        # champion can be more accurate than it as well as less.
        cost = self.accuracy_cost
        price = (
            f"for {cost:.3f} of validation accuracy"
            if cost > 0
            else f"and {-cost:.3f} more validation accuracy"
            if cost < 0
            else "at the same validation accuracy"
        )
        return (
            f"{head}; the champion (rule {self.rule}) has transparency {c['transparency']:.3f} "
            f"against the accuracy-only pick's {a['transparency']:.3f} "
            f"({self.transparency_gain:+.3f}), {price} "
            f"({c['val_accuracy']:.3f} against {a['val_accuracy']:.3f}, within the rule's "
            f"{self.tolerance:.3f})"
        )


def _point(p: TrialPoint) -> dict[str, float]:
    return {"val_accuracy": p.val_accuracy, "transparency": p.transparency, "flops": p.flops}


def pareto_figure(
    points: Sequence[TrialPoint],
    champion_run_id: str | None,
    accuracy_pick_run_id: str | None,
    tolerance: float,
    title: str,
) -> Figure:
    """Transparency against validation accuracy: one point per scored trial, FLOPs as size and
    colour, the front joined, the champion a red star, the accuracy-only pick a black diamond,
    the accuracy band the rule chooses in shaded."""
    pts = [p for p in points if math.isfinite(p.transparency)]
    fig = Figure(figsize=(6.4, 4.6))
    ax = fig.subplots()
    xs = np.array([p.val_accuracy for p in pts])
    ys = np.array([p.transparency for p in pts])
    flops = np.array([p.flops for p in pts], dtype=float)
    mflops = np.where(np.isfinite(flops), flops, np.nanmedian(flops) if len(flops) else 1.0) / 1e6
    sizes = 20 + 180 * np.sqrt(mflops / max(mflops.max(), 1e-9))
    sc = ax.scatter(
        xs, ys, s=sizes, c=np.log10(np.maximum(mflops, 1e-3)), cmap="viridis", alpha=0.8
    )
    fig.colorbar(sc, ax=ax, label="log10 MFLOPs per image")
    front = pareto_front([(p.val_accuracy, p.transparency) for p in pts])
    order = sorted(front, key=lambda i: xs[i])
    ax.plot(xs[order], ys[order], "-", c="tab:orange", lw=1.5, label="Pareto front")
    if len(xs):
        best = xs.max()
        ax.axvspan(best - tolerance, best, color="tab:green", alpha=0.08, label="the rule's band")
    for p, x, y in zip(pts, xs, ys, strict=True):
        if p.run_id == accuracy_pick_run_id:
            ax.scatter(
                x,
                y,
                s=160,
                marker="D",
                facecolors="none",
                edgecolors="black",
                lw=1.5,
                label="accuracy-only pick",
            )
        if p.run_id == champion_run_id:
            ax.scatter(x, y, s=220, marker="*", c="tab:red", label="champion")
    ax.set_xlabel("best validation accuracy")
    ax.set_ylabel("transparency (validation)")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    ax.legend(unique.values(), unique.keys(), fontsize=8, loc="lower left")
    ax.set_title(title, fontsize=10, loc="left")
    fig.tight_layout()
    return fig


def pareto_markdown(summary: ParetoSummary, points: Sequence[TrialPoint], figure: str) -> str:
    """The report's section on the front."""
    lines = [
        "## Accuracy and transparency: the Pareto front",
        "",
        f"Every KD trial's best-epoch model, validation accuracy against its transparency score "
        f"({summary.scored} of {summary.trials} trials scored; FLOPs as size and colour). "
        f"{summary.sentence().capitalize()}.",
        "",
        "| trial | val accuracy | transparency | MFLOPs | widths | on the front |",
        "|---|---:|---:|---:|---|---|",
    ]
    front = set(summary.front)
    marks = {summary.champion.get("run_id"): " (champion)"}
    marks.setdefault(summary.accuracy_pick.get("run_id"), "")
    marks[summary.accuracy_pick.get("run_id")] += " (accuracy-only pick)"
    shown = sorted(
        (p for p in points if math.isfinite(p.transparency)),
        key=lambda p: (-p.transparency, -p.val_accuracy),
    )
    for p in shown:
        lines.append(
            f"| {p.run_id[:8]}{marks.get(p.run_id, '')} | {p.val_accuracy:.3f} | "
            f"{p.transparency:.3f} | {p.flops / 1e6:.1f} | {'-'.join(map(str, p.widths))} | "
            f"{'yes' if p.run_id in front else ''} |"
        )
    return "\n".join([*lines, "", f"![Pareto front]({figure})", ""])


def log_pareto(
    tracker: Tracker,
    parent_run_id: str,
    champion_trial_run_id: str,
    accuracy_pick_run_id: str,
    out_dir: Path,
    dataset: str,
    rule: str,
    tolerance: float,
) -> ParetoSummary:
    """Read the KD trials from MLflow; write ``pareto.png`` and ``pareto.md`` into ``out_dir``; log
    them under the parent run's ``pareto/`` and ``pareto.*`` metrics; return the summary."""
    points = trials_from_mlflow(tracker, parent_run_id)
    scored = [p for p in points if math.isfinite(p.transparency)]
    by_id = {p.run_id: p for p in points}
    summary = ParetoSummary(
        trials=len(points),
        scored=len(scored),
        rule=rule,
        tolerance=tolerance,
        same_pick=champion_trial_run_id == accuracy_pick_run_id,
    )
    if not scored:
        return summary
    front = pareto_front([(p.val_accuracy, p.transparency) for p in scored])
    summary.front = [scored[i].run_id for i in front]
    for key, run_id in (
        ("champion", champion_trial_run_id),
        ("accuracy_pick", accuracy_pick_run_id),
    ):
        if run_id in by_id:
            setattr(summary, key, {"run_id": run_id, **_point(by_id[run_id])})
    out_dir.mkdir(parents=True, exist_ok=True)
    title = f"{dataset}: {len(scored)} KD trials, accuracy against transparency"
    pareto_figure(points, champion_trial_run_id, accuracy_pick_run_id, tolerance, title).savefig(
        out_dir / "pareto.png", dpi=100
    )
    (out_dir / "pareto.md").write_text(pareto_markdown(summary, points, "pareto.png"))
    metrics = {"pareto.front_size": len(summary.front), "pareto.scored_trials": len(scored)}
    for key, value in (
        ("pareto.champion_transparency", summary.champion.get("transparency", math.nan)),
        ("pareto.accuracy_pick_transparency", summary.accuracy_pick.get("transparency", math.nan)),
        ("pareto.transparency_gain", summary.transparency_gain),
        ("pareto.accuracy_cost", summary.accuracy_cost),
    ):
        if math.isfinite(value):
            metrics[key] = value
    tracker.log_metrics(parent_run_id, metrics)
    for name in ("pareto.png", "pareto.md"):
        tracker.client.log_artifact(parent_run_id, str(out_dir / name), "pareto")
    return summary
