"""Box geometry for the YOLOv8 head: anchors, distance <-> box coding, format conversion, CIoU.

Conventions: ``xyxy`` is (x1, y1, x2, y2), ``xywh`` is (centre x, centre y, width, height). Anchor points
are cell centres in *grid units* of their level (multiply by the level's stride for pixels), exactly as
Ultralytics lays them out: levels in the given order, each row-major (y outer, x inner).

Why CIoU is written here rather than taken from ``torchvision.ops.complete_box_iou_loss``: torchvision
places its ``eps`` differently (Ultralytics adds ``eps`` to both heights and to the union; torchvision
adds it to the union and the enclosing diagonal only). The two agree to ~1.5e-6 relative, but the
task-aligned assigner ranks anchors by ``score**0.5 * ciou**6`` and picks the top 10, so a last-bit
difference can reorder near-ties and change which anchors are positive. Assignment parity with
Ultralytics needs the same arithmetic, operation for operation, so :func:`bbox_ciou` follows the CIoU
formula (Zheng et al., 2020) with Ultralytics' ``eps`` placement. The format conversions do match
Ultralytics bit for bit, so they are torchvision's ``box_convert``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.ops import box_convert


def xywh2xyxy(boxes: Tensor) -> Tensor:
    """``[..., 4]`` (cx, cy, w, h) -> ``[..., 4]`` (x1, y1, x2, y2)."""
    return box_convert(boxes, "cxcywh", "xyxy")


def xyxy2xywh(boxes: Tensor) -> Tensor:
    """``[..., 4]`` (x1, y1, x2, y2) -> ``[..., 4]`` (cx, cy, w, h)."""
    return box_convert(boxes, "xyxy", "cxcywh")


def level_shapes(feats: Sequence[Tensor] | Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """``(H_i, W_i)`` of each level, from feature maps ``[B, C, H_i, W_i]`` or from ``(H_i, W_i)`` pairs."""
    return [tuple(f.shape[-2:]) if isinstance(f, Tensor) else (int(f[0]), int(f[1])) for f in feats]


def make_anchors(
    feats: Sequence[Tensor] | Sequence[tuple[int, int]],
    strides: Sequence[float] | Tensor,
    offset: float = 0.5,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """Anchor points of all levels.

    Args:
        feats: feature maps ``[B, C, H_i, W_i]`` (only their shape, dtype and device are used) or
            ``(H_i, W_i)`` pairs.
        strides: stride of each level in pixels.
        offset: position of the point inside its cell (0.5 = centre).

    Returns:
        ``anchor_points [A, 2]`` (x, y) in grid units of their level and ``stride_tensor [A, 1]``,
        with ``A = sum(H_i * W_i)``.
    """
    shapes = level_shapes(feats)
    if len(shapes) != len(strides):
        raise ValueError(f"make_anchors: {len(shapes)} feature levels but {len(strides)} strides")
    if feats and isinstance(feats[0], Tensor):
        dtype, device = feats[0].dtype, feats[0].device
    points, stride_cols = [], []
    for (h, w), stride in zip(shapes, strides):
        sx = torch.arange(w, dtype=dtype, device=device) + offset
        sy = torch.arange(h, dtype=dtype, device=device) + offset
        gy, gx = torch.meshgrid(sy, sx, indexing="ij")
        points.append(torch.stack((gx, gy), -1).view(-1, 2))
        stride_cols.append(torch.full((h * w, 1), float(stride), dtype=dtype, device=device))
    return torch.cat(points), torch.cat(stride_cols)


def dist2bbox(distance: Tensor, anchor_points: Tensor, xywh: bool = False) -> Tensor:
    """Distances ``[..., 4]`` (left, top, right, bottom) from ``anchor_points [..., 2]`` -> boxes ``[..., 4]``."""
    lt, rb = distance.chunk(2, -1)
    x1y1 = anchor_points - lt
    x2y2 = anchor_points + rb
    if xywh:
        return torch.cat(((x1y1 + x2y2) / 2, x2y2 - x1y1), -1)
    return torch.cat((x1y1, x2y2), -1)


def bbox2dist(anchor_points: Tensor, bbox: Tensor, reg_max: int | None = None) -> Tensor:
    """Boxes ``[..., 4]`` xyxy -> distances ``[..., 4]`` (l, t, r, b) from ``anchor_points [..., 2]``.

    With ``reg_max`` the distances are clamped to ``[0, reg_max - 0.01]`` (the DFL target range for
    ``reg_max + 1`` bins).
    """
    x1y1, x2y2 = bbox.chunk(2, -1)
    dist = torch.cat((anchor_points - x1y1, x2y2 - anchor_points), -1)
    if reg_max is not None:
        dist = dist.clamp(0, reg_max - 0.01)
    return dist


def dfl_decode(pred_dist: Tensor, reg_max: int = 16) -> Tensor:
    """Expected distance of each side: ``[..., 4 * reg_max]`` logits -> ``[..., 4]`` in grid units.

    The logits are laid out side-major (``l`` bins, then ``t`` bins, ...), as the YOLOv8 head emits them.
    """
    proj = torch.arange(reg_max, dtype=pred_dist.dtype, device=pred_dist.device)
    return pred_dist.view(*pred_dist.shape[:-1], 4, reg_max).softmax(-1).matmul(proj)


def bbox_ciou(box1: Tensor, box2: Tensor, eps: float = 1e-7) -> Tensor:
    """Complete IoU of corresponding xyxy boxes ``[..., 4]`` and ``[..., 4]`` -> ``[...]``.

    ``CIoU = IoU - rho^2 / c^2 - alpha * v`` with ``rho`` the centre distance, ``c`` the diagonal of the
    enclosing box, ``v = 4 / pi^2 * (atan(w2 / h2) - atan(w1 / h1))^2`` and ``alpha = v / (1 - IoU + v)``
    treated as a constant in the gradient. ``eps`` is added to both heights, to the union and to
    ``c^2``, as Ultralytics does (see the module docstring). The argument order matters in the last
    bit only; the assigner calls ``bbox_ciou(gt, pred)`` and the loss ``bbox_ciou(pred, target)``.
    """
    b1_x1, b1_y1, b1_x2, b1_y2 = box1.chunk(4, -1)
    b2_x1, b2_y1, b2_x2, b2_y2 = box2.chunk(4, -1)
    w1, h1 = b1_x2 - b1_x1, b1_y2 - b1_y1 + eps
    w2, h2 = b2_x2 - b2_x1, b2_y2 - b2_y1 + eps

    inter = (b1_x2.minimum(b2_x2) - b1_x1.maximum(b2_x1)).clamp_(0) * (
        b1_y2.minimum(b2_y2) - b1_y1.maximum(b2_y1)
    ).clamp_(0)
    union = w1 * h1 + w2 * h2 - inter + eps
    iou = inter / union

    enclose_w = b1_x2.maximum(b2_x2) - b1_x1.minimum(b2_x1)
    enclose_h = b1_y2.maximum(b2_y2) - b1_y1.minimum(b2_y1)
    diag2 = enclose_w.pow(2) + enclose_h.pow(2) + eps
    centre_dist2 = ((b2_x1 + b2_x2 - b1_x1 - b1_x2).pow(2) + (b2_y1 + b2_y2 - b1_y1 - b1_y2).pow(2)) / 4
    v = (4 / math.pi**2) * ((w2 / h2).atan() - (w1 / h1).atan()).pow(2)
    with torch.no_grad():
        alpha = v / (1 - iou + v + eps)
    return (iou - (centre_dist2 / diag2 + v * alpha)).squeeze(-1)
