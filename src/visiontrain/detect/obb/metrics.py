"""Oriented-box detection metrics: COCO-style mAP with exact polygon IoU, DOTA's VOC AP50, ProbIoU mAP.

:class:`OBBEvaluator` collects, per image, predictions ``[n, 7] (cx, cy, w, h, angle, score, cls)`` (xywhr in
original pixels) and ground truth ``polygons [m, 4, 2]``, ``classes [m]`` and optionally ``difficult [m]``;
:meth:`OBBEvaluator.compute` returns:

* ``mAP50-95``, ``mAP50``, ``mAP75`` and per-class ``AP50-95`` / ``AP50``: COCO's AP definition exactly as
  for horizontal boxes (:mod:`visiontrain.detect.metrics`): per image and class the ``MAX_DETS`` highest
  scoring detections, greedy matching in score order (each gt once, the last gt of highest IoU on ties,
  IoU >= threshold), IoU thresholds 0.50:0.05:0.95, 101-point interpolated precision, classes without gt
  left out. The IoU is the exact IoU of the polygons (:mod:`visiontrain.detect.obb.polygon_iou`). With
  axis-aligned boxes the figures equal ``faster_coco_eval``'s bbox AP (tests). ``difficult`` gts count
  as ordinary gts here (COCO has no such flag).
* ``dota_AP50``: the DOTA devkit's task-1 figure (``dota_evaluation_task1.py``: ``voc_eval(ovthresh=0.5,
  use_07_metric=True)``): detections of a class over all images by score, each matched to the gt of
  highest polygon IoU in its image; IoU > 0.5 and that gt not yet taken -> TP, already taken -> FP,
  difficult -> ignored; 11-point VOC07 AP over the non-difficult gts; ``dota_per_class`` per class.
* ``mAP50-95_probiou``, ``mAP50_probiou``: Ultralytics' OBB validation figure (``OBBValidator``): per image, the
  detections in score order each take the unclaimed gt of highest ProbIoU among the gts of their class (at
  every threshold), ProbIoU (Ultralytics' OBB similarity, not an IoU: lenient with shifted thin boxes) >= the
  threshold; per class over all images, AP = trapezoid over 101 recall points of the interpolated precision
  envelope (``compute_ap``); classes with gts but no detections count 0. No per-image detection cap (its
  NMS keeps ``max_det``). Tests check it against Ultralytics' ``match_predictions`` + ``ap_per_class``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from visiontrain.detect.obb.geometry import corners_to_xywhr, probiou_matrix, xywhr_to_corners
from visiontrain.detect.obb.polygon_iou import polygon_iou

MAX_DETS = 100
IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 101)


def _np(x, shape_tail: tuple[int, ...]) -> np.ndarray:
    if x is None:
        return np.zeros((0, *shape_tail), np.float64)
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, np.float64).reshape(-1, *shape_tail)


def coco_match(ious: np.ndarray, thresholds: np.ndarray = IOU_THRESHOLDS) -> np.ndarray:
    """COCO's greedy matching for one image and class at every threshold.

    ``ious [k, m]`` between detections already in descending score order and the gts. Returns ``tp [T, k]``
    bool: each detection takes the still-free gt of highest IoU >= the threshold (the later gt on ties)."""
    T, (k, m) = len(thresholds), ious.shape
    tp = np.zeros((T, k), bool)
    if k == 0 or m == 0:
        return tp
    for t, thr in enumerate(thresholds):
        taken = np.zeros(m, bool)
        floor = min(thr, 1 - 1e-10)
        for d in range(k):
            row = np.where(taken, -1.0, ious[d])
            g = m - 1 - int(np.argmax(row[::-1]))
            if row[g] >= floor:
                taken[g] = True
                tp[t, d] = True
    return tp


def coco_precision(scores: np.ndarray, tp: np.ndarray, n_gt: int) -> np.ndarray:
    """COCO's 101-point interpolated precision ``[T, R]`` from one class's detections over all images (``scores
    [k]`` in image order, each image's in score order; ``tp [T, k]``)."""
    order = np.argsort(-scores, kind="mergesort")
    tps = tp[:, order]
    tp_sum = np.cumsum(tps, 1).astype(np.float64)
    fp_sum = np.cumsum(~tps, 1).astype(np.float64)
    out = np.zeros((tp.shape[0], len(RECALL_THRESHOLDS)))
    for t in range(tp.shape[0]):
        rc = tp_sum[t] / n_gt
        pr = tp_sum[t] / (fp_sum[t] + tp_sum[t] + np.spacing(1))
        pr = np.maximum.accumulate(pr[::-1])[::-1] if len(pr) else pr
        idx = np.searchsorted(rc, RECALL_THRESHOLDS, side="left")
        valid = idx < len(pr)
        out[t, : valid.sum()] = pr[idx[valid]]
    return out


def ultralytics_match(ious: np.ndarray, thresholds: np.ndarray = IOU_THRESHOLDS) -> np.ndarray:
    """Ultralytics' ``match_predictions`` (greedy variant) for one image: ``ious [m, k]`` gts x detections (already
    zero across classes, detections by descending score) -> ``correct [k, T]``."""
    m, k = ious.shape
    correct = np.zeros((k, len(thresholds)), bool)
    if m == 0 or k == 0:
        return correct
    claimed = np.zeros((m, len(thresholds)), bool)
    cols = np.arange(len(thresholds))
    for j in np.flatnonzero((ious >= thresholds.min()).any(0)):
        free = np.where(claimed, 0.0, ious[:, j, None])  # [m, T]
        best = free.argmax(0)
        correct[j] = free[best, cols] >= thresholds
        claimed[best, cols] |= correct[j]
    return correct


def ultralytics_ap(correct: np.ndarray, scores: np.ndarray, n_gt: int) -> np.ndarray:
    """AP ``[T]`` of one class as Ultralytics' ``ap_per_class``/``compute_ap``: ``correct [k, T]``, ``scores [k]``."""
    if n_gt == 0 or len(scores) == 0:
        return np.zeros(correct.shape[1])
    order = np.argsort(-scores, kind="stable")
    tpc = correct[order].cumsum(0)
    fpc = (1 - correct[order]).cumsum(0)
    recall = tpc / (n_gt + 1e-16)
    precision = tpc / (tpc + fpc)
    x = np.linspace(0, 1, 101)
    out = np.zeros(correct.shape[1])
    for t in range(correct.shape[1]):
        mrec = np.concatenate(([0.0], recall[:, t], [recall[-1, t]], [1.0]))
        mpre = np.concatenate(([1.0], precision[:, t], [0.0], [0.0]))
        mpre = np.flip(np.maximum.accumulate(np.flip(mpre)))
        y = np.interp(x, mrec, mpre)
        out[t] = float(((y[1:] + y[:-1]) / 2 * np.diff(x)).sum())
    return out


def voc07_ap(scores: np.ndarray, tp: np.ndarray, fp: np.ndarray, n_pos: int) -> float:
    """VOC07 11-point AP from detections ``scores [k]`` with ``tp, fp [k]`` flags (already by score)."""
    if n_pos == 0:
        return float("nan")
    tp_c, fp_c = np.cumsum(tp), np.cumsum(fp)
    rec = tp_c / float(n_pos)
    prec = tp_c / np.maximum(tp_c + fp_c, np.finfo(np.float64).eps)
    ap = 0.0
    for t in np.arange(0.0, 1.1, 0.1):
        ap += (prec[rec >= t].max() if (rec >= t).any() else 0.0) / 11.0
    return float(ap)


class OBBEvaluator:
    """Accumulates oriented predictions and ground truth image by image; :meth:`compute` gives the metrics."""

    def __init__(self, class_names: Sequence[str]):
        self.class_names = list(class_names)
        self.reset()

    def reset(self) -> None:
        self.image_ids: list[str] = []
        self.preds: list[np.ndarray] = []
        self.gt_polys: list[np.ndarray] = []
        self.gt_classes: list[np.ndarray] = []
        self.gt_difficult: list[np.ndarray] = []
        self.last: dict[str, Any] | None = None

    def __len__(self) -> int:
        return len(self.image_ids)

    def add(self, image_id: str, preds, gt_polygons, gt_classes, difficult=None) -> None:
        """One image: ``preds [n, 7] (cx, cy, w, h, angle, score, cls)``, ``gt_polygons [m, 4, 2]`` (or ``[m, 8]``),
        ``gt_classes [m]``, ``difficult [m]`` bool (default none), all in original pixels."""
        if image_id in self.image_ids:
            raise ValueError(f"image {image_id!r} was added twice to the evaluator")
        p = _np(preds, (7,))
        g = _np(gt_polygons, (4, 2))
        c = _np(gt_classes, ()).astype(np.int64)
        d = np.zeros(len(c), bool) if difficult is None else _np(difficult, ()).astype(bool)
        nc = len(self.class_names)
        if len(c) != len(g) or len(d) != len(g):
            raise ValueError(f"image {image_id!r}: {len(g)} gt polygons but {len(c)} classes / {len(d)} flags")
        for what, cls in (("gt", c), ("predicted", p[:, 6])):
            bad = (cls < 0) | (cls >= nc) | (cls != np.round(cls))
            if bad.any():
                raise ValueError(f"image {image_id!r}: {what} class {cls[bad][0]} is outside 0..{nc - 1}")
        if not (np.isfinite(p).all() and np.isfinite(g).all()):
            raise ValueError(f"image {image_id!r}: non-finite box or score")
        self.image_ids.append(image_id)
        self.preds.append(p)
        self.gt_polys.append(g)
        self.gt_classes.append(c)
        self.gt_difficult.append(d)

    # ----------------------------------------------------------------------------------------
    def _coco_ap(self, iou_fn: Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]
                 ) -> np.ndarray:
        """Precision ``[T, R, K]`` (-1 for classes without gt); ``iou_fn(pred_xywhr, pred_polys, gt_polys,
        gt_xywhr) -> [k, m]``."""
        nc = len(self.class_names)
        scores: list[list[np.ndarray]] = [[] for _ in range(nc)]
        tps: list[list[np.ndarray]] = [[] for _ in range(nc)]
        n_gt = np.zeros(nc, np.int64)
        for p, g, c in zip(self.preds, self.gt_polys, self.gt_classes):
            n_gt += np.bincount(c, minlength=nc)
            for k in np.unique(np.concatenate([p[:, 6].astype(np.int64), c])):
                pk, gk = p[p[:, 6] == k], g[c == k]
                order = np.argsort(-pk[:, 5], kind="mergesort")[:MAX_DETS]
                pk = pk[order]
                ious = iou_fn(pk[:, :5], xywhr_to_corners(pk[:, :5]), gk) if len(pk) and len(gk) else \
                    np.zeros((len(pk), len(gk)))
                scores[k].append(pk[:, 5])
                tps[k].append(coco_match(ious))
        prec = -np.ones((len(IOU_THRESHOLDS), len(RECALL_THRESHOLDS), nc))
        for k in range(nc):
            if n_gt[k] == 0:
                continue
            s = np.concatenate(scores[k]) if scores[k] else np.zeros(0)
            t = np.concatenate(tps[k], 1) if tps[k] else np.zeros((len(IOU_THRESHOLDS), 0), bool)
            prec[:, :, k] = coco_precision(s, t, int(n_gt[k]))
        return prec

    def _dota_ap50(self) -> np.ndarray:
        """Per-class DOTA devkit VOC07 AP50 ``[K]`` (nan for classes without non-difficult gt)."""
        nc = len(self.class_names)
        out = np.full(nc, np.nan)
        for k in range(nc):
            rows = []  # (score, image, det index)
            ious_per_image = []
            n_pos = 0
            for i, (p, g, c, d) in enumerate(zip(self.preds, self.gt_polys, self.gt_classes, self.gt_difficult)):
                pk, gk = p[p[:, 6] == k], g[c == k]
                n_pos += int((~d[c == k]).sum())
                ious_per_image.append(polygon_iou(xywhr_to_corners(pk[:, :5]), gk) if len(pk) and len(gk)
                                      else np.zeros((len(pk), len(gk))))
                rows.extend((s, i, j) for j, s in enumerate(pk[:, 5]))
            if n_pos == 0:
                continue
            rows.sort(key=lambda r: -r[0])  # stable: ties keep image order
            taken = [np.zeros(x.shape[1], bool) for x in ious_per_image]
            diffs = [d[c == k] for c, d in zip(self.gt_classes, self.gt_difficult)]
            tp, fp = np.zeros(len(rows)), np.zeros(len(rows))
            for r, (_, i, j) in enumerate(rows):
                iou = ious_per_image[i][j] if ious_per_image[i].shape[1] else np.zeros(0)
                if len(iou) and iou.max() > 0.5:
                    g = int(np.argmax(iou))
                    if diffs[i][g]:
                        continue
                    if not taken[i][g]:
                        taken[i][g] = True
                        tp[r] = 1
                    else:
                        fp[r] = 1
                else:
                    fp[r] = 1
            out[k] = voc07_ap(np.array([r[0] for r in rows]), tp, fp, n_pos)
        return out

    def _ultralytics_probiou_ap(self) -> np.ndarray:
        """Per-class AP ``[K, T]`` as Ultralytics' OBB validation computes it (ProbIoU matching)."""
        nc = len(self.class_names)
        correct, scores, classes = [], [], []
        for p, g, c in zip(self.preds, self.gt_polys, self.gt_classes):
            p = p[np.argsort(-p[:, 5], kind="stable")]
            ious = np.zeros((len(g), len(p)))
            if len(g) and len(p):
                ious = probiou_matrix(torch.as_tensor(corners_to_xywhr(g)), torch.as_tensor(p[:, :5])).numpy()
                ious = ious * (c[:, None] == p[None, :, 6].astype(np.int64))
            correct.append(ultralytics_match(ious))
            scores.append(p[:, 5])
            classes.append(p[:, 6].astype(np.int64))
        correct_all = np.concatenate(correct) if correct else np.zeros((0, len(IOU_THRESHOLDS)), bool)
        s, k = (np.concatenate(scores), np.concatenate(classes)) if scores else (np.zeros(0), np.zeros(0, np.int64))
        n_gt = np.bincount(np.concatenate(self.gt_classes or [np.zeros(0, np.int64)]), minlength=nc)
        return np.stack([ultralytics_ap(correct_all[k == i], s[k == i], int(n_gt[i])) for i in range(nc)]) if nc \
            else np.zeros((0, len(IOU_THRESHOLDS)))

    def compute(self) -> dict[str, Any]:
        """All metrics as a JSON-safe dict (see the module docstring); also kept in ``self.last``."""
        nc = len(self.class_names)
        n_gt = np.bincount(np.concatenate(self.gt_classes or [np.zeros(0, np.int64)]), minlength=nc)
        valid = [k for k in range(nc) if n_gt[k] > 0]
        mean = lambda a: float(np.mean(a)) if len(a) else 0.0  # noqa: E731

        def summary(prec: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            ap = np.array([prec[:, :, k].mean() if n_gt[k] else np.nan for k in range(nc)])
            return ap, prec[0].mean(0), prec[5].mean(0)  # 50-95, 50, 75

        poly = lambda px, pp, gp: polygon_iou(pp, gp)  # noqa: E731
        ap, ap50, ap75 = summary(self._coco_ap(poly))
        uap = self._ultralytics_probiou_ap()  # [K, T]
        pap, pap50 = uap.mean(1) if nc else np.zeros(0), uap[:, 0] if nc else np.zeros(0)
        dota = self._dota_ap50()
        dota_valid = [k for k in range(nc) if np.isfinite(dota[k])]
        self.last = {
            "mAP50-95": mean(ap[valid]), "mAP50": mean(ap50[valid]), "mAP75": mean(ap75[valid]),
            "dota_AP50": mean(dota[dota_valid]),
            "mAP50-95_probiou": mean(pap[valid]), "mAP50_probiou": mean(pap50[valid]),
            "per_class": {self.class_names[k]: {"AP50-95": float(ap[k]), "AP50": float(ap50[k]),
                                                "AP75": float(ap75[k]), "dota_AP50": float(dota[k]),
                                                "n_gt": int(n_gt[k])} for k in valid},
            "classes_without_gt": [self.class_names[k] for k in range(nc) if n_gt[k] == 0],
            "n_images": len(self.image_ids), "n_gt": int(n_gt.sum()),
            "n_pred": int(sum(len(p) for p in self.preds)),
        }
        return self.last


# --------------------------------------------------------------------------------------------
# predictions files (Ultralytics' OBB JSON convention)


def write_obb_predictions_json(path, preds: dict[str, np.ndarray]):
    """Write ``{image_id: [n, 7] (cx, cy, w, h, angle, score, cls)}`` as a results list in Ultralytics' OBB
    convention: ``{"image_id", "category_id", "score", "rbox": [cx, cy, w, h, angle (rad)], "poly": [x1, y1, …, y4]}``."""
    import json
    from pathlib import Path

    rows = []
    for image_id, p in preds.items():
        p = _np(p, (7,))
        for row, poly in zip(p.tolist(), xywhr_to_corners(p[:, :5]).reshape(-1, 8).tolist()):
            rows.append({"image_id": image_id, "category_id": int(row[6]), "score": round(row[5], 5),
                         "rbox": [round(v, 4) for v in row[:5]], "poly": [round(v, 3) for v in poly]})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows))
    return path


def is_obb_predictions(data: list) -> bool:
    """A results list whose entries carry ``rbox`` or ``poly`` (oriented predictions)."""
    return any(isinstance(d, dict) and ("rbox" in d or "poly" in d) for d in data[:50])


def read_obb_predictions(data: list, path, num_classes: int, image_ids: Sequence[str] | None = None
                         ) -> dict[str, np.ndarray]:
    """Oriented results (``image_id``, ``category_id``, ``score`` and ``rbox`` = [cx, cy, w, h, angle] or ``poly`` =
    8 numbers; ``rbox`` wins when both) -> ``{image_id: [n, 7]}``. Every entry is validated, naming file and entry."""
    import math

    from visiontrain.detect.metrics import PredictionsError

    known = set(image_ids) if image_ids is not None else None
    out: dict[str, list[list[float]]] = {}
    for i, d in enumerate(data):
        at = f"{path} entry {i}"
        if not isinstance(d, dict) or not {"image_id", "category_id", "score"} <= d.keys() or not (
                "rbox" in d or "poly" in d):
            raise PredictionsError(f"{at}: needs image_id, category_id, score and rbox or poly; got {d!r:.120}")
        image_id, cat, s = str(d["image_id"]), d["category_id"], d["score"]
        if known is not None and image_id not in known:
            raise PredictionsError(f"{at}: image_id {image_id!r} is not an image of the dataset")
        if isinstance(cat, bool) or not isinstance(cat, (int, float)) or cat != int(cat) or not 0 <= cat < num_classes:
            raise PredictionsError(f"{at}: category_id {cat!r} must be a 0-based class index in 0..{num_classes - 1}")
        if not isinstance(s, (int, float)) or not math.isfinite(s):
            raise PredictionsError(f"{at}: score must be a finite number, got {s!r}")
        geo, n = (d["rbox"], 5) if "rbox" in d else (d["poly"], 8)
        if not (isinstance(geo, list) and len(geo) == n and all(isinstance(v, (int, float)) and math.isfinite(v)
                                                                  for v in geo)):
            raise PredictionsError(f"{at}: {'rbox' if n == 5 else 'poly'} must be {n} finite numbers, got {geo!r}")
        rbox = list(geo) if n == 5 else corners_to_xywhr(np.array(geo, np.float64).reshape(4, 2)).tolist()
        if rbox[2] < 0 or rbox[3] < 0:
            raise PredictionsError(f"{at}: rbox width and height must be >= 0, got {geo!r}")
        out.setdefault(image_id, []).append([*rbox, float(s), int(cat)])
    return {k: np.array(v, np.float64).reshape(-1, 7) for k, v in out.items()}
