"""Figures logged to MLflow (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

__all__ = ["confusion_figure"]


def confusion_figure(
    confusion: Sequence[Sequence[int]], class_names: Sequence[str], title: str
) -> Figure:
    """A labelled confusion-matrix heat map (rows true, columns predicted)."""
    cm = np.asarray(confusion)
    fig = Figure(figsize=(1.2 * len(class_names) + 2.5, 1.1 * len(class_names) + 2))
    ax = fig.subplots()
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(class_names)), class_names, rotation=35, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    threshold = cm.max() / 2 if cm.size else 0
    for (i, j), value in np.ndenumerate(cm):
        ax.text(
            j,
            i,
            str(value),
            ha="center",
            va="center",
            color="white" if value > threshold else "black",
        )
    fig.tight_layout()
    return fig
