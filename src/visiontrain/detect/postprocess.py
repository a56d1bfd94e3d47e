"""Turn the detection head's eval output into per-image detections: threshold, per-class NMS, top ``max_det``.

Same selection as Ultralytics' ``non_max_suppression`` (ultralytics/utils/nms.py) for ``[B, 4 + nc, A]``
predictions. One deliberate difference: Ultralytics separates classes by shifting boxes by
``class * 7680`` pixels before a single NMS, which rounds coordinates (to 1/64 px at class 19, 1/16 px
at class 79) and so changes IoUs by up to ~1e-3 for small boxes; here ``torchvision.ops.batched_nms``
keeps classes apart without moving them. The two can disagree only about a pair whose IoU is within that
rounding of the threshold.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.ops import batched_nms

from visiontrain.detect.boxes import xywh2xyxy


class PostprocessInputError(ValueError):
    """Bad predictions or thresholds given to :func:`postprocess`."""


def postprocess(
    preds: Tensor,
    conf: float = 0.25,
    iou: float = 0.7,
    max_det: int = 300,
    agnostic: bool = False,
    max_nms: int = 30000,
    multi_label: bool = False,
    classes: Sequence[int] | None = None,
) -> list[Tensor]:
    """Detections per image.

    Args:
        preds: ``[B, 4 + nc, A]``: boxes as (cx, cy, w, h) in pixels, then class probabilities.
        conf: keep scores strictly above this.
        iou: NMS IoU threshold (a box is suppressed by a higher-scoring one of the same class, or of any
            class with ``agnostic``, whose IoU with it is above this).
        max_det: detections kept per image, best first.
        agnostic: NMS across classes.
        max_nms: at most this many boxes (the highest scoring) per image enter NMS.
        multi_label: a box may be kept once per class scoring above ``conf`` (as Ultralytics, only
            when ``nc > 1``); otherwise only its best class counts.
        classes: keep only these class indices.

    Returns:
        ``B`` tensors ``[n_i, 6]`` = (x1, y1, x2, y2, score, class), sorted by decreasing score.
    """
    if preds.ndim != 3 or preds.shape[1] < 5:
        raise PostprocessInputError(
            f"postprocess expects predictions [B, 4 + nc, A] (the model's eval output), got {tuple(preds.shape)}"
        )
    if not (0.0 <= conf <= 1.0 and 0.0 <= iou <= 1.0):
        raise PostprocessInputError(f"conf ({conf}) and iou ({iou}) must be within [0, 1]")
    B, _, A = preds.shape
    nc = preds.shape[1] - 4
    x = preds.transpose(1, 2)  # [B, A, 4 + nc], a view
    class_scores = x[..., 4:]

    # candidates of the whole batch at once
    if multi_label and nc > 1:
        img, anchor, cls = (class_scores > conf).nonzero(as_tuple=True)
        score = class_scores[img, anchor, cls]
    else:
        best, best_cls = class_scores.max(-1)  # [B, A]
        img, anchor = (best > conf).nonzero(as_tuple=True)
        score, cls = best[img, anchor], best_cls[img, anchor]
    if classes is not None:
        keep = torch.isin(cls, torch.as_tensor(list(classes), device=cls.device))
        img, anchor, cls, score = img[keep], anchor[keep], cls[keep], score[keep]
    boxes = xywh2xyxy(x[img, anchor, :4])

    out: list[Tensor] = []
    counts = torch.bincount(img, minlength=B).tolist()
    for boxes_i, score_i, cls_i in zip(boxes.split(counts), score.split(counts), cls.split(counts)):
        if score_i.numel() > max_nms:
            top = score_i.argsort(descending=True)[:max_nms]
            boxes_i, score_i, cls_i = boxes_i[top], score_i[top], cls_i[top]
        groups = torch.zeros_like(cls_i) if agnostic else cls_i
        keep = batched_nms(boxes_i, score_i, groups, iou)[:max_det]
        out.append(torch.cat((boxes_i[keep], score_i[keep, None], cls_i[keep, None].to(boxes_i.dtype)), 1))
    return out
