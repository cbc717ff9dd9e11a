"""The student as one forward-only graph: logits, per-block feature maps and its CAM.

ONNX has no autograd, so the CAM's gradient is written out by hand. Behind the CAM block the
student is conv3x3 -> BatchNorm (eval: a per-channel affine) -> ReLU -> 2x2 max-pool per block,
then global average pooling and a linear head, so the class score's gradient is exact in closed
form, block by block from the head down:

- head and GAP: d logit_c / dA = W[c] / (h * w) at every position;
- max-pool: the gradient goes to the window's maximum, the first one in torch's scan order (top
  left, top right, bottom left, bottom right) when several positions hold it: flat image regions
  give equal positive maxima (on such images the CAM differed from torch's by up to 1.0 while
  they shared the gradient); windows of zeros are cut by the ReLU below;
- ReLU: kept where its output is positive (as torch's ``threshold_backward``);
- BatchNorm (eval): times ``gamma / sqrt(running_var + eps)`` per channel;
- conv3x3, stride 1, padding 1: ``conv_transpose2d`` with the same weights.

Every CAM variant (:mod:`kdray.explain.cam_methods`: Grad-CAM, HiResCAM, LayerCAM, Grad-CAM++,
XGrad-CAM) is a closed-form combination of that exact gradient and the layer's activations, so the
graph computes any of them exactly (:func:`kdray.explain.cam_methods.combine`, the same torch code
the batched scorer runs). Every output is computed as :func:`kdray.explain.feature_maps` and
:func:`kdray.explain.grad_cam` compute it, so the exported copy explains what the served student
explains (parity is checked at export, :mod:`kdray.edge.export`). Only the student exports: the teacher's dense blocks would need
their own backward, and it is the model the paper moves off the server.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdray.explain.cam_methods import PAPER_METHOD, check_method, combine, scale_to_input
from kdray.explain.layer_maps import reduce_activation
from kdray.models import StudentCNN

__all__ = ["NEAR_TIE", "OUTPUTS", "EdgeStudent", "near_tie_images", "window_gaps"]

OUTPUTS = ("logits", "probabilities", "feature_maps", "gradcam", "cam_class")

# A max-pool window whose two largest values differ by less than this share of the layer's largest
# activation (in that image) may pick its maximum differently in onnxruntime and in torch, whose
# convolutions round differently; the CAM's gradient then takes another path, and the CAM (scaled
# by its own maximum) moves by more than float32 rounding: a valid CAM of the same student either
# way, as torch itself gives at another batch size. Measured on the default run's eye_disease
# champion (6 blocks, HiResCAM at block1, 200 images, 2026-12-07): the 4 images more than 1e-3 off
# (up to 2.7e-2) all had a window within 2.9e-7; with none within 1e-6 (137 images) the largest
# gap was 6e-7. Exact ties are not near: the graph takes torch's first maximum.
NEAR_TIE = 1e-6


def _first_maximum(at_max: torch.Tensor) -> torch.Tensor:
    """Of each 2x2 window's positions that hold its maximum (1.0), only the first in torch's
    max-pool scan order (row by row), where its backward pass sends the gradient. Rows and columns
    beyond the pooled area (odd sides) keep what they had (zero)."""
    channels, h, w = at_max.shape[1], at_max.shape[2], at_max.shape[3]
    hh, ww = h // 2, w // 2
    core = at_max[:, :, : 2 * hh, : 2 * ww].reshape(-1, channels, hh, 2, ww, 2)
    tl, tr = core[:, :, :, 0, :, 0], core[:, :, :, 0, :, 1]
    bl, br = core[:, :, :, 1, :, 0], core[:, :, :, 1, :, 1]
    tr_first = tr * (1 - tl)
    bl_first = bl * (1 - tl) * (1 - tr)
    br_first = br * (1 - tl) * (1 - tr) * (1 - bl)
    top = torch.stack([tl, tr_first], dim=-1)  # (N, C, hh, ww, 2)
    bottom = torch.stack([bl_first, br_first], dim=-1)
    first = torch.stack([top, bottom], dim=3).reshape(-1, channels, 2 * hh, 2 * ww)
    return F.pad(first, (0, w - 2 * ww, 0, h - 2 * hh))


def window_gaps(act: torch.Tensor) -> torch.Tensor:
    """Per image, the smallest gap between a 2x2 max-pool window's two largest values, as a share
    of the image's largest activation; only windows with a positive maximum (the ReLU cuts the
    rest) and unequal top two (exact ties resolve as torch's) count. (N, C, H, W) -> (N,), inf
    where no window counts."""
    n, c, h, w = act.shape
    core = act[:, :, : h // 2 * 2, : w // 2 * 2].reshape(n, c, h // 2, 2, w // 2, 2)
    windows = core.permute(0, 1, 2, 4, 3, 5).reshape(n, -1, 4)
    top = windows.topk(2, dim=-1).values
    scale = act.reshape(n, -1).amax(1).clamp(min=torch.finfo(act.dtype).tiny)
    gap = (top[..., 0] - top[..., 1]) / scale[:, None]
    counts = (top[..., 0] > 0) & (gap > 0)
    return torch.where(counts, gap, torch.full_like(gap, float("inf"))).amin(1)


@torch.no_grad()
def near_tie_images(
    student: StudentCNN, images: torch.Tensor, cam_block: int, rel: float = NEAR_TIE
) -> torch.Tensor:
    """Which images' CAM at ``cam_block`` (1-based) float32 rounding can move: a window of a
    max-pool the CAM's gradient passes back through (those of the blocks after ``cam_block``)
    holds two values within ``rel`` (:data:`NEAR_TIE`). ``images``: uint8 (N, 3, H, W), as the
    graph takes them. Returns a bool (N,) tensor."""
    student = student.eval()
    a = student.norm(images.to(torch.float32) / 255.0)
    near = torch.zeros(len(images), dtype=torch.bool)
    for i, block in enumerate(student.features):
        act = block.relu(block.bn(block.conv(a)))
        if i >= cam_block:
            near |= window_gaps(act) < rel
        a = block.pool(act)
    return near


class EdgeStudent(nn.Module):
    """A trained :class:`~kdray.models.StudentCNN` with its explanations as graph outputs.

    Input ``image``: uint8 (N, 3, H, W), RGB, already at the model's input size. Outputs (in
    :data:`OUTPUTS` order): ``logits`` (N, K); ``probabilities`` (N, K); ``feature_maps`` (N, L, H,
    W) in [0, 1], the channel mean of every block, as :func:`kdray.explain.feature_maps`;
    ``gradcam`` (N, H, W) in [0, 1]: the CAM (``cam_method``) of the predicted class at
    ``cam_block``, as :func:`kdray.explain.grad_cam`; ``cam_class`` (N,) int64, the class it
    explains.

    Args:
        student: the trained student (its weights are shared, not copied).
        cam_block: 1-based index of the block the CAM reads (the model's layer).
        cam_method: the CAM variant.
    """

    def __init__(self, student: StudentCNN, cam_block: int, cam_method: str = PAPER_METHOD) -> None:
        super().__init__()
        depth = len(student.features)
        if not 1 <= cam_block <= depth:
            raise ValueError(f"cam_block must be 1..{depth}, got {cam_block}")
        self.student = student.eval()
        self.cam_block = cam_block
        self.cam_method = check_method(cam_method)

    def _backward_block(self, block: nn.Module, x_in: torch.Tensor, grad_out: torch.Tensor):
        """d score / d(block input) from d score / d(block output), for conv-BN-ReLU-pool."""
        pre = block.bn(block.conv(x_in))
        act = block.relu(pre)
        pooled = block.pool(act)
        h, w = act.shape[-2], act.shape[-1]
        up_pooled = pooled.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
        up_grad = grad_out.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
        # The pool floors odd sides: the last row/column got no gradient.
        pad = (0, w - up_grad.shape[-1], 0, h - up_grad.shape[-2])
        up_pooled = F.pad(up_pooled, pad, value=float("inf"))
        up_grad = F.pad(up_grad, pad)
        first = _first_maximum((act == up_pooled).to(act.dtype))
        grad_act = up_grad * first * (act > 0).to(act.dtype)
        bn = block.bn
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        grad_conv = grad_act * scale[None, :, None, None]
        return F.conv_transpose2d(grad_conv, block.conv.weight, padding=1)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = image.to(torch.float32) / 255.0
        size = (x.shape[2], x.shape[3])
        blocks = list(self.student.features)
        acts = []
        a = self.student.norm(x)
        for block in blocks:
            acts.append(a)  # each block's input, kept for the backward pass
            a = block(a)
        pooled = torch.flatten(self.student.pool(a), 1)
        logits = self.student.head(pooled)
        probabilities = torch.softmax(logits, dim=1)
        maps = torch.stack([reduce_activation(b, size) for b in [*acts[1:], a]], 1)

        cam_class = logits.argmax(1)
        weight = self.student.head.weight[cam_class]  # (N, C_last)
        grad = weight[:, :, None, None].expand_as(a) / float(a.shape[-2] * a.shape[-1])
        for i in range(len(blocks) - 1, self.cam_block - 1, -1):
            grad = self._backward_block(blocks[i], acts[i], grad)
        target = acts[self.cam_block] if self.cam_block < len(blocks) else a
        cam = scale_to_input(combine(self.cam_method, target, grad), size)
        return logits, probabilities, maps, cam, cam_class
