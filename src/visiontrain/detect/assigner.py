"""Task-aligned assignment (TOOD, Feng et al. 2021) as YOLOv8 uses it, with bounded memory.

For every ground-truth box ``g`` and anchor ``a`` whose centre lies inside ``g`` (boxes with a side
shorter than ``min_gt_side`` are widened to it about their centre, for this test only):

    overlap(g, a) = max(CIoU(g, pred_box(a)), 0)
    metric(g, a)  = score(a, class(g)) ** alpha * overlap(g, a) ** beta

Each gt takes the ``topk`` anchors with the largest metric. An anchor taken by several gts goes to the gt
with the largest overlap among *all* gts containing it (the first such gt on ties, and the image's first
gt when all those overlaps are 0). The soft class target of a positive anchor is
``metric * max_overlap(g) / max_metric(g)``, the maxima taken over the anchors assigned to ``g``.

The results equal Ultralytics' ``TaskAlignedAssigner`` (ultralytics/utils/tal.py), including its quirks,
but the work is different. Ultralytics builds dense ``[B, M, A]`` tensors (M = most gts in an image):
at 400 gts, batch 8 and 8400 anchors, each is 27M elements. Here:

* candidate (gt, anchor) pairs are enumerated from the grid: the cells inside a gt form a rectangle on
  each level, so no gt is ever tested against all anchors;
* gts are processed in chunks of bounded size (``max_pairs``), so memory stays bounded whatever the
  number or size of the gts;
* top-k runs on short rows. ``torch.topk`` on the CPU selects with a heap over the row in order, and an
  element that is not larger than the current k-th best never enters it; so the zeros of a dense row
  that are not among its first ``k`` entries never influence the result. A row made of the dense row's
  first ``k`` entries followed by the gt's remaining candidates (and zero padding up to the length where
  ``torch.topk`` keeps the same algorithm, ``64 * k``) therefore selects exactly the same anchors as
  Ultralytics' dense row, zero-metric ties included (tests check this against Ultralytics). On other
  devices (CUDA's top-k breaks ties its own way) the zero-metric anchors taken may differ from
  Ultralytics' there; such anchors get a soft target of 0, but through the conflict rule above they
  can, rarely, move another positive anchor to a different gt.

As in Ultralytics, a gt whose coordinates sum to 0 or less (the ``(0, 0, 0, 0)`` padding box) is ignored.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from visiontrain.detect.boxes import bbox_ciou, xywh2xyxy, xyxy2xywh


class AssignerInputError(ValueError):
    """Inputs to the assigner have inconsistent shapes or values."""


@dataclass
class Assignment:
    """Result of :class:`TaskAlignedAssigner` for a batch of ``B`` images with ``A`` anchors each.

    Attributes:
        fg_mask: ``[B, A]`` bool, anchor is a positive.
        target_gt_idx: ``[B, A]`` long, index of the assigned gt among its image's gts (0 for background).
        target_labels: ``[B, A]`` long, class of that gt.
        target_boxes: ``[B, A, 4]`` xyxy pixels of that gt.
        target_scores: ``[B, A, C]`` soft one-hot class targets (0 for background anchors).
    """

    fg_mask: Tensor
    target_gt_idx: Tensor
    target_labels: Tensor
    target_boxes: Tensor
    target_scores: Tensor


def _axis_range(lo_edge: Tensor, hi_edge: Tensor, n: int, stride: float, eps: float) -> tuple[Tensor, Tensor]:
    """First and last cell ``i`` in ``0 .. n-1`` with ``c - lo_edge > eps`` and ``hi_edge - c > eps``,
    ``c = (i + 0.5) * stride`` (float32, as the anchors), for edges ``[N]``; ``last < first`` when none.

    ``floor(lo_edge / stride - 0.5)`` is at most two cells below the first passing cell (the division by
    a power-of-two stride is exact; the subtraction rounds by less than a cell), and both tests are
    monotone in ``i``, so trying three cells at each end with the exact test gives the exact bounds.
    """

    def centre(i: Tensor) -> Tensor:
        return (i.to(torch.float32) + 0.5) * stride

    first = torch.floor(lo_edge / stride - 0.5).long()
    first = torch.where(
        centre(first) - lo_edge > eps,
        first,
        torch.where(centre(first + 1) - lo_edge > eps, first + 1, first + 2),
    )
    last = torch.ceil(hi_edge / stride - 0.5).long()
    last = torch.where(
        hi_edge - centre(last) > eps, last, torch.where(hi_edge - centre(last - 1) > eps, last - 1, last - 2)
    )
    return first.clamp(min=0), last.clamp(max=n - 1)


class TaskAlignedAssigner:
    """Assign gts to anchors by the task-aligned metric (see the module docstring).

    Subclasses change the box format (``box_dim``), the overlap (:meth:`_overlap`) and the candidate cells
    (:meth:`_cell_ranges`, :meth:`_filter_pairs`): :class:`visiontrain.detect.obb.assigner.RotatedTaskAlignedAssigner`.

    Args:
        topk: anchors each gt takes.
        num_classes: C.
        alpha, beta: exponents of the classification score and of the overlap in the metric.
        eps: numerical guard of the normalisation and of the inside-the-box test.
        min_gt_side: sides shorter than this (pixels) are widened to it for the inside test;
            ``None`` = the second stride (16 for strides 8/16/32), like Ultralytics.
        max_pairs: bound on the (gt, anchor) candidate pairs handled at once; memory scales with it.
    """

    def __init__(
        self,
        topk: int = 10,
        num_classes: int = 80,
        alpha: float = 0.5,
        beta: float = 6.0,
        eps: float = 1e-9,
        min_gt_side: float | None = None,
        max_pairs: int = 1 << 19,
    ):
        if topk < 1 or num_classes < 1:
            raise AssignerInputError(f"topk ({topk}) and num_classes ({num_classes}) must be >= 1")
        self.topk = topk
        self.num_classes = num_classes
        self.alpha = alpha
        self.beta = beta
        self.eps = eps
        self.min_gt_side = min_gt_side
        self.max_pairs = max(int(max_pairs), 64 * topk)

    box_dim = 4  # xyxy

    @staticmethod
    def _overlap(gt_boxes: Tensor, pd_boxes: Tensor) -> Tensor:
        """Overlap of corresponding boxes ``[P, box_dim]`` -> ``[P]``, clamped at 0 (CIoU here)."""
        return bbox_ciou(gt_boxes, pd_boxes).clamp_(0)

    def _filter_pairs(self, gt_boxes: Tensor, gt: Tensor, row: Tensor, anchor: Tensor,
                      level_shapes: Sequence[tuple[int, int]], strides: Sequence[float]) -> tuple[Tensor, Tensor]:
        """Keep the enumerated pairs whose anchor is inside its gt; here the rectangles are exact already."""
        return row, anchor

    @torch.no_grad()
    def __call__(
        self,
        pd_scores: Tensor,
        pd_boxes: Tensor,
        level_shapes: Sequence[tuple[int, int]],
        strides: Sequence[float],
        gt_batch_idx: Tensor,
        gt_labels: Tensor,
        gt_boxes: Tensor,
    ) -> Assignment:
        """Assign.

        Args:
            pd_scores: ``[B, A, C]`` predicted class probabilities (after the sigmoid); may be a
                transposed view of a ``[B, C, A]`` tensor.
            pd_boxes: ``[B, A, 4]`` predicted xyxy boxes in pixels.
            level_shapes: ``(H_i, W_i)`` of each level; anchors are laid out as :func:`make_anchors` does.
            strides: stride of each level in pixels.
            gt_batch_idx: ``[N]`` image of each gt. The order of an image's gts defines ``target_gt_idx``.
            gt_labels: ``[N]`` class of each gt.
            gt_boxes: ``[N, 4]`` xyxy pixels.
        """
        self._check(pd_scores, pd_boxes, level_shapes, strides, gt_batch_idx, gt_labels, gt_boxes)
        B, A, C = pd_scores.shape
        device = pd_scores.device
        N = gt_boxes.shape[0]
        if N == 0:  # Ultralytics labels everything with the "no class" index C in this case only
            return Assignment(
                fg_mask=torch.zeros(B, A, dtype=torch.bool, device=device),
                target_gt_idx=torch.zeros(B, A, dtype=torch.long, device=device),
                target_labels=torch.full((B, A), C, dtype=torch.long, device=device),
                target_boxes=torch.zeros(B, A, self.box_dim, dtype=pd_boxes.dtype, device=device),
                target_scores=torch.zeros(B, A, C, dtype=pd_scores.dtype, device=device),
            )

        # gts sorted by image (stable): gt j of the sorted list is gt (j - image_start[img]) of its image
        gt_batch_idx = gt_batch_idx.long()
        order = torch.argsort(gt_batch_idx, stable=True)
        gt_img, gt_labels, gt_boxes = gt_batch_idx[order], gt_labels.long()[order], gt_boxes[order]
        per_image = torch.bincount(gt_img, minlength=B)
        image_start = per_image.cumsum(0) - per_image

        base, nx, ny, widths = self._cell_ranges(gt_boxes, level_shapes, strides)
        n_pairs = (nx * ny).sum(1)  # [N]

        # running per-anchor state over the flattened [B * A] anchors
        best_overlap = torch.zeros(B * A, dtype=pd_boxes.dtype, device=device)
        best_gt = torch.full((B * A,), -1, dtype=torch.long, device=device)
        best_metric = torch.zeros(B * A, dtype=pd_boxes.dtype, device=device)
        selected: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []

        flat_boxes = pd_boxes.reshape(-1, self.box_dim)
        class_major = pd_scores.transpose(1, 2).is_contiguous()  # a [B, C, A] tensor seen as [B, A, C]
        flat_scores = pd_scores.transpose(1, 2).reshape(-1) if class_major else pd_scores.reshape(-1)
        for gts, row_length in self._chunks(n_pairs, A):
            row, anchor = self._enumerate_pairs(base[gts], nx[gts], ny[gts], widths)
            row, anchor = self._filter_pairs(gt_boxes, gts, row, anchor, level_shapes, strides)
            gt = gts.index_select(0, row)
            key = gt_img.index_select(0, gt) * A + anchor  # anchor index in the flattened batch
            overlap = self._overlap(gt_boxes.index_select(0, gt), flat_boxes.index_select(0, key))
            label = gt_labels.index_select(0, gt)
            score_idx = (key - anchor) * C + label * A + anchor if class_major else key * C + label
            score = flat_scores.index_select(0, score_idx)
            metric = score.pow(self.alpha) * overlap.pow(self.beta)
            self._update_best(key, gt, overlap, metric, best_overlap, best_gt, best_metric)
            pick = self._topk_pairs(row, anchor, metric, gts.numel(), row_length, A)
            selected.append((key[pick], gt[pick], metric[pick], overlap[pick]))

        if not selected:
            selected.append(
                tuple(
                    torch.zeros(0, dtype=t.dtype, device=device)
                    for t in (best_gt, best_gt, best_metric, best_metric)
                )
            )
        sel_key, sel_gt, sel_metric, sel_overlap = (torch.cat(t) for t in zip(*selected))
        n_taken = torch.bincount(sel_key, minlength=B * A)
        fg = n_taken > 0

        # anchors taken by one gt keep it; anchors taken by several go to the best-overlap gt
        first_gt = image_start.repeat_interleave(A)  # [B * A] each anchor's image's first gt
        assigned = best_gt.where(best_gt >= 0, first_gt)
        metric_pos = best_metric.clone()
        overlap_pos = best_overlap.clone()
        single = n_taken[sel_key] == 1
        assigned[sel_key[single]] = sel_gt[single]
        metric_pos[sel_key[single]] = sel_metric[single]
        overlap_pos[sel_key[single]] = sel_overlap[single]

        fg_key = fg.nonzero().squeeze(1)
        fg_gt, fg_metric = assigned[fg_key], metric_pos[fg_key]
        max_metric = torch.zeros(N, dtype=fg_metric.dtype, device=device)
        max_metric.scatter_reduce_(0, fg_gt, fg_metric, "amax")
        max_overlap = torch.zeros(N, dtype=fg_metric.dtype, device=device)
        max_overlap.scatter_reduce_(0, fg_gt, overlap_pos[fg_key], "amax")
        fg_score = fg_metric * max_overlap[fg_gt] / (max_metric[fg_gt] + self.eps)

        # background anchors point at their image's first gt (as Ultralytics' argmax over zeros does)
        has_gt = (per_image > 0).repeat_interleave(A)
        target_global = first_gt.clamp(max=N - 1)
        target_global[fg_key] = fg_gt
        target_gt_idx = torch.where(fg, target_global - first_gt, 0)
        target_labels = torch.where(has_gt, gt_labels[target_global], 0)
        target_boxes = torch.where(has_gt[:, None], gt_boxes[target_global], 0)
        target_scores = torch.zeros(B * A, C, dtype=pd_scores.dtype, device=device)
        target_scores[fg_key, target_labels[fg_key]] = fg_score.to(pd_scores.dtype)
        return Assignment(
            fg_mask=fg.view(B, A),
            target_gt_idx=target_gt_idx.view(B, A),
            target_labels=target_labels.view(B, A),
            target_boxes=target_boxes.view(B, A, self.box_dim),
            target_scores=target_scores.view(B, A, C),
        )

    # --- steps ---------------------------------------------------------------------------------
    def _check(self, pd_scores, pd_boxes, level_shapes, strides, gt_batch_idx, gt_labels, gt_boxes) -> None:
        if pd_scores.ndim != 3 or pd_scores.shape[-1] != self.num_classes:
            raise AssignerInputError(
                f"pd_scores must be [B, A, {self.num_classes}], got {tuple(pd_scores.shape)}"
            )
        B, A, _ = pd_scores.shape
        if tuple(pd_boxes.shape) != (B, A, self.box_dim):
            raise AssignerInputError(f"pd_boxes must be [{B}, {A}, {self.box_dim}], got {tuple(pd_boxes.shape)}")
        if len(level_shapes) != len(strides):
            raise AssignerInputError(f"{len(level_shapes)} level shapes but {len(strides)} strides")
        n_anchors = sum(h * w for h, w in level_shapes)
        if n_anchors != A:
            raise AssignerInputError(
                f"level shapes {list(level_shapes)} give {n_anchors} anchors, preds have {A}"
            )
        N = gt_boxes.shape[0]
        if gt_boxes.shape != (N, self.box_dim) or gt_labels.shape != (N,) or gt_batch_idx.shape != (N,):
            raise AssignerInputError(
                f"gt_boxes [N, {self.box_dim}], gt_labels [N], gt_batch_idx [N] expected, got {tuple(gt_boxes.shape)}, "
                f"{tuple(gt_labels.shape)}, {tuple(gt_batch_idx.shape)}"
            )
        if N and not torch.isfinite(gt_boxes).all():
            row = int((~torch.isfinite(gt_boxes)).any(1).nonzero()[0])
            raise AssignerInputError(f"gt box {row} is not finite: {gt_boxes[row].tolist()}")

    def _cell_ranges(
        self, gt_boxes: Tensor, level_shapes: Sequence[tuple[int, int]], strides: Sequence[float]
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Cells whose centre is inside each gt (widened to ``min_gt_side``), as rectangles.

        The inside test ``cx - x1 > eps and cy - y1 > eps and x2 - cx > eps and y2 - cy > eps`` is
        separable and monotone along each axis, so per gt and level the cells inside form a rectangle.
        Its bounds are found with the same float32 arithmetic as the dense test (see
        :func:`_axis_range`), so the cells are exactly those of a dense test.

        Returns:
            ``base [N, L]`` anchor index of the rectangle's first cell, ``nx [N, L]`` and ``ny [N, L]``
            its size in cells (0 when empty), and ``row_stride [L]`` (level widths).
        """
        min_side = self.min_gt_side
        if min_side is None:
            min_side = float(strides[1] if len(strides) > 1 else strides[0])
        valid = gt_boxes.sum(-1, keepdim=True) > 0
        xywh = xyxy2xywh(gt_boxes)
        widen = (xywh[:, 2:] < min_side) & valid
        xywh[:, 2:] = torch.where(
            widen, torch.tensor(min_side, dtype=xywh.dtype, device=xywh.device), xywh[:, 2:]
        )
        box = xywh2xyxy(xywh)
        bases, nxs, nys, offset = [], [], [], 0
        for (h, w), stride in zip(level_shapes, strides):
            s = float(stride)
            x_lo, x_hi = _axis_range(box[:, 0], box[:, 2], w, s, self.eps)
            y_lo, y_hi = _axis_range(box[:, 1], box[:, 3], h, s, self.eps)
            nx = (x_hi - x_lo + 1).clamp(min=0)
            ny = (y_hi - y_lo + 1).clamp(min=0)
            empty = (nx == 0) | (ny == 0) | ~valid[:, 0]
            bases.append(offset + y_lo.clamp(min=0) * w + x_lo.clamp(min=0))
            nxs.append(nx.masked_fill(empty, 0))
            nys.append(ny.masked_fill(empty, 0))
            offset += h * w
        widths = torch.tensor([w for _, w in level_shapes], device=gt_boxes.device)
        return torch.stack(bases, 1), torch.stack(nxs, 1), torch.stack(nys, 1), widths

    def _chunks(self, n_pairs: Tensor, A: int) -> list[tuple[Tensor, int]]:
        """Group the gts that have candidates into chunks, each with its top-k row length.

        A gt's row holds the dense row's first ``topk`` entries and its other candidates, padded to at
        least ``64 * topk`` (:meth:`_topk_pairs`); rows as long as the dense row are dense rows (length
        ``A``). Gts are taken in order of row length, so a chunk pads little, and a chunk holds at most
        ``max_pairs`` candidate pairs and ``max_pairs`` row entries. Returns ``(gt indices, row length)``.
        """
        k = self.topk
        length = (n_pairs + k).clamp(min=64 * k).clamp(max=A)
        active = (n_pairs > 0).nonzero().squeeze(1)
        order = active[torch.argsort(length[active], stable=True)]
        chunks: list[tuple[Tensor, int]] = []
        start, pairs, longest = 0, 0, 0
        for i, (n, ell) in enumerate(zip(n_pairs[order].tolist(), length[order].tolist())):
            if i > start and (pairs + n > self.max_pairs or (i - start + 1) * ell > self.max_pairs):
                chunks.append((order[start:i], longest))
                start, pairs = i, 0
            pairs += n
            longest = ell
        if order.numel() > start:
            chunks.append((order[start:], longest))
        return chunks

    @staticmethod
    def _enumerate_pairs(base: Tensor, nx: Tensor, ny: Tensor, widths: Tensor) -> tuple[Tensor, Tensor]:
        """The cells of the rectangles ``base, nx, ny [G, L]`` (one row per gt, one column per level).

        Returns ``row [P]`` (which of the G gts) and ``anchor [P]`` (index within the image), sorted by
        row then anchor (levels are concatenated in order, each row-major).
        """
        G, L = base.shape
        n = (nx * ny).reshape(-1)  # [G * L], gt-major then level
        owner = torch.repeat_interleave(torch.arange(G * L, device=base.device), n)
        # one gather of each rectangle's (base, nx, width, first pair) instead of four
        rects = torch.stack((base.reshape(-1), nx.reshape(-1), widths.repeat(G), n.cumsum(0) - n), 1)
        rect_base, rect_nx, rect_w, rect_start = rects.index_select(0, owner).unbind(1)
        within = torch.arange(owner.numel(), device=base.device) - rect_start
        dy = torch.div(within, rect_nx, rounding_mode="floor")
        anchor = rect_base + dy * rect_w + (within - dy * rect_nx)
        return torch.div(owner, L, rounding_mode="floor"), anchor

    def _update_best(self, key, gt, overlap, metric, best_overlap, best_gt, best_metric) -> None:
        """Fold a chunk's pairs into the per-anchor best positive overlap, its gt (the smallest index on
        ties, whatever the chunk order) and that pair's metric. ``key, gt, overlap, metric [P]``."""
        chunk_best = torch.zeros_like(best_overlap).scatter_reduce_(0, key, overlap, "amax")
        is_top = (overlap == chunk_best.index_select(0, key)) & (overlap > 0)
        big = torch.iinfo(torch.long).max
        chunk_gt = torch.full_like(best_gt, big).scatter_reduce_(0, key, torch.where(is_top, gt, big), "amin")
        winner = is_top & (gt == chunk_gt.index_select(0, key))
        chunk_metric = torch.zeros_like(best_metric).scatter_reduce_(
            0, key, torch.where(winner, metric, 0), "amax"
        )
        better = (chunk_best > best_overlap) | (
            (chunk_best == best_overlap) & (chunk_best > 0) & (chunk_gt < best_gt)
        )
        best_overlap.copy_(torch.where(better, chunk_best, best_overlap))
        best_gt.copy_(torch.where(better, chunk_gt, best_gt))
        best_metric.copy_(torch.where(better, chunk_metric, best_metric))

    def _topk_pairs(
        self, row: Tensor, anchor: Tensor, metric: Tensor, n_rows: int, length: int, A: int
    ) -> Tensor:
        """Indices of the pairs each gt takes; reproduces ``torch.topk`` on the dense metric rows.

        ``row, anchor, metric [P]`` sorted by row then anchor. A dense row (``length == A``) puts a pair
        at column ``anchor``. A compact row puts the pairs with ``anchor < topk`` at column ``anchor``
        (the dense row's head) and the others after them in order, the rest being zeros (module
        docstring: the selection is the dense row's).
        """
        k, device = self.topk, metric.device
        P = row.numel()
        pair_id = torch.arange(P, device=device)
        if length >= A:  # dense rows
            flat = row * A + anchor
            values = torch.zeros(n_rows * A, dtype=metric.dtype, device=device).index_put_((flat,), metric)
            owner = torch.full((n_rows * A,), -1, dtype=torch.long, device=device).index_put_(
                (flat,), pair_id
            )
            top = torch.topk(values.view(n_rows, A), min(k, A), dim=-1).indices
            chosen = owner.view(n_rows, A).gather(1, top).reshape(-1)
            return chosen[chosen >= 0]

        head = anchor < k
        n_row = torch.bincount(row, minlength=n_rows)
        n_head = torch.zeros(n_rows, dtype=torch.long, device=device).scatter_add_(0, row, head.long())
        row_start = n_row.cumsum(0) - n_row
        # rest pairs follow the head pairs within a row, so their rank is position - n_head
        column = torch.where(head, anchor, pair_id - (row_start + n_head - k).index_select(0, row))
        values = torch.zeros(n_rows * length, dtype=metric.dtype, device=device)
        values.index_put_((row * length + column,), metric)
        top = torch.topk(values.view(n_rows, length), k, dim=-1).indices  # [n_rows, k]

        rest_rank = top - k
        rest_ok = (rest_rank >= 0) & (rest_rank < (n_row - n_head)[:, None])
        chosen = torch.where(rest_ok, (row_start + n_head)[:, None] + rest_rank, -1)
        head_ids = head.nonzero().squeeze(1)
        if head_ids.numel():
            head_owner = torch.full((n_rows * k,), -1, dtype=torch.long, device=device)
            head_owner[row[head_ids] * k + anchor[head_ids]] = head_ids
            in_head = top < k
            from_head = head_owner.view(n_rows, k).gather(1, top.clamp(max=k - 1))
            chosen = torch.where(in_head, from_head, chosen)
        chosen = chosen.reshape(-1)
        return chosen[chosen >= 0]
