"""Rotated NMS for the YOLOv8-OBB eval output: threshold, per-class (or agnostic) ProbIoU Fast-NMS, top ``max_det``.

The same selection as Ultralytics' ``non_max_suppression(rotated=True)``: candidates above ``conf`` (best class,
or every class above ``conf`` with ``multi_label``), at most ``max_nms`` by score, then Fast-NMS (Bolya et al.
2019): in score order, a box is dropped when any higher-scoring box of its class — kept or not — has a ProbIoU
with it above ``iou``. Two differences in the work, not the rule: classes are kept apart by masking the
similarity matrix instead of shifting boxes by ``class * 7680`` pixels (the shift rounds coordinates), and the
``[n, n]`` similarity matrix is built in row blocks, so memory stays ``O(block * n)`` at ``max_nms = 30000``
boxes (Ultralytics' dense matrix would take 3.6 GB there).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from visiontrain.detect.obb.geometry import probiou
from visiontrain.detect.postprocess import PostprocessInputError


def fast_nms_rotated(boxes: Tensor, scores: Tensor, iou: float, groups: Tensor | None = None,
                     block: int = 2048) -> Tensor:
    """Indices of the boxes ``[n, 5]`` (xywhr) kept by ProbIoU Fast-NMS, by decreasing score. ``groups [n]``: only
    boxes of the same group suppress each other (``None``: all)."""
    n = boxes.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    order = torch.argsort(scores, descending=True)
    b = boxes[order]
    g = groups[order] if groups is not None else None
    suppressed = torch.zeros(n, dtype=torch.bool, device=boxes.device)
    cols = torch.arange(n, device=boxes.device)
    for s in range(0, n, block):
        e = min(s + block, n)
        sim = probiou(b[s:e, None, :], b[None, :, :])  # [e - s, n]
        hit = (sim > iou) & (cols[None, :] > cols[s:e, None])  # only later (lower-scoring) boxes
        if g is not None:
            hit &= g[s:e, None] == g[None, :]
        suppressed |= hit.any(0)
    return order[~suppressed]


def postprocess_obb(preds: Tensor, conf: float = 0.25, iou: float = 0.7, max_det: int = 300, agnostic: bool = False,
                    max_nms: int = 30000, multi_label: bool = False, classes: Sequence[int] | None = None
                    ) -> list[Tensor]:
    """Oriented detections per image.

    Args:
        preds: ``[B, 4 + nc + 1, A]``: (cx, cy, w, h) pixels, class probabilities, angle (the OBB eval output).
        conf, iou, max_det, agnostic, max_nms, multi_label, classes: as :func:`visiontrain.detect.postprocess.postprocess`.

    Returns:
        ``B`` tensors ``[n_i, 7]`` = (cx, cy, w, h, angle, score, class), by decreasing score.
    """
    if preds.ndim != 3 or preds.shape[1] < 6:
        raise PostprocessInputError(
            f"postprocess_obb expects predictions [B, 4 + nc + 1, A] (the OBB model's eval output), got "
            f"{tuple(preds.shape)}")
    if not (0.0 <= conf <= 1.0 and 0.0 <= iou <= 1.0):
        raise PostprocessInputError(f"conf ({conf}) and iou ({iou}) must be within [0, 1]")
    nc = preds.shape[1] - 5
    out = []
    for x in preds.transpose(1, 2):  # [A, 4 + nc + 1]
        cls_scores = x[:, 4:4 + nc]
        x = x[cls_scores.amax(1) > conf]
        box = torch.cat((x[:, :4], x[:, -1:]), 1)
        cls_scores = x[:, 4:4 + nc]
        if multi_label and nc > 1:
            i, j = (cls_scores > conf).nonzero(as_tuple=True)
            box, score, cls = box[i], cls_scores[i, j], j
        else:
            score, cls = cls_scores.max(1)
            keep = score > conf
            box, score, cls = box[keep], score[keep], cls[keep]
        if classes is not None:
            keep = torch.isin(cls, torch.as_tensor(list(classes), device=cls.device))
            box, score, cls = box[keep], score[keep], cls[keep]
        if score.numel() > max_nms:
            top = score.argsort(descending=True)[:max_nms]
            box, score, cls = box[top], score[top], cls[top]
        keep = fast_nms_rotated(box, score, iou, None if agnostic else cls)[:max_det]
        out.append(torch.cat((box[keep], score[keep, None], cls[keep, None].to(box.dtype)), 1))
    return out
