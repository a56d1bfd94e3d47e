"""YOLOv8 detection loss: task-aligned assignment, CIoU box loss, distribution focal loss, BCE classes.

    box = sum_fg (1 - CIoU(pred, target)) * w / S          w = sum over classes of the anchor's soft target
    dfl = sum_fg mean_sides DFL(pred_dist, target_ltrb) * w / S
    cls = sum_all BCE(logits, soft targets) / S             S = max(sum of all soft targets, 1)

each multiplied by its gain (7.5, 1.5, 0.5). The terms equal Ultralytics' ``v8DetectionLoss`` per-term
values (its third return value, ``loss.detach()``). Note that Ultralytics' first return value, the one it
back-propagates, is these terms multiplied by the batch size; :class:`DetectionLoss` returns them
unscaled and leaves that choice to the caller (the trainer's learning rate absorbs it).

Several processes: with ``global_normalizer=True`` (the training task's setting) ``S`` is the sum over
the global batch of every rank, divided by the number of ranks, so DDP's average of the ranks'
gradients is the gradient of one process seeing the whole batch (per-rank ``S`` would weigh a rank with
few targets more). In a world of one it is the plain ``S``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from visiontrain.detect.assigner import Assignment, TaskAlignedAssigner
from visiontrain.detect.boxes import bbox2dist, bbox_ciou, dfl_decode, dist2bbox, level_shapes, make_anchors
from visiontrain.engine.distributed import global_mean_normalizer


class DetectionLossInputError(ValueError):
    """Predictions or targets given to the detection loss are malformed."""


def dfl_loss(pred_logits: Tensor, target: Tensor) -> Tensor:
    """Distribution focal loss (Li et al., 2020) per side.

    Args:
        pred_logits: ``[..., reg_max]`` logits over the distances ``0 .. reg_max - 1``.
        target: ``[...]`` distances, clamped to ``[0, reg_max - 1.01]``.

    Returns:
        ``[...]``: ``-(w_l * log p[floor(t)] + w_r * log p[floor(t) + 1])`` with ``w_l = floor(t) + 1 - t``
        and ``w_r = 1 - w_l``.
    """
    reg_max = pred_logits.shape[-1]
    target = target.clamp(0, reg_max - 1 - 0.01)
    left = target.long()
    right = left + 1
    w_left = right - target
    w_right = 1 - w_left
    logp = F.log_softmax(pred_logits, dim=-1)
    lp_left = logp.gather(-1, left.unsqueeze(-1)).squeeze(-1)
    lp_right = logp.gather(-1, right.unsqueeze(-1)).squeeze(-1)
    return -(lp_left * w_left + lp_right * w_right)


class DetectionLoss:
    """Loss of the YOLOv8 detection head (anchor-free, DFL box regression, task-aligned assignment).

    Call it with the head's training-mode output, a list of ``[B, 4 * reg_max + nc, H_i, W_i]`` maps for
    ``strides``, the targets ``[N, 6] = (batch_idx, cls, x1, y1, x2, y2)`` in input pixels and the input
    size ``(H, W)`` (or an int for a square input). Returns ``{'box', 'cls', 'dfl'}``: scalar, already
    weighted terms. :meth:`loss_and_assignment` also returns the :class:`Assignment` (the tests compare it with Ultralytics' assigner).
    """

    def __init__(
        self,
        nc: int,
        reg_max: int = 16,
        strides: Sequence[float] = (8, 16, 32),
        box_gain: float = 7.5,
        cls_gain: float = 0.5,
        dfl_gain: float = 1.5,
        topk: int = 10,
        alpha: float = 0.5,
        beta: float = 6.0,
        global_normalizer: bool = False,
    ):
        if reg_max < 2:
            raise DetectionLossInputError(f"reg_max must be >= 2 for DFL box regression, got {reg_max}")
        self.nc = nc
        self.reg_max = reg_max
        self.strides = tuple(float(s) for s in strides)
        self.box_gain, self.cls_gain, self.dfl_gain = box_gain, cls_gain, dfl_gain
        self.assigner = TaskAlignedAssigner(topk=topk, num_classes=nc, alpha=alpha, beta=beta)
        self.global_normalizer = global_normalizer

    def __call__(
        self, preds: Sequence[Tensor], targets: Tensor, img_size: int | Sequence[int]
    ) -> dict[str, Tensor]:
        return self.loss_and_assignment(preds, targets, img_size)[0]

    def loss_and_assignment(
        self, preds: Sequence[Tensor], targets: Tensor, img_size: int | Sequence[int]
    ) -> tuple[dict[str, Tensor], Assignment]:
        """The loss terms and the assignment they used. The loss is computed in float32 whatever the
        predictions' dtype, with autocast switched off (a bf16 decode would move boxes by ~0.4%)."""
        shapes = self._check_preds(preds, img_size)
        B = preds[0].shape[0]
        targets = self._check_targets(targets, B, preds[0].device)
        with torch.autocast(device_type=preds[0].device.type, enabled=False):
            return self._loss_and_assignment(preds, targets, shapes)

    def _loss_and_assignment(
        self, preds: Sequence[Tensor], targets: Tensor, shapes: list[tuple[int, int]]
    ) -> tuple[dict[str, Tensor], Assignment]:
        R = 4 * self.reg_max
        # box distributions anchor-major [B, A, R], as Ultralytics decodes them (bit-equal boxes for the
        # assignment); class logits stay channel-major [B, nc, A]: the BCE is elementwise and needs no
        # transposed copy
        pred_dist = torch.cat([p[:, :R].flatten(2) for p in preds], 2).float().permute(0, 2, 1).contiguous()
        logits = torch.cat([p[:, R:].flatten(2) for p in preds], 2).float()
        anchor_points, stride_tensor = make_anchors(
            shapes, self.strides, device=logits.device
        )  # [A, 2], [A, 1]

        with torch.no_grad():  # decoded boxes of every anchor, for the assignment only
            pred_boxes_px = dist2bbox(dfl_decode(pred_dist, self.reg_max), anchor_points) * stride_tensor
            assignment = self.assigner(
                logits.sigmoid().transpose(1, 2),
                pred_boxes_px,
                shapes,
                self.strides,
                targets[:, 0].long(),
                targets[:, 1].long(),
                targets[:, 2:6],
            )
        target_scores = assignment.target_scores
        score_sum = (global_mean_normalizer(target_scores.sum().detach()) if self.global_normalizer
                     else target_scores.sum().clamp(min=1))
        fg_b, fg_a = assignment.fg_mask.nonzero(as_tuple=True)
        weight = target_scores[fg_b, fg_a].sum(-1)  # [F], the soft target at the gt's class

        # BCE(x, t) = softplus(x) - x * t, and t is non-zero only at a positive's class
        all_negative = F.binary_cross_entropy_with_logits(
            logits, logits.new_zeros(()).expand_as(logits), reduction="sum"
        )
        positive_part = (logits[fg_b, assignment.target_labels[fg_b, fg_a], fg_a] * weight).sum()
        cls = (all_negative - positive_part) / score_sum

        # box terms on the positives only (gradients elsewhere are zero, as in Ultralytics)
        dist_fg = pred_dist[fg_b, fg_a]  # [F, 4 * reg_max]
        anchors_fg, stride_fg = anchor_points[fg_a], stride_tensor[fg_a]
        pred_box = dist2bbox(dfl_decode(dist_fg, self.reg_max), anchors_fg)  # grid units
        target_box = assignment.target_boxes[fg_b, fg_a] / stride_fg
        box = ((1.0 - bbox_ciou(pred_box, target_box)) * weight).sum() / score_sum
        target_ltrb = bbox2dist(anchors_fg, target_box, self.reg_max - 1)  # [F, 4]
        dfl_per_side = dfl_loss(dist_fg.view(-1, 4, self.reg_max), target_ltrb)  # [F, 4]
        dfl = (dfl_per_side.mean(-1) * weight).sum() / score_sum

        terms = {"box": box * self.box_gain, "cls": cls * self.cls_gain, "dfl": dfl * self.dfl_gain}
        return terms, assignment

    # --- validation -----------------------------------------------------------------------------
    def _check_preds(self, preds: Sequence[Tensor], img_size: int | Sequence[int]) -> list[tuple[int, int]]:
        return check_pred_maps(preds, self.strides, img_size, self.nc, self.reg_max, "DetectionLoss", "the head's")

    def _check_targets(self, targets: Tensor, batch_size: int, device: torch.device) -> Tensor:
        return check_targets(targets, batch_size, self.nc, device, "targets", "(batch_idx, cls, x1, y1, x2, y2)")


def check_pred_maps(preds: Sequence[Tensor], strides: Sequence[float], img_size: int | Sequence[int], nc: int,
                    reg_max: int, loss: str, head: str, extra: int = 0) -> list[tuple[int, int]]:
    """The ``(H_i, W_i)`` of each raw map after checking there is one ``[B, 4·reg_max + nc + extra, H/s, W/s]``
    map per stride ``s`` (``extra``: channels after the classes, e.g. an OBB head's angle); else a
    :class:`DetectionLossInputError` naming the map, its shape and the expected one."""
    if isinstance(preds, Tensor) or len(preds) != len(strides):
        raise DetectionLossInputError(
            f"{loss} expects a list of {len(strides)} maps (one per stride {strides}), "
            f"got {type(preds).__name__}{'' if isinstance(preds, Tensor) else f' of {len(preds)}'}; "
            f"pass {head} training-mode output")
    H, W = (img_size, img_size) if isinstance(img_size, int) else (int(img_size[0]), int(img_size[1]))
    channels = 4 * reg_max + nc + extra
    B = preds[0].shape[0]
    for i, (p, s) in enumerate(zip(preds, strides)):
        expected = (B, channels, -(-H // int(s)), -(-W // int(s)))
        if p.ndim != 4 or tuple(p.shape) != expected:
            raise DetectionLossInputError(
                f"prediction map {i} (stride {s:g}) has shape {tuple(p.shape)}, expected {expected} for input "
                f"size {H}x{W}, nc={nc}, reg_max={reg_max} (4 * reg_max + nc{' + ' + str(extra) if extra else ''} "
                "channels)")
    return level_shapes(preds)


def check_targets(targets: Tensor, batch_size: int, nc: int, device: torch.device, what: str,
                  columns: str) -> Tensor:
    """``targets`` as float32 on ``device`` after checking its shape (``[N, len(columns)]``), that every value
    is finite, and that batch indices and classes are whole numbers in range; else a
    :class:`DetectionLossInputError` naming the first bad row."""
    width = columns.count(",") + 1
    if targets.ndim != 2 or targets.shape[1] != width:
        raise DetectionLossInputError(
            f"{what} must be [N, {width}] = {columns} in pixels, got {tuple(targets.shape)}")
    targets = targets.to(device=device, dtype=torch.float32)
    if targets.numel() == 0:
        return targets
    if not torch.isfinite(targets).all():
        row = int((~torch.isfinite(targets)).any(1).nonzero()[0])
        raise DetectionLossInputError(f"targets row {row} is not finite: {targets[row].tolist()}")
    bidx, cls = targets[:, 0], targets[:, 1]
    bad = (bidx != bidx.round()) | (bidx < 0) | (bidx >= batch_size)
    if bad.any():
        row = int(bad.nonzero()[0])
        raise DetectionLossInputError(
            f"targets row {row}: batch index {bidx[row].item():g} is not an image of this batch (0..{batch_size - 1})")
    bad = (cls != cls.round()) | (cls < 0) | (cls >= nc)
    if bad.any():
        row = int(bad.nonzero()[0])
        raise DetectionLossInputError(
            f"targets row {row}: class {cls[row].item():g} is outside 0..{nc - 1} (the loss has nc={nc})")
    return targets
