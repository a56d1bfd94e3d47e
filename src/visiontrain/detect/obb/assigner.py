"""Rotated task-aligned assignment (Ultralytics' ``RotatedTaskAlignedAssigner``), memory bounded by chunking.

The same assignment as :class:`visiontrain.detect.assigner.TaskAlignedAssigner` (top-k by
``score**alpha * overlap**beta``, conflicts to the best-overlap gt, soft targets) with, for oriented boxes
``xywhr`` (pixels, radians):

* overlap = ProbIoU (:func:`visiontrain.detect.obb.geometry.probiou`), clamped at 0;
* an anchor is a candidate of a gt when its centre ``p`` lies in the gt's rectangle (sides shorter than
  ``min_gt_side`` widened to it, as in the horizontal case): with corners ``a, b, _, d``,
  ``0 <= (p - a)·(b - a) <= |b - a|^2`` and ``0 <= (p - a)·(d - a) <= |d - a|^2`` (bounds included), computed
  in float32 with Ultralytics' operations so the candidate sets are identical.

Memory stays bounded as in the horizontal assigner: candidates are enumerated per gt from the cells of the
rectangle's axis-aligned bounding box (widened by a pixel, then filtered by the exact test above) and
processed in chunks of at most ``max_pairs`` pairs, never as dense ``[B, M, A]`` tensors. A gt whose five
numbers sum to 0 or less (the zero padding row) is ignored, as in Ultralytics.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from visiontrain.detect.assigner import TaskAlignedAssigner, _axis_range
from visiontrain.detect.obb.geometry import probiou, xywhr_to_corners


class RotatedTaskAlignedAssigner(TaskAlignedAssigner):
    """Task-aligned assignment of oriented gts ``[N, 5]`` xywhr to anchors with predicted ``[B, A, 5]`` xywhr
    boxes (pixels). Arguments and result (:class:`~visiontrain.detect.assigner.Assignment`, with
    ``target_boxes [B, A, 5]``) as for the horizontal assigner."""

    box_dim = 5

    @staticmethod
    def _overlap(gt_boxes: Tensor, pd_boxes: Tensor) -> Tensor:
        return probiou(gt_boxes, pd_boxes).clamp_(0)

    def _min_side(self, strides: Sequence[float]) -> float:
        if self.min_gt_side is not None:
            return float(self.min_gt_side)
        return float(strides[1] if len(strides) > 1 else strides[0])

    def _widened(self, gt_boxes: Tensor, strides: Sequence[float]) -> tuple[Tensor, Tensor]:
        """``(widened boxes [N, 5], valid [N])``: sides below the minimum set to it for valid gts."""
        valid = gt_boxes.sum(-1) > 0
        side = self._min_side(strides)
        out = gt_boxes.clone()
        wh = out[:, 2:4]
        out[:, 2:4] = torch.where((wh < side) & valid[:, None], torch.tensor(side, dtype=wh.dtype,
                                                                              device=wh.device), wh)
        return out, valid

    def _cell_ranges(self, gt_boxes: Tensor, level_shapes: Sequence[tuple[int, int]], strides: Sequence[float]
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Cells of each gt's (widened) rotated rectangle's bounding box, one pixel larger on every side (a
        superset of the candidates; :meth:`_filter_pairs` applies the exact test). Same layout as the parent's."""
        boxes, valid = self._widened(gt_boxes, strides)
        corners = xywhr_to_corners(boxes)  # [N, 4, 2]
        lo = corners.amin(1) - 1.0
        hi = corners.amax(1) + 1.0
        bases, nxs, nys, offset = [], [], [], 0
        for (h, w), stride in zip(level_shapes, strides):
            s = float(stride)
            x_lo, x_hi = _axis_range(lo[:, 0], hi[:, 0], w, s, 0.0)
            y_lo, y_hi = _axis_range(lo[:, 1], hi[:, 1], h, s, 0.0)
            nx = (x_hi - x_lo + 1).clamp(min=0)
            ny = (y_hi - y_lo + 1).clamp(min=0)
            empty = (nx == 0) | (ny == 0) | ~valid
            bases.append(offset + y_lo.clamp(min=0) * w + x_lo.clamp(min=0))
            nxs.append(nx.masked_fill(empty, 0))
            nys.append(ny.masked_fill(empty, 0))
            offset += h * w
        widths = torch.tensor([w for _, w in level_shapes], device=gt_boxes.device)
        return torch.stack(bases, 1), torch.stack(nxs, 1), torch.stack(nys, 1), widths

    def _anchor_centres(self, level_shapes: Sequence[tuple[int, int]], strides: Sequence[float],
                        device: torch.device) -> Tensor:
        """``[A, 2]`` anchor centres in pixels, ``(i + 0.5) * stride`` (cached per shapes and device)."""
        key = (tuple(map(tuple, level_shapes)), tuple(map(float, strides)), str(device))
        if getattr(self, "_centres_key", None) != key:
            parts = []
            for (h, w), s in zip(level_shapes, strides):
                ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=torch.float32) + 0.5,
                                        torch.arange(w, device=device, dtype=torch.float32) + 0.5, indexing="ij")
                parts.append(torch.stack((xs, ys), -1).reshape(-1, 2) * float(s))
            self._centres_key, self._centres = key, torch.cat(parts)
        return self._centres

    def _filter_pairs(self, gt_boxes: Tensor, gt: Tensor, row: Tensor, anchor: Tensor,
                      level_shapes: Sequence[tuple[int, int]], strides: Sequence[float]) -> tuple[Tensor, Tensor]:
        """Keep the pairs whose anchor centre is inside the gt's widened rectangle (bounds included)."""
        boxes, _ = self._widened(gt_boxes[gt], strides)  # [G, 5] the chunk's gts
        corners = xywhr_to_corners(boxes)  # [G, 4, 2]
        a, b, d = corners[:, 0], corners[:, 1], corners[:, 3]
        ab, ad = b - a, d - a
        norm_ab = (ab * ab).sum(-1)
        norm_ad = (ad * ad).sum(-1)
        p = self._anchor_centres(level_shapes, strides, gt_boxes.device).index_select(0, anchor)  # [P, 2]
        a_r, ab_r, ad_r = a.index_select(0, row), ab.index_select(0, row), ad.index_select(0, row)
        apx, apy = p[:, 0] - a_r[:, 0], p[:, 1] - a_r[:, 1]
        dot_ab = apx * ab_r[:, 0] + apy * ab_r[:, 1]
        dot_ad = apx * ad_r[:, 0] + apy * ad_r[:, 1]
        keep = (dot_ab >= 0) & (dot_ab <= norm_ab.index_select(0, row)) & (dot_ad >= 0) & (
            dot_ad <= norm_ad.index_select(0, row))
        return row[keep], anchor[keep]
