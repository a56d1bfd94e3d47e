"""Pseudo-labels (``distill.pseudo``): the teacher's confident detections of its own classes become targets.

Why: in class-incremental data the old (base) objects are in the images but not labelled, so the detection
loss calls them background and trains the base scores there towards 0 — the forgetting that the response
KL can only fight, not remove (the two terms pull the same logit in opposite directions). Labelling those
objects with the teacher's detections removes the conflict at its source: the assigner makes them positives
with the teacher's class and box, so both the class score and the box regression of the base classes are
trained on the new images. This is the usual baseline of incremental detection (e.g. the pseudo-labels of
Peng et al., "Faster ILOD", 2020, and most methods since); here it is one switch and combines with the
distillation terms.

The labels win: a teacher detection that overlaps a labelled box (IoU above ``gt_iou``) is dropped, so a
novel object the teacher mistakes for a base class keeps its novel label. Horizontal and oriented boxes
alike (``obb``: rotated NMS and ProbIoU, as the oriented head's own NMS and loss).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.ops import box_iou

from visiontrain.detect.obb.geometry import probiou_matrix
from visiontrain.detect.obb.nms import postprocess_obb
from visiontrain.detect.postprocess import postprocess

LABELS_WIN_IOU = 0.5
"""A teacher box overlapping a labelled box above this IoU is not the teacher's to label (pseudo-labels) or
to distil (``distill.kl_skip_novel``): the label wins."""


def label_overlap(boxes: Tensor, labels: Tensor, obb: bool) -> Tensor:
    """``[N, M]`` overlap of teacher boxes with labelled boxes: IoU of xyxy boxes, or ProbIoU of xywhr boxes
    (``obb``, as the oriented head's NMS and loss measure it)."""
    return probiou_matrix(boxes, labels) if obb else box_iou(boxes, labels)


def teacher_pseudo_labels(decoded: Tensor, targets: Tensor, class_indices: Sequence[int], conf: float,
                          img_hw: tuple[int, int], iou: float = 0.7, gt_iou: float = LABELS_WIN_IOU,
                          max_det: int = 100, obb: bool = False) -> Tensor:
    """Extra target rows from the teacher's detections.

    Args:
        decoded: the teacher's ``[B, 4 + nc_t, A]`` eval output (xywh pixels, class probabilities), or with
            ``obb`` the oriented head's ``[B, 4 + nc_t + 1, A]`` (the angle last).
        targets: the batch's labels ``[N, 6] = (batch_idx, cls, x1, y1, x2, y2)`` in pixels, or with ``obb``
            ``[N, 7] = (batch_idx, cls, cx, cy, w, h, angle)``.
        class_indices: the student's class index of each teacher class.
        conf: keep teacher detections scoring above this (after NMS at ``iou``, at most ``max_det`` per image).
        img_hw: the input's ``(H, W)``: horizontal boxes are clipped to it, as labels are (less than a pixel
            left: dropped); an oriented box is kept when its centre is inside and both sides are >= 1 px.
        gt_iou: drop a detection whose IoU (ProbIoU for oriented boxes, as their NMS and loss use) with a
            labelled box of the same image is above this.

    Returns:
        ``[M, 6]`` (``[M, 7]`` with ``obb``) rows in the ``targets`` layout (student class indices), on
        ``targets``' device and dtype.
    """
    idx = torch.as_tensor(list(class_indices), device=decoded.device, dtype=torch.long)
    if obb:
        dets = postprocess_obb(decoded.detach().float(), conf=conf, iou=iou, max_det=max_det)
    else:
        dets = postprocess(decoded.detach().float(), conf=conf, iou=iou, max_det=max_det)
    width = 7 if obb else 6
    rows = []
    for b, det in enumerate(dets):
        if det.numel() == 0:
            continue
        boxes, cls = (det[:, :5] if obb else det[:, :4]).clone(), idx[det[:, -1].long()]
        if obb:
            inside = ((boxes[:, 0] >= 0) & (boxes[:, 0] <= img_hw[1]) & (boxes[:, 1] >= 0)
                      & (boxes[:, 1] <= img_hw[0]) & (boxes[:, 2] >= 1) & (boxes[:, 3] >= 1))
        else:
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, img_hw[1])
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, img_hw[0])
            inside = (boxes[:, 2] - boxes[:, 0] >= 1) & (boxes[:, 3] - boxes[:, 1] >= 1)  # not clipped to nothing
        boxes, cls = boxes[inside], cls[inside]
        gt = targets[targets[:, 0] == b, 2:width].to(boxes)
        if gt.numel() and boxes.numel():
            free = label_overlap(boxes, gt, obb).amax(1) <= gt_iou
            boxes, cls = boxes[free], cls[free]
        if boxes.numel():
            rows.append(torch.cat((boxes.new_full((len(boxes), 1), b), cls[:, None].to(boxes), boxes), 1))
    if not rows:
        return targets.new_zeros((0, width))
    return torch.cat(rows).to(device=targets.device, dtype=targets.dtype)
