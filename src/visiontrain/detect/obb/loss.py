"""YOLOv8-OBB loss: rotated task-aligned assignment, ProbIoU box loss, DFL, BCE classes, angle loss.

With ``S = max(sum of all soft targets, 1)`` and ``w`` a positive anchor's soft target at its gt's class:

    box   = sum_fg (1 - ProbIoU(pred, target; floor 0.01)) * w / S        (boxes in grid units)
    dfl   = sum_fg mean_sides DFL(pred_dist, rotated ltrb of the target) * w / S
    cls   = sum_all BCE(logits, soft targets) / S
    angle = sum_fg exp(-log(w_t / h_t)^2 / 9) * sin^2(2 * wrap_pi(angle - angle_t)) * w / S

each multiplied by its gain (7.5, 0.5, 1.5, 1.0 as Ultralytics' defaults ``box, cls, dfl, angle``). The terms
equal Ultralytics' ``v8OBBLoss`` per-term values (8.4: its angle term down-weights near-square boxes, whose
angle is ill-defined; ``angle_gain=0`` gives the original YOLOv8-OBB recipe of three terms). Gts with a
side under 2 pixels are dropped before assignment, as Ultralytics does. As in
:class:`~visiontrain.detect.loss.DetectionLoss` the terms are not multiplied by the batch size.

Targets are ``[N, 7] = (batch_idx, cls, cx, cy, w, h, angle)`` in input pixels and radians.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from visiontrain.detect.assigner import Assignment
from visiontrain.detect.boxes import dfl_decode, make_anchors
from visiontrain.detect.loss import DetectionLossInputError, check_pred_maps, check_targets, dfl_loss
from visiontrain.detect.obb.assigner import RotatedTaskAlignedAssigner
from visiontrain.detect.obb.geometry import probiou
from visiontrain.detect.obb.model import angle_from_logit, dist_to_rbox, rbox_to_dist
from visiontrain.engine.distributed import global_mean_normalizer

MIN_SIDE = 2.0  # gts with a side below this (pixels) are dropped, as in Ultralytics


def angle_loss(pred_angle: Tensor, target: Tensor, lambda_val: float = 3.0) -> Tensor:
    """Per-box angle loss ``[F]`` for ``pred_angle [F]`` and targets ``[F, 5]`` (xywhr): ``sin^2(2 d)`` with ``d`` the
    angle difference wrapped to ``[-pi/2, pi/2]``, weighted by ``exp(-log(w/h)^2 / lambda^2)``."""
    log_ar = torch.log((target[:, 2] + 1e-9) / (target[:, 3] + 1e-9))
    scale = torch.exp(-(log_ar**2) / (lambda_val**2))
    delta = pred_angle - target[:, 4]
    delta = delta - torch.round(delta / torch.pi) * torch.pi
    return scale * torch.sin(2 * delta) ** 2


class OBBLoss:
    """Loss of the YOLOv8-OBB head. Call it with the head's training-mode output (a list of
    ``[B, 4 * reg_max + nc + 1, H_i, W_i]`` maps), targets ``[N, 7] = (batch_idx, cls, cx, cy, w, h, angle)`` in
    pixels and the input size ``(H, W)``. Returns ``{'box', 'cls', 'dfl', 'angle'}``, already weighted."""

    def __init__(self, nc: int, reg_max: int = 16, strides: Sequence[float] = (8, 16, 32), box_gain: float = 7.5,
                 cls_gain: float = 0.5, dfl_gain: float = 1.5, angle_gain: float = 1.0, topk: int = 10,
                 alpha: float = 0.5, beta: float = 6.0, global_normalizer: bool = False, max_pairs: int = 1 << 19):
        if reg_max < 2:
            raise DetectionLossInputError(f"reg_max must be >= 2 for DFL box regression, got {reg_max}")
        self.nc, self.reg_max = nc, reg_max
        self.strides = tuple(float(s) for s in strides)
        self.box_gain, self.cls_gain, self.dfl_gain, self.angle_gain = box_gain, cls_gain, dfl_gain, angle_gain
        self.assigner = RotatedTaskAlignedAssigner(topk=topk, num_classes=nc, alpha=alpha, beta=beta,
                                                   max_pairs=max_pairs)
        self.global_normalizer = global_normalizer

    def __call__(self, preds: Sequence[Tensor], targets: Tensor, img_size: int | Sequence[int]) -> dict[str, Tensor]:
        return self.loss_and_assignment(preds, targets, img_size)[0]

    def loss_and_assignment(self, preds: Sequence[Tensor], targets: Tensor, img_size: int | Sequence[int]
                            ) -> tuple[dict[str, Tensor], Assignment]:
        """The loss terms and the assignment (``target_boxes [B, A, 5]`` xywhr pixels); float32, autocast off."""
        shapes = self._check_preds(preds, img_size)
        targets = self._check_targets(targets, preds[0].shape[0], preds[0].device)
        with torch.autocast(device_type=preds[0].device.type, enabled=False):
            return self._loss(preds, targets, shapes)

    def _loss(self, preds: Sequence[Tensor], targets: Tensor, shapes: list[tuple[int, int]]
              ) -> tuple[dict[str, Tensor], Assignment]:
        R = 4 * self.reg_max
        flat = torch.cat([p.flatten(2) for p in preds], 2).float()  # [B, R + nc + 1, A]
        pred_dist = flat[:, :R].permute(0, 2, 1).contiguous()  # [B, A, R]
        logits = flat[:, R:R + self.nc]  # [B, nc, A]
        pred_angle = angle_from_logit(flat[:, R + self.nc:]).permute(0, 2, 1)  # [B, A, 1] radians
        anchors, stride = make_anchors(shapes, self.strides, device=flat.device)  # [A, 2], [A, 1] grid units

        targets = targets[(targets[:, 4] >= MIN_SIDE) & (targets[:, 5] >= MIN_SIDE)]
        with torch.no_grad():
            boxes = dist_to_rbox(dfl_decode(pred_dist, self.reg_max), pred_angle, anchors)  # grid units
            boxes_px = torch.cat((boxes * stride, pred_angle), -1)  # [B, A, 5]
            assignment = self.assigner(logits.sigmoid().transpose(1, 2), boxes_px, shapes, self.strides,
                                       targets[:, 0].long(), targets[:, 1].long(), targets[:, 2:7])
        target_scores = assignment.target_scores
        score_sum = (global_mean_normalizer(target_scores.sum().detach()) if self.global_normalizer
                     else target_scores.sum().clamp(min=1))
        fg_b, fg_a = assignment.fg_mask.nonzero(as_tuple=True)
        weight = target_scores[fg_b, fg_a].sum(-1)  # [F]

        all_negative = F.binary_cross_entropy_with_logits(logits, logits.new_zeros(()).expand_as(logits),
                                                          reduction="sum")
        positive_part = (logits[fg_b, assignment.target_labels[fg_b, fg_a], fg_a] * weight).sum()
        cls = (all_negative - positive_part) / score_sum

        dist_fg = pred_dist[fg_b, fg_a]  # [F, R]
        angle_fg = pred_angle[fg_b, fg_a]  # [F, 1]
        anchors_fg, stride_fg = anchors[fg_a], stride[fg_a]
        pred_box = torch.cat((dist_to_rbox(dfl_decode(dist_fg, self.reg_max), angle_fg, anchors_fg), angle_fg), -1)
        target = assignment.target_boxes[fg_b, fg_a]
        target = torch.cat((target[:, :4] / stride_fg, target[:, 4:]), -1)  # grid units
        box = ((1.0 - probiou(pred_box, target, floor=0.01)) * weight).sum() / score_sum
        target_ltrb = rbox_to_dist(target[:, :4], target[:, 4:], anchors_fg, self.reg_max - 1)
        dfl = (dfl_loss(dist_fg.view(-1, 4, self.reg_max), target_ltrb).mean(-1) * weight).sum() / score_sum
        ang = (angle_loss(angle_fg[:, 0], target) * weight).sum() / score_sum
        terms = {"box": box * self.box_gain, "cls": cls * self.cls_gain, "dfl": dfl * self.dfl_gain,
                 "angle": ang * self.angle_gain}
        return terms, assignment

    # --- validation -----------------------------------------------------------------------------
    def _check_preds(self, preds: Sequence[Tensor], img_size: int | Sequence[int]) -> list[tuple[int, int]]:
        return check_pred_maps(preds, self.strides, img_size, self.nc, self.reg_max, "OBBLoss", "the OBB head's",
                               extra=1)

    def _check_targets(self, targets: Tensor, batch_size: int, device: torch.device) -> Tensor:
        return check_targets(targets, batch_size, self.nc, device, "OBB targets", "(batch_idx, cls, cx, cy, w, h, angle)")
