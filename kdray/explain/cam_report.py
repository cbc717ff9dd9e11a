"""The report's comparison of CAM variants (:mod:`kdray.explain.cam_methods`): for each model,
each variant at the layer the validation images choose for it, scored on the test split.

Every variant of the student (the teacher: the paper's Grad-CAM and the model's own variant) gets
its layer from the validation scoring set (:mod:`kdray.explain.scoring`: the best-scoring
candidate that passes the randomisation check), then, on the whole test split at that layer, the
blank maps, the pointing game and the energy in the lesion masks (masked images) or the
deletion / insertion faithfulness (no masks), beside the randomisation check's |rank correlation|
on the validation images. These are the figures the default variant was picked by
(docs/transparency.md), measured again in every report.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from torch import nn

from kdray.config import ExplainConfig, TransparencyConfig
from kdray.data.prepare import PreparedData
from kdray.explain.cam_methods import CAM_METHODS, CAM_TITLES, PAPER_METHOD
from kdray.explain.gradcam import Cam
from kdray.explain.sanity import PASS_BELOW
from kdray.explain.scoring import ScoringSet, score_model

__all__ = ["CamComparison", "CamRow", "compare_cams"]


@dataclass
class CamRow:
    model: str
    method: str
    layer: str
    val_score: float
    randomisation: float
    test_images: int
    blank: int
    pointing_game: float = math.nan
    energy_in_mask: float = math.nan
    test_score: float = math.nan
    own: bool = False  # the model's own variant (what it is served and reported with)


@dataclass
class CamComparison:
    basis: str
    rows: list[CamRow] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        """``cams.<model>.<variant>.<figure>``: the test split's, and the validation score."""
        out: dict[str, float] = {}
        for r in self.rows:
            key = f"cams.{r.model}.{r.method}"
            for name in ("val_score", "randomisation", "pointing_game", "energy_in_mask"):
                value = getattr(r, name)
                if math.isfinite(value):
                    out[f"{key}.{name}"] = float(value)
            out[f"{key}.blank"] = float(r.blank)
            out[f"{key}.test_score"] = float(r.test_score)
        return out

    def row(self, model: str, method: str) -> CamRow | None:
        return next((r for r in self.rows if r.model == model and r.method == method), None)

    def section(self) -> list[str]:
        """The report's markdown section."""
        if not self.rows:
            return []
        n = self.rows[0].test_images
        local = self.basis == "localisation"
        lines = [
            "",
            "## Class activation maps compared",
            "",
            "Each CAM variant at the layer the validation images choose for it (the "
            "best-scoring block that passes the randomisation check), scored on the "
            + (f"{n} masked test images" if local else f"{n} test images")
            + f". Blank: maps zero everywhere (a miss in every score). Randomisation: |rank "
            f"correlation| with the fully re-initialised model's maps (passes below {PASS_BELOW}). "
            "The model's own variant (bold) is what it is served, audited and reported with "
            "(`explain.cam_method`); Grad-CAM is the paper's.",
            "",
        ]
        if local:
            lines += [
                "| Model | Variant | Layer | Blank | Pointing game | Energy in mask | "
                "Randomisation | Val score |",
                "|---|---|---|---:|---:|---:|---:|---:|",
            ]
        else:
            lines += [
                "| Model | Variant | Layer | Blank | Faithfulness | Randomisation | Val score |",
                "|---|---|---|---:|---:|---:|---:|",
            ]
        for r in self.rows:
            name = f"**{CAM_TITLES[r.method]}**" if r.own else CAM_TITLES[r.method]
            verdict = "" if r.randomisation < PASS_BELOW else " (fails)"
            cells = [
                r.model,
                name,
                f"`{r.layer}`",
                str(r.blank),
                *(
                    [f"{r.pointing_game:.2f}", f"{r.energy_in_mask:.2f}"]
                    if local
                    else [f"{r.test_score:.2f}"]
                ),
                f"{r.randomisation:.2f}{verdict}",
                f"{r.val_score:.3f}",
            ]
            lines.append("| " + " | ".join(cells) + " |")
        student = next((r for r in self.rows if r.model == "student" and r.own), None)
        teacher = self.row("teacher", PAPER_METHOD)
        if local and student and teacher:
            relation = (
                "at least as well as"
                if student.pointing_game >= teacher.pointing_game
                else ("less well than")
            )
            lines += [
                "",
                f"The student's {CAM_TITLES[student.method]} localises {relation} the teacher's "
                f"Grad-CAM: pointing game {student.pointing_game:.2f} against "
                f"{teacher.pointing_game:.2f}, {student.blank} blank maps against "
                f"{teacher.blank}.",
            ]
        return lines


def compare_cams(
    models: Mapping[str, nn.Module],
    data: PreparedData,
    cams: Mapping[str, Cam],
    cfg: ExplainConfig,
    transparency: TransparencyConfig,
    seed: int = 0,
) -> CamComparison:
    """Score the variants (every one for the student; the teacher's own and Grad-CAM) as the
    module docstring says."""
    val = ScoringSet.from_split(data.splits["val"], transparency.images, seed)
    test_split = data.splits["test"]
    masked = (
        np.flatnonzero(test_split.masks.any(axis=(1, 2)))
        if test_split.masks is not None
        else np.array([], dtype=np.int64)
    )
    local = len(masked) > 0 and transparency.basis != "faithfulness"
    keep = masked if local else np.arange(len(test_split))
    test = ScoringSet(
        np.ascontiguousarray(test_split.images[keep]),
        None if test_split.masks is None else test_split.masks[keep],
        None,
        "test",
    )
    out = CamComparison("localisation" if local else "faithfulness")
    for name, model in models.items():
        own = cams[name].method
        variants = CAM_METHODS if name == "student" else tuple(dict.fromkeys((own, PAPER_METHOD)))
        for method in variants:
            chosen = score_model(model, val, transparency, method, seed=seed)
            layer = cams[name].layer if method == own else chosen.layer
            scored = score_model(
                model, test, transparency, method, layers=[layer], sanity=False, seed=seed
            ).chosen
            randomisation = (
                chosen.layers[layer].randomisation if layer in chosen.layers else math.nan
            )
            out.rows.append(
                CamRow(
                    model=name,
                    method=method,
                    layer=layer,
                    val_score=chosen.layers[layer].score if layer in chosen.layers else math.nan,
                    randomisation=randomisation,
                    test_images=len(keep),
                    blank=int(round(scored.blank_rate * len(keep))),
                    pointing_game=scored.pointing_game,
                    energy_in_mask=scored.energy_in_mask,
                    test_score=scored.score,
                    own=method == own,
                )
            )
    return out
