"""From the audit's per-image table: the aggregates, and the cases to look at first.

The aggregates use the training report's definitions (accuracy, agreement, ECE of
:func:`kdray.metrics.calibration`, pointing game and energy in mask over images with a non-empty
lesion mask), so on the same split they give the report's numbers.

The look-first lists, each ranked and each row explained in one sentence:

* ``disagree``: teacher and student give different labels (surest teacher first);
* ``confident_wrong``: the student is wrong and sure of it (labelled data; surest first);
* ``right_outside_lesion``: the student is right but its Grad-CAM peaks outside the lesion
  (images with a mask; lowest energy in mask first);
* ``maps_disagree``: teacher and student maps of the same image are anti-correlated (rank
  correlation of their Grad-CAM, else feature maps, below 0; the lowest first);
* ``unreadable``: files that could not be decoded, with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from kdray.audit.scorer import THUMB_SIDE, map_at, thumbnail_at
from kdray.explain.faithfulness import nanmean
from kdray.explain.render import heat_overlay, png_bytes, strip
from kdray.metrics import calibration

__all__ = ["CASE_KINDS", "Case", "aggregates", "look_first", "row_strip"]

CASE_KINDS = {
    "disagree": "Teacher and student disagree",
    "confident_wrong": "Student confident and wrong",
    "right_outside_lesion": "Student right, its CAM outside the lesion",
    "maps_disagree": "Teacher and student maps disagree most",
    "unreadable": "Unreadable files",
}
ROLES = ("student", "teacher")
MAPS_DISAGREE_BELOW = 0.0  # a random map's rank correlation with any map is about 0


@dataclass
class Case:
    """One look-first list: the rule, how many rows it matched, the top rows explained."""

    kind: str
    title: str
    rule: str
    matched: int
    rows: list[dict] = field(default_factory=list)  # {"index", "name", "why"}


def _readable(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["error"] == ""]


def _roles(df: pd.DataFrame) -> list[str]:
    return [r for r in ROLES if f"{r}_label" in df.columns]


def aggregates(df: pd.DataFrame, class_names: list[str], methods: list[str]) -> dict[str, float]:
    """Flat metrics of an audit table (NaN-free: a score with nothing to score is left out)."""
    ok = _readable(df)
    labelled = ok[ok["label"] >= 0]
    out: dict[str, float] = {
        "images": float(len(df)),
        "readable": float(len(ok)),
        "unreadable": float(len(df) - len(ok)),
        "labelled": float(len(labelled)),
        "with_mask": float(ok["has_mask"].sum()),
    }
    for role in _roles(df):
        if len(ok):
            out[f"{role}.confidence"] = float(ok[f"{role}_confidence"].mean())
        if len(labelled):
            pred = labelled[f"{role}_label"].to_numpy()
            y = labelled["label"].to_numpy()
            out[f"{role}.accuracy"] = float((pred == y).mean())
            for c, name in enumerate(class_names):
                sel = y == c
                if sel.any():
                    out[f"{role}.accuracy.{name}"] = float((pred[sel] == c).mean())
            probs = np.stack(labelled[f"{role}_probs"].to_numpy()).astype(np.float64)
            out[f"{role}.ece"] = calibration(probs, y)["ece"]
        masked = ok[ok["has_mask"]]
        for method in methods:
            for score, key in (("pointing", "pointing_game"), ("energy", "energy_in_mask")):
                col = f"{role}_{method}_{score}"
                if col in masked.columns and len(masked):
                    out[f"{role}.{key}.{method}"] = nanmean(masked[col].to_numpy())
    if "agree" in ok.columns and len(ok):
        out["agreement.predictions"] = float(ok["agree"].mean())
        for method in methods:
            for col, key in (("maps_rank", "rank_correlation"), ("maps_iou", "top10_overlap")):
                if f"{col}_{method}" in ok.columns:
                    out[f"agreement.{key}.{method}"] = nanmean(ok[f"{col}_{method}"].to_numpy())
    return {k: float(v) for k, v in out.items() if np.isfinite(v)}


def _name(class_names: list[str], index: int) -> str:
    return class_names[int(index)] if 0 <= int(index) < len(class_names) else "?"


def look_first(df: pd.DataFrame, class_names: list[str], top: int = 10) -> list[Case]:
    """The five look-first lists (a list whose inputs the audit lacks says why it is empty)."""
    ok = _readable(df)
    cases: list[Case] = []
    has_teacher = "agree" in df.columns
    labelled = ok[ok["label"] >= 0]

    def rows(sel: pd.DataFrame, why) -> list[dict]:
        return [
            {"index": int(r["index"]), "name": str(r["name"]), "why": why(r)}
            for _, r in sel.head(top).iterrows()
        ]

    def truth(r) -> str:
        return f"; truth: {_name(class_names, r['label'])}" if r["label"] >= 0 else ""

    if has_teacher:
        sel = ok[~ok["agree"]].sort_values(["teacher_confidence", "index"], ascending=[False, True])
        cases.append(
            Case(
                "disagree",
                CASE_KINDS["disagree"],
                "labels differ; the surest teacher first",
                len(sel),
                rows(
                    sel,
                    lambda r: (
                        f"teacher says {_name(class_names, r['teacher_label'])} at "
                        f"{r['teacher_confidence']:.2f}, student {_name(class_names, r['student_label'])} "
                        f"at {r['student_confidence']:.2f}{truth(r)}"
                    ),
                ),
            )
        )
    else:
        cases.append(Case("disagree", CASE_KINDS["disagree"], "student only: no teacher", 0))

    wrong = labelled[labelled["student_label"] != labelled["label"]].sort_values(
        ["student_confidence", "index"], ascending=[False, True]
    )
    teacher_note = (
        (lambda r: f"; the teacher says {_name(class_names, r['teacher_label'])}")
        if has_teacher
        else (lambda r: "")
    )
    cases.append(
        Case(
            "confident_wrong",
            CASE_KINDS["confident_wrong"],
            "student's label is not the truth; the surest first"
            if len(labelled)
            else "unlabelled data: no truth to be wrong about",
            len(wrong),
            rows(
                wrong,
                lambda r: (
                    f"student says {_name(class_names, r['student_label'])} at "
                    f"{r['student_confidence']:.2f}{truth(r)}{teacher_note(r)}"
                ),
            ),
        )
    )

    energy = "student_gradcam_energy"
    if energy in ok.columns:
        right = labelled[
            (labelled["student_label"] == labelled["label"])
            & labelled["has_mask"]
            & (labelled["student_gradcam_pointing"] < 0.5)
        ].sort_values([energy, "index"])
        cases.append(
            Case(
                "right_outside_lesion",
                CASE_KINDS["right_outside_lesion"],
                "student right on an image with a lesion mask, its CAM's peak outside the "
                "mask; least CAM energy in the mask first",
                len(right),
                rows(
                    right,
                    lambda r: (
                        f"student right ({_name(class_names, r['student_label'])}), but its "
                        f"CAM peaks outside the lesion and {r[energy]:.0%} of it lies inside"
                    ),
                ),
            )
        )
    else:
        cases.append(Case("right_outside_lesion", CASE_KINDS["right_outside_lesion"], "no CAM", 0))

    method = next((m for m in ("gradcam", "feature_maps") if f"maps_rank_{m}" in ok.columns), None)
    if method is not None:
        col = f"maps_rank_{method}"
        sel = ok[ok[col] < MAPS_DISAGREE_BELOW].sort_values([col, "index"])
        label = "CAM" if method == "gradcam" else "feature maps"
        cases.append(
            Case(
                "maps_disagree",
                CASE_KINDS["maps_disagree"],
                f"rank correlation of the two models' {label} below {MAPS_DISAGREE_BELOW:g} (they "
                "agree less than unrelated maps would); the lowest first",
                len(sel),
                rows(
                    sel,
                    lambda r: (
                        f"{label} rank correlation {r[col]:.2f}, top-10 % overlap "
                        f"{r[f'maps_iou_{method}']:.2f}; teacher "
                        f"{_name(class_names, r['teacher_label'])}, student "
                        f"{_name(class_names, r['student_label'])}"
                    ),
                ),
            )
        )
    else:
        cases.append(Case("maps_disagree", CASE_KINDS["maps_disagree"], "needs the teacher", 0))

    bad = df[df["error"] != ""].sort_values("index")
    cases.append(
        Case(
            "unreadable",
            CASE_KINDS["unreadable"],
            "files that could not be decoded",
            len(bad),
            rows(bad, lambda r: str(r["error"])),
        )
    )
    return cases


def row_strip(row: pd.Series | dict, method: str = "gradcam") -> np.ndarray | None:
    """Input | student map | teacher map (where present) as one uint8 image; None if unreadable."""
    if not row["thumbnail"]:
        return None
    # Small inputs (32 px) are drawn larger; larger ones at the stored thumbnail's side.
    image = thumbnail_at(row["thumbnail"], THUMB_SIDE)
    tiles, labels = [image], ["input"]
    for role in ROLES:
        data = row.get(f"{role}_{method}")
        if data:
            tiles.append(heat_overlay(image, map_at(data, row[f"{role}_map_side"], THUMB_SIDE)))
            labels.append(role)
    return strip(tiles, labels)


def strip_png(row: pd.Series | dict, method: str = "gradcam") -> bytes | None:
    tiles = row_strip(row, method)
    return None if tiles is None else png_bytes(tiles)
