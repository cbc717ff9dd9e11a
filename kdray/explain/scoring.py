"""The transparency score: how well a model's class activation maps hold up, as numbers a search
can optimise, and the layer they are read at, chosen by the same numbers.

For one model, one CAM variant (:mod:`kdray.explain.cam_methods`) and a fixed set of images (a
seeded, class-stratified sample of the validation split), every candidate layer (a block whose
output is at least ``min_side`` pixels a side: the map is upsampled from it) gets, from one
forward and backward pass:

* **blank rate**: the share of images whose map is zero everywhere. A blank map points nowhere:
  it counts as a miss in every score below;
* **localisation**, on the images with a lesion mask: pointing game and energy in mask
  (:mod:`kdray.explain.faithfulness`); an image's localisation is their mean;
* **faithfulness**, without masks (most real datasets): deletion and insertion AUC of the map's
  pixel ranking (Petsiuk et al. 2018); an image's faithfulness is ``(1 + insertion - deletion)
  / 2``, 0.5 for a ranking no better than chance;
* **randomisation** (Adebayo et al. 2018): the absolute rank correlation of the maps with those of
  the same model re-initialised whole; a layer whose maps survive randomisation (|rho| >=
  :data:`~kdray.explain.sanity.PASS_BELOW`) explains the input, not the model, and is not chosen;
* **teacher agreement** (a student with its teacher's maps): mean rank correlation with them.
  Reported, not scored: a CE-only student has no teacher, and both kinds are compared on one
  score.

A layer's **score** is the mean per-image localisation (basis ``localisation``: the split has
lesion masks) or faithfulness (basis ``faithfulness``), blank maps scoring 0. The model's layer is
the best-scoring candidate that passes randomisation (the deepest on a tie); its score is the
model's **transparency**, in [0, 1].
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from torch import nn

from kdray.config import ExperimentConfig, TransparencyConfig
from kdray.data.prepare import PreparedData, Split
from kdray.explain.agreement import blank_maps, rank_correlation
from kdray.explain.background import stratified_indices
from kdray.explain.cam_methods import CAM_FILE, check_method
from kdray.explain.faithfulness import deletion_insertion, energy_in_mask, nanmean, pointing_game
from kdray.explain.gradcam import layer_cams, layer_output_size
from kdray.explain.sanity import PASS_BELOW, randomised_copies

__all__ = [
    "CAM_FILE",
    "cam_choice",
    "LayerScore",
    "ScoringSet",
    "TransparencyScore",
    "candidate_layers",
    "load_cam_choice",
    "save_cam_choice",
    "score_model",
    "score_transparency",
    "scoring_set",
    "scored_images",
]

MIN_MASKED = 8  # fewer masked images than this: localisation is too coarse, use faithfulness
Basis = Literal["auto", "localisation", "faithfulness"]


@dataclass
class LayerScore:
    """One candidate layer's figures (NaN where a figure does not apply)."""

    layer: str
    side: int
    score: float
    blank_rate: float
    pointing_game: float = math.nan
    energy_in_mask: float = math.nan
    deletion: float = math.nan
    insertion: float = math.nan
    randomisation: float = math.nan
    teacher_agreement: float = math.nan

    @property
    def passes_randomisation(self) -> bool:
        return not self.randomisation >= PASS_BELOW  # NaN (not checked) passes


@dataclass
class TransparencyScore:
    """A model's transparency: the chosen layer, its score, and every candidate's figures."""

    method: str
    basis: str
    layer: str
    score: float
    images: int
    masked: int
    layers: dict[str, LayerScore] = field(default_factory=dict)

    @property
    def chosen(self) -> LayerScore:
        return self.layers[self.layer]

    def metrics(self, prefix: str = "transparency") -> dict[str, float]:
        """Flat MLflow metrics: ``transparency`` and the chosen layer's parts, finite only."""
        c = self.chosen
        out = {
            prefix: self.score,
            f"{prefix}.blank_rate": c.blank_rate,
            f"{prefix}.pointing_game": c.pointing_game,
            f"{prefix}.energy_in_mask": c.energy_in_mask,
            f"{prefix}.deletion": c.deletion,
            f"{prefix}.insertion": c.insertion,
            f"{prefix}.randomisation": c.randomisation,
            f"{prefix}.teacher_agreement": c.teacher_agreement,
            f"{prefix}.layer_side": float(c.side),
            f"{prefix}.images": float(self.images),
        }
        return {k: float(v) for k, v in out.items() if math.isfinite(v)}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TransparencyScore:
        layers = {k: LayerScore(**v) for k, v in data.get("layers", {}).items()}
        return cls(**{**data, "layers": layers})


def candidate_layers(model: nn.Module, image_size: int, min_side: int = 4) -> list[str]:
    """The model's blocks whose output is at least ``min_side`` pixels a side (the first block
    when none is)."""
    names = list(model.block_names)
    fitting = [n for n in names if min(layer_output_size(model, n, image_size)) >= min_side]
    return fitting or names[:1]


def scored_images(labels: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """The images a model is scored on: up to ``n``, stratified by class, seeded (the same for
    every trial of a dataset)."""
    return np.sort(stratified_indices(np.asarray(labels), n, seed))


def _randomised(model: nn.Module, seed: int) -> nn.Module:
    """A copy of ``model`` with every parameter re-initialised (the cascade's last step)."""
    *_, (_, randomised) = randomised_copies(model, seed)
    return randomised


def score_transparency(
    model: nn.Module,
    images: np.ndarray,
    masks: np.ndarray | None,
    method: str,
    layers: list[str] | None = None,
    *,
    basis: Basis = "auto",
    teacher_maps: np.ndarray | None = None,
    min_side: int = 4,
    sanity_images: int = 16,
    faithfulness_images: int = 32,
    steps: int = 8,
    seed: int = 0,
) -> TransparencyScore:
    """Score ``model``'s CAM ``method`` at each candidate layer and choose the layer.

    Args:
        model: a kdray model; left as found.
        images: uint8 (N, 3, S, S), the scored images (see :func:`scored_images`).
        masks: bool (N, S, S) lesion masks (empty for a healthy image), or None.
        method: the CAM variant.
        layers: candidate layers; default :func:`candidate_layers`.
        basis: ``localisation``, ``faithfulness``, or ``auto``: localisation when at least
            :data:`MIN_MASKED` images have a mask.
        teacher_maps: float (N, S, S) the teacher's maps of the same images, for agreement.
        sanity_images: images the randomisation check explains (0: no check).
        faithfulness_images: images deletion / insertion run on (faithfulness basis: each costs
            ``2 * (steps + 1)`` forward passes per layer).
        steps: deletion / insertion steps (faithfulness basis).
        seed: seeds the randomised copy and deletion's tie-breaks.

    Returns:
        :class:`TransparencyScore`.
    """
    check_method(method)
    images = np.ascontiguousarray(images)
    size = images.shape[-1]
    layers = layers or candidate_layers(model, size, min_side)
    maps, targets, _ = layer_cams(model, images, layers, method)
    n_masked = int(masks.any(axis=(1, 2)).sum()) if masks is not None else 0
    if basis == "auto":
        basis = "localisation" if n_masked >= MIN_MASKED else "faithfulness"
    if basis == "localisation" and n_masked == 0:
        raise ValueError("basis 'localisation' needs images with lesion masks")
    random_maps: dict[str, np.ndarray] = {}
    k = min(sanity_images, len(images))
    if k:
        random_maps, _, _ = layer_cams(
            _randomised(model, seed), images[:k], layers, method, targets[:k]
        )
    out: dict[str, LayerScore] = {}
    for layer in layers:
        m = maps[layer]
        blank = blank_maps(m)
        score = LayerScore(
            layer=layer,
            side=int(min(layer_output_size(model, layer, size))),
            score=math.nan,
            blank_rate=float(blank.mean()),
        )
        if n_masked:
            score.pointing_game = nanmean(pointing_game(m, masks))
            score.energy_in_mask = nanmean(energy_in_mask(m, masks))
        if basis == "localisation":
            per_image = 0.5 * (pointing_game(m, masks) + energy_in_mask(m, masks))
            score.score = nanmean(per_image)  # blank maps score 0 in both
        else:
            f = min(faithfulness_images, len(images))
            di = deletion_insertion(
                model, images[:f], m[:f], targets[:f], steps=steps, seed=seed, batch_size=256
            )
            score.deletion, score.insertion = float(di.deletion.mean()), float(di.insertion.mean())
            per_image = np.where(blank[:f], 0.0, (1.0 + di.insertion - di.deletion) / 2.0)
            score.score = float(per_image.mean())
        if layer in random_maps:
            rho = np.nan_to_num(rank_correlation(m[:k], random_maps[layer]), nan=0.0)
            score.randomisation = float(np.abs(rho).mean())
        if teacher_maps is not None:
            score.teacher_agreement = nanmean(rank_correlation(m, teacher_maps))
        out[layer] = score
    passing = [s for s in out.values() if s.passes_randomisation] or list(out.values())
    depth = {layer: i for i, layer in enumerate(layers)}
    best = max(
        passing,
        key=lambda s: (s.score if math.isfinite(s.score) else -1.0, -s.blank_rate, depth[s.layer]),
    )
    return TransparencyScore(method, basis, best.layer, best.score, len(images), n_masked, out)


def save_cam_choice(folder: str | Path, score: TransparencyScore, split: str = "val") -> None:
    """Write ``cam.json`` into a saved model folder: the variant and layer its maps are read at
    (the report, the audit, the server and the ONNX export use them) and the figures they were
    chosen by."""
    data = {**score.to_dict(), "split": split}
    (Path(folder) / CAM_FILE).write_text(json.dumps(data, indent=1, allow_nan=True))


def load_cam_choice(folder: str | Path) -> TransparencyScore | None:
    """The model folder's ``cam.json``; None for a model saved before kdray chose layers."""
    path = Path(folder) / CAM_FILE
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    data.pop("split", None)
    return TransparencyScore.from_dict(data)


@dataclass
class ScoringSet:
    """The images every model of a dataset is scored on, their lesion masks, and the teacher's
    maps of them (for the students' agreement). Built once per dataset and shipped with the
    sweep's job, so every trial is scored on the same images."""

    images: np.ndarray
    masks: np.ndarray | None
    teacher_maps: np.ndarray | None = None
    split: str = "val"

    @classmethod
    def from_split(cls, split: Split, n: int, seed: int = 0, name: str = "val") -> ScoringSet:
        idx = scored_images(split.labels, n, seed)
        masks = None if split.masks is None else split.masks[idx]
        return cls(np.ascontiguousarray(split.images[idx]), masks, None, name)


def score_model(
    model: nn.Module,
    scoring: ScoringSet,
    cfg: TransparencyConfig,
    method: str,
    *,
    layers: list[str] | None = None,
    agreement: bool = False,
    sanity: bool = True,
    seed: int = 0,
) -> TransparencyScore:
    """:func:`score_transparency` of ``model`` on ``scoring`` with the config's recipe.

    Args:
        layers: the candidates (default: the model's blocks of at least
            ``cfg.min_layer_side`` px); one layer scores that layer alone (e.g. the test split
            at the layer the validation split chose).
        agreement: also the rank correlation with the teacher's maps (a KD student).
        sanity: run the randomisation check (not needed to score a layer already chosen).
    """
    return score_transparency(
        model,
        scoring.images,
        scoring.masks,
        method,
        layers,
        basis=cfg.basis,
        teacher_maps=scoring.teacher_maps if agreement else None,
        min_side=cfg.min_layer_side,
        sanity_images=cfg.sanity_images if sanity else 0,
        faithfulness_images=cfg.faithfulness_images,
        steps=cfg.deletion_steps,
        seed=seed,
    )


def scoring_set(cfg: ExperimentConfig, data: PreparedData) -> ScoringSet:
    """The validation images every model of this dataset is scored on."""
    return ScoringSet.from_split(data.splits["val"], cfg.transparency.images, cfg.seed)


def cam_choice(
    cfg: ExperimentConfig,
    model: nn.Module,
    folder: Path,
    scoring: ScoringSet,
    agreement: bool = False,
) -> TransparencyScore:
    """A saved model's CAM layer, measured on the scoring set with the config's CAM variant: read
    from its folder's ``cam.json`` when that used the same variant and images, else measured now
    and written there (a teacher trained before kdray chose layers, or under another variant).

    Args:
        agreement: a KD student: also its agreement with the scoring set's teacher maps.
    """
    choice = load_cam_choice(folder)
    if (
        choice is not None
        and choice.method == cfg.explain.cam_method
        and choice.images == len(scoring.images)
    ):
        return choice
    choice = score_model(
        model,
        scoring,
        cfg.transparency,
        cfg.explain.cam_method,
        agreement=agreement,
        seed=cfg.seed,
    )
    save_cam_choice(folder, choice)
    return choice
