"""Class activation map variants: how a layer's activations and class gradient become one map.

Every variant reads the same two tensors at the target layer, the activations ``A`` (N, K, h, w)
and the gradient of the explained class score ``g`` (N, K, h, w), and differs only in how it
combines them (then the ReLU, and the min-max scaling to the input size all share):

* ``gradcam`` (Selvaraju et al. 2017, the paper's): ``sum_k mean(g_k) A_k``. Channel weights
  averaged over the map: where negative evidence outweighs positive at every position the map is
  zero everywhere (blank).
* ``hirescam`` (Draelos & Carin 2020): ``sum_k g_k * A_k``, position by position; for a network
  ending in global average pooling and a linear head it is exactly each position's contribution
  to the class score, so it cannot point where the score does not come from.
* ``layercam`` (Jiang et al. 2021): ``sum_k relu(g_k) * A_k``: positive gradients only.
* ``gradcampp``, Grad-CAM++ (Chattopadhay et al. 2018): channel weights from higher-order gradient terms.
* ``xgradcam`` (Fu et al. 2020): channel weights ``sum(g_k * A_k) / sum(A_k)``.

:func:`combine` is the torch form (the batched scorer and the ONNX explain graph use it);
:func:`reference_class` names pytorch-grad-cam's implementation of the same variant, which
:func:`kdray.explain.gradcam.grad_cam` runs and the tests hold :func:`combine` to.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

__all__ = [
    "CAM_FILE",
    "CAM_METHODS",
    "CAM_TITLES",
    "PAPER_METHOD",
    "CamMethod",
    "check_method",
    "combine",
    "reference_class",
    "scale_to_input",
]

CAM_FILE = "cam.json"  # beside model.json: a model's CAM variant and layer (kdray.explain.scoring)
CamMethod = Literal["gradcam", "hirescam", "layercam", "gradcampp", "xgradcam"]
CAM_METHODS: tuple[str, ...] = ("gradcam", "hirescam", "layercam", "gradcampp", "xgradcam")
PAPER_METHOD = "gradcam"
CAM_TITLES = {
    "gradcam": "Grad-CAM",
    "hirescam": "HiResCAM",
    "layercam": "LayerCAM",
    "gradcampp": "Grad-CAM++",
    "xgradcam": "XGrad-CAM",
}


def check_method(method: str) -> str:
    """``method`` if it is a known variant.

    Raises:
        ValueError: an unknown variant, with the allowed ones.
    """
    if method not in CAM_METHODS:
        raise ValueError(f"unknown CAM method {method!r}; expected one of {list(CAM_METHODS)}")
    return method


def combine(method: str, activations: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """The variant's map at the layer's resolution, after the ReLU: (N, h, w), >= 0.

    Args:
        method: one of :data:`CAM_METHODS`.
        activations: (N, K, h, w) the layer's output.
        grads: (N, K, h, w) the explained class score's gradient at that output.
    """
    a, g = activations.float(), grads.float()
    if method == "gradcam":
        cam = (g.mean(dim=(2, 3), keepdim=True) * a).sum(1)
    elif method == "hirescam":
        cam = (g * a).sum(1)
    elif method == "layercam":
        cam = (torch.relu(g) * a).sum(1)
    elif method == "gradcampp":
        g2 = g * g
        g3 = g2 * g
        total = a.sum(dim=(2, 3), keepdim=True)
        alpha = g2 / (2 * g2 + total * g3 + 1e-6)
        alpha = torch.where(g != 0, alpha, torch.zeros_like(alpha))
        weights = (torch.relu(g) * alpha).sum(dim=(2, 3), keepdim=True)
        cam = (weights * a).sum(1)
    elif method == "xgradcam":
        total = a.sum(dim=(2, 3), keepdim=True)
        weights = (g * a / (total + 1e-7)).sum(dim=(2, 3), keepdim=True)
        cam = (weights * a).sum(1)
    else:
        check_method(method)
        raise AssertionError(method)
    return torch.relu(cam)


def _minmax(cam: torch.Tensor) -> torch.Tensor:
    """pytorch-grad-cam's ``scale_cam_image`` without the resize: (x - min) / (1e-7 + max)."""
    flat = cam.flatten(1)
    lo = flat.min(1).values[:, None, None]
    shifted = cam - lo
    return shifted / (1e-7 + shifted.flatten(1).max(1).values[:, None, None])


def scale_to_input(cam: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, h, w) maps to (N, H, W) in [0, 1] exactly as pytorch-grad-cam scales them: min-max,
    bilinear resize (half-pixel centres, as OpenCV), min-max again. A map that is zero
    everywhere stays zero (blank)."""
    cam = _minmax(cam)
    cam = F.interpolate(cam[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    return _minmax(cam)


def reference_class(method: str) -> type:
    """pytorch-grad-cam's class for the variant (the reference implementation)."""
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, XGradCAM

    return {
        "gradcam": GradCAM,
        "hirescam": HiResCAM,
        "layercam": LayerCAM,
        "gradcampp": GradCAMPlusPlus,
        "xgradcam": XGradCAM,
    }[check_method(method)]
