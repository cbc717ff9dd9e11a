"""Sanity checks for saliency maps (Adebayo et al., "Sanity Checks for Saliency Maps", NeurIPS
2018): does a method's map depend on what the network learned, and on the class it explains?

- **Model parameter randomisation** (a cascade): re-initialise the model's parameters group by
  group from the output down (the classifier head, then the last block, ..., the first block;
  each step keeps the earlier ones randomised) and compare each step's map with the trained
  model's map, by Spearman rank correlation and SSIM. A map that still looks the same once the
  whole network is random explains the input, not the network: the method **passes** when the
  mean absolute rank correlation with the fully randomised model is below :data:`PASS_BELOW`
  (absolute, as in the paper: a map turned into its negative still shows the same structure).
- **Random logit**: the map for the predicted class against the map for a random other class.
  A class-sensitive method (Grad-CAM, SHAP) should give different maps; the feature maps are
  class-blind by construction (one map per image, whatever the class), so the test does not
  apply to them.

Similarity with a constant map is 0: a blank map (Grad-CAM is the ReLU of a weighted sum, zero
everywhere when the sum is negative) shares nothing with the trained map.

The model passed in is never modified: the cascade works on a deep copy.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.ndimage import uniform_filter
from torch import nn

from kdray.explain.agreement import blank_maps, rank_correlation

__all__ = [
    "PASS_BELOW",
    "Cascade",
    "MapFn",
    "parameter_randomisation",
    "random_logit",
    "random_other_classes",
    "randomisation_groups",
    "randomised_copies",
    "ssim",
]

PASS_BELOW = 0.5  # mean rank correlation with the fully randomised model's maps

# (model, images, target class per image) -> (N, H, W) maps
MapFn = Callable[[nn.Module, torch.Tensor, np.ndarray], np.ndarray]


def ssim(a: np.ndarray, b: np.ndarray, window: int = 7) -> np.ndarray:
    """Structural similarity of each pair of maps, each min-max scaled to [0, 1] first
    (a constant map scales to 0), with a ``window`` x ``window`` uniform window.

    Returns:
        float (N,) in [-1, 1].
    """

    def scaled(m: np.ndarray) -> np.ndarray:
        m = np.asarray(m, dtype=np.float64)
        lo = m.min(axis=(1, 2), keepdims=True)
        span = m.max(axis=(1, 2), keepdims=True) - lo
        return np.where(span > 0, (m - lo) / np.where(span > 0, span, 1.0), 0.0)

    a, b = scaled(a), scaled(b)
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"maps {a.shape} and {b.shape} must both be (N, H, W)")
    size = (1, window, window)
    mu_a, mu_b = uniform_filter(a, size), uniform_filter(b, size)
    var_a = uniform_filter(a * a, size) - mu_a**2
    var_b = uniform_filter(b * b, size) - mu_b**2
    cov = uniform_filter(a * b, size) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2  # data range 1
    index = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
        (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    )
    return index.mean(axis=(1, 2))


def _similarity(
    reference: np.ndarray, maps: np.ndarray, absolute: bool = False
) -> tuple[float, float]:
    """Mean rank correlation (of its absolute value with ``absolute``; 0 where either map is
    constant) and mean SSIM."""
    rho = np.nan_to_num(rank_correlation(reference, maps), nan=0.0)
    return float((np.abs(rho) if absolute else rho).mean()), float(ssim(reference, maps).mean())


def randomisation_groups(model: nn.Module) -> list[tuple[str, list[str]]]:
    """The cascade's steps, output first: (label, qualified module names) per step.

    The classifier (every top-level module with parameters outside ``features``), then each
    block of ``model.block_names`` from the last to the first. A block's group also holds the
    ``features`` modules between it and the previous block (a DenseNet's transition and, for
    the first block, its stem); the last block's, those after it (DenseNet's final norm).
    """
    heads = [
        name
        for name, child in model.named_children()
        if name != "features" and any(True for _ in child.parameters())
    ]
    blocks = [name.removeprefix("features.") for name in model.block_names]
    children = [name for name, _ in model.get_submodule("features").named_children()]
    positions = [children.index(b) for b in blocks]
    groups: list[tuple[str, list[str]]] = []
    for i, block in enumerate(blocks):
        start = positions[i - 1] + 1 if i else 0
        stop = positions[i] + 1 if i + 1 < len(blocks) else len(children)
        groups.append((block, [f"features.{c}" for c in children[start:stop]]))
    return [("head", heads), *reversed(groups)]


def _reset(module: nn.Module) -> None:
    for sub in module.modules():
        reset = getattr(sub, "reset_parameters", None)
        if callable(reset):
            reset()
        running = getattr(sub, "reset_running_stats", None)
        if callable(running):
            running()


def randomised_copies(model: nn.Module, seed: int = 0) -> Iterator[tuple[str, nn.Module]]:
    """A deep copy of ``model``, re-initialised cumulatively along :func:`randomisation_groups`:
    yields (label of the group just randomised, the copy) after each step. ``model`` itself is
    left untouched. Re-initialisation is each layer's own (``reset_parameters``; batch norm's
    running statistics reset too), seeded."""
    work = copy.deepcopy(model).eval()
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for label, names in randomisation_groups(work):
            for name in names:
                _reset(work.get_submodule(name))
            yield label, work
    finally:
        torch.random.set_rng_state(generator_state)


@dataclass
class Cascade:
    """One method's randomisation curve on one model.

    Attributes:
        steps: "trained", then the label of each group randomised (cumulatively).
        rank_correlation: mean absolute Spearman with the trained model's maps at each step.
        ssim: mean SSIM with them at each step.
        blank: maps that were constant at each step (of ``images``).
    """

    model: str
    method: str
    images: int
    steps: list[str] = field(default_factory=list)
    rank_correlation: list[float] = field(default_factory=list)
    ssim: list[float] = field(default_factory=list)
    blank: list[int] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def final(self) -> float:
        """Rank correlation with the fully randomised model's maps."""
        return self.rank_correlation[-1]

    @property
    def passed(self) -> bool:
        return self.final < PASS_BELOW


def parameter_randomisation(
    model: nn.Module,
    name: str,
    images: torch.Tensor,
    methods: Mapping[str, tuple[MapFn, int]],
    targets: np.ndarray,
    seed: int = 0,
) -> list[Cascade]:
    """The cascading randomisation test of each method on ``model``.

    Args:
        name: the model's label in the result ("student", "teacher").
        images: the images to explain.
        methods: method -> (map function, how many of ``images`` it explains: SHAP's cost
            bounds its count).
        targets: the class explained per image at every step (the trained model's
            prediction: the same question asked of each randomised model).
    """
    cascades = {}
    reference = {}
    for method, (fn, n) in methods.items():
        t0 = time.perf_counter()
        maps = fn(model, images[:n], targets[:n])
        reference[method] = maps
        cascades[method] = Cascade(name, method, n, ["trained"], [1.0], [1.0])
        cascades[method].blank.append(int(blank_maps(maps).sum()))
        cascades[method].seconds += time.perf_counter() - t0
    for label, randomised in randomised_copies(model, seed):
        for method, (fn, n) in methods.items():
            t0 = time.perf_counter()
            maps = fn(randomised, images[:n], targets[:n])
            rho, structural = _similarity(reference[method], maps, absolute=True)
            c = cascades[method]
            c.steps.append(label)
            c.rank_correlation.append(rho)
            c.ssim.append(structural)
            c.blank.append(int(blank_maps(maps).sum()))
            c.seconds += time.perf_counter() - t0
    return list(cascades.values())


def random_other_classes(targets: np.ndarray, num_classes: int, seed: int = 0) -> np.ndarray:
    """For each target, a class drawn uniformly from the other ``num_classes - 1``."""
    if num_classes < 2:
        raise ValueError("the random-logit test needs at least 2 classes")
    rng = np.random.default_rng(seed)
    shift = rng.integers(1, num_classes, size=len(targets))
    return (np.asarray(targets) + shift) % num_classes


def random_logit(
    model: nn.Module,
    images: torch.Tensor,
    fn: MapFn,
    targets: np.ndarray,
    num_classes: int,
    seed: int = 0,
) -> tuple[float, float]:
    """Mean (signed) rank correlation and SSIM between the maps for ``targets`` and for a random
    other class per image (low for a class-sensitive method; negative: what speaks for one class
    speaks against the other)."""
    others = random_other_classes(targets, num_classes, seed)
    return _similarity(fn(model, images, targets), fn(model, images, others))
