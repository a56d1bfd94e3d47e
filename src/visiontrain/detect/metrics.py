"""Detection metrics: COCO mAP through faster-coco-eval, precision/recall, confusion matrix, plots.

:class:`DetectionEvaluator` collects, per image, predictions ``[n, 6] (x1, y1, x2, y2, score, cls)``
and ground truth (``boxes [m, 4]`` xyxy, ``classes [m]``) in original image pixels, then
:meth:`DetectionEvaluator.compute` returns:

* ``mAP50-95``, ``mAP50``, ``mAP75`` and per-class ``AP50-95`` / ``AP50``: COCO bbox AP computed by
  ``faster_coco_eval.COCOeval_faster`` (not by hand): every ground-truth box ``iscrowd = 0`` with
  ``area = w * h`` of its box, area range "all", at most ``maxDets = 100`` detections per image and
  class (the highest scoring), IoU thresholds 0.50:0.05:0.95, 101-point interpolated precision.
  Classes without ground truth are left out of the means, as COCO does (listed in ``classes_without_gt``).
* ``precision``, ``recall``, ``f1``: class means at the single confidence threshold
  (``conf_best_f1``) that maximises the class-mean F1, the usual practice of YOLO trainers. They use
  COCO's greedy matching at IoU 0.5 (score order, each ground truth matched once, same top-100
  detections); per-class values at that threshold are in ``per_class``.
* ``confusion_matrix``: ``[nc + 1, nc + 1]`` counts ``M[predicted, true]``, index ``nc`` =
  background; detections with score >= 0.25 matched class-agnostically to ground truth at IoU > 0.45
  (highest IoU first, one-to-one), as common YOLO tooling does.

``compute(class_subset=[...])`` restricts every mean and the F1 sweep to those classes (base / novel
/ all mAP in class-incremental distillation). Predictions files use the COCO results format with the
image file stem as ``image_id`` and the 0-based class index as ``category_id``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from faster_coco_eval import COCO, COCOeval_faster

MAX_DETS = 100
CONFUSION_CONF = 0.25
CONFUSION_IOU = 0.45


class PredictionsError(ValueError):
    """A predictions file is wrong; the message names the file, the entry and the fix."""


def _np(x: np.ndarray | torch.Tensor | Sequence | None, cols: int) -> np.ndarray:
    if x is None:
        return np.zeros((0, cols), np.float64)
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64).reshape(-1, cols)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU ``[n, m]`` between xyxy boxes ``a [n, 4]`` and ``b [m, 4]`` (float64)."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod((rb - lt).clip(0), axis=2)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def coco_greedy_match(pred_boxes: np.ndarray, scores: np.ndarray, gt_boxes: np.ndarray, iou_thr: float = 0.5,
                      max_dets: int = MAX_DETS) -> tuple[np.ndarray, np.ndarray]:
    """COCO's matching for one image and class: ``(kept [k] indices into preds, tp [k] bool)``.

    Detections are taken by descending score (stable), at most ``max_dets``; each takes the
    still-unmatched ground truth of highest IoU >= ``iou_thr`` (on ties the later one, like
    pycocotools)."""
    order = np.argsort(-scores, kind="mergesort")[:max_dets]
    tp = np.zeros(len(order), bool)
    if len(gt_boxes) == 0 or len(order) == 0:
        return order, tp
    ious = box_iou(pred_boxes[order], gt_boxes)
    taken = np.zeros(len(gt_boxes), bool)
    thr = min(iou_thr, 1 - 1e-10)
    for d in range(len(order)):
        row = np.where(taken, -1.0, ious[d])
        g = len(row) - 1 - int(np.argmax(row[::-1]))  # last index of the maximum
        if row[g] >= thr:
            taken[g] = True
            tp[d] = True
    return order, tp


class DetectionEvaluator:
    """Accumulates predictions and ground truth image by image; :meth:`compute` gives COCO metrics."""

    def __init__(self, class_names: Sequence[str]):
        self.class_names = list(class_names)
        self.reset()

    def reset(self) -> None:
        self.image_ids: list[str] = []
        self.sizes: list[tuple[int, int]] = []
        self.preds: list[np.ndarray] = []
        self.gt_boxes: list[np.ndarray] = []
        self.gt_classes: list[np.ndarray] = []
        self._index: dict[str, int] = {}
        self.coco_eval: COCOeval_faster | None = None
        self.last: dict[str, Any] | None = None

    def __len__(self) -> int:
        return len(self.image_ids)

    def add(self, image_id: str, preds: np.ndarray | torch.Tensor | None, gt_boxes: np.ndarray | torch.Tensor | None,
            gt_classes: np.ndarray | torch.Tensor | Sequence[int] | None, image_size: tuple[int, int] | None = None
            ) -> None:
        """One image: ``preds [n, 6] (x1, y1, x2, y2, score, cls)``, ``gt_boxes [m, 4]`` xyxy, ``gt_classes [m]``,
        all in original pixels. ``image_size = (h, w)`` only feeds COCO's image record."""
        if image_id in self._index:
            raise ValueError(f"image {image_id!r} was added twice to the evaluator")
        p = _np(preds, 6)
        g = _np(gt_boxes, 4)
        c = _np(gt_classes, 1).reshape(-1).astype(np.int64)
        nc = len(self.class_names)
        if len(c) != len(g):
            raise ValueError(f"image {image_id!r}: {len(g)} gt boxes but {len(c)} gt classes")
        for what, cls in (("gt", c), ("predicted", p[:, 5])):
            bad = (cls < 0) | (cls >= nc) | (cls != np.round(cls))
            if bad.any():
                raise ValueError(f"image {image_id!r}: {what} class {cls[bad][0]} is outside 0..{nc - 1}")
        if not (np.isfinite(p).all() and np.isfinite(g).all()):
            raise ValueError(f"image {image_id!r}: non-finite box or score")
        self._index[image_id] = len(self.image_ids)
        self.image_ids.append(image_id)
        h, w = image_size or (0, 0)
        if not (h and w):  # COCO needs a size only for masks; keep it plausible
            allb = np.concatenate([g, p[:, :4]])
            h = w = int(math.ceil(allb.max())) + 1 if len(allb) else 1
        self.sizes.append((int(h), int(w)))
        self.preds.append(p)
        self.gt_boxes.append(g)
        self.gt_classes.append(c)

    # ----------------------------------------------------------------------------------------
    def _coco(self) -> COCOeval_faster:
        cats = [{"id": k + 1, "name": n} for k, n in enumerate(self.class_names)]
        images = [{"id": i + 1, "file_name": s, "height": h, "width": w}
                  for i, (s, (h, w)) in enumerate(zip(self.image_ids, self.sizes))]
        gt_anns, dt_anns = [], []
        for i, (g, c, p) in enumerate(zip(self.gt_boxes, self.gt_classes, self.preds)):
            for (x1, y1, x2, y2), k in zip(g.tolist(), c.tolist()):
                gt_anns.append({"id": len(gt_anns) + 1, "image_id": i + 1, "category_id": k + 1,
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
            for x1, y1, x2, y2, s, k in p.tolist():
                dt_anns.append({"id": len(dt_anns) + 1, "image_id": i + 1, "category_id": int(k) + 1,
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                                "score": s, "iscrowd": 0})
        quiet = lambda *a, **k: None  # noqa: E731
        gt = COCO(print_function=quiet)
        gt.dataset = {"images": images, "annotations": gt_anns, "categories": cats}
        gt.createIndex()
        dt = COCO(print_function=quiet)
        dt.dataset = {"images": images, "annotations": dt_anns, "categories": cats}
        dt.createIndex()
        ev = COCOeval_faster(gt, dt, "bbox", print_function=quiet)
        ev.params.maxDets = [1, 10, MAX_DETS]
        ev.params.imgIds = list(range(1, len(images) + 1))
        ev.params.catIds = list(range(1, len(cats) + 1))
        ev.evaluate()
        ev.accumulate()
        return ev

    def _matches(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Per class: scores and TP flags (IoU 0.5, COCO greedy) of the kept detections."""
        nc = len(self.class_names)
        scores: list[list[np.ndarray]] = [[] for _ in range(nc)]
        tps: list[list[np.ndarray]] = [[] for _ in range(nc)]
        for p, g, c in zip(self.preds, self.gt_boxes, self.gt_classes):
            for k in np.unique(p[:, 5]).astype(int):
                pk = p[p[:, 5] == k]
                kept, tp = coco_greedy_match(pk[:, :4], pk[:, 4], g[c == k], 0.5)
                scores[k].append(pk[kept, 4])
                tps[k].append(tp)
        cat = lambda xs, dt: np.concatenate(xs) if xs else np.zeros(0, dt)  # noqa: E731
        return [cat(s, np.float64) for s in scores], [cat(t, bool) for t in tps]

    def confusion_matrix(self, conf: float = CONFUSION_CONF, iou_thr: float = CONFUSION_IOU) -> np.ndarray:
        """``[nc + 1, nc + 1]`` int64 counts ``M[predicted, true]``; index ``nc`` is background."""
        nc = len(self.class_names)
        m = np.zeros((nc + 1, nc + 1), np.int64)
        for p, g, c in zip(self.preds, self.gt_boxes, self.gt_classes):
            p = p[p[:, 4] >= conf]
            pc = p[:, 5].astype(np.int64)
            if len(g) == 0 or len(p) == 0:
                np.add.at(m, (pc, nc), 1)
                np.add.at(m, (nc, c), 1)
                continue
            ious = box_iou(g, p[:, :4])
            gi, di = np.nonzero(ious > iou_thr)
            order = np.argsort(-ious[gi, di], kind="mergesort")
            gi, di = gi[order], di[order]
            _, first = np.unique(di, return_index=True)  # best gt per detection
            gi, di = gi[np.sort(first)], di[np.sort(first)]
            _, first = np.unique(gi, return_index=True)  # then best detection per gt
            gi, di = gi[np.sort(first)], di[np.sort(first)]
            np.add.at(m, (pc[di], c[gi]), 1)
            np.add.at(m, (nc, np.delete(c, gi)), 1)
            np.add.at(m, (np.delete(pc, di), nc), 1)
        return m

    def compute(self, class_subset: Sequence[str] | None = None) -> dict[str, Any]:
        """All metrics as a JSON-safe dict (see the module docstring); also kept in ``self.last``."""
        nc = len(self.class_names)
        if class_subset is None:
            subset = list(range(nc))
        else:
            unknown = [n for n in class_subset if n not in self.class_names]
            if unknown:
                raise ValueError(f"class_subset: {unknown} are not among the classes {self.class_names}")
            subset = sorted({self.class_names.index(n) for n in class_subset})
        n_gt = np.bincount(np.concatenate(self.gt_classes or [np.zeros(0, np.int64)]), minlength=nc)
        self.coco_eval = ev = self._coco()
        prec = ev.eval["precision"][:, :, :, 0, -1]  # [T, R, K] area "all", maxDets 100
        iou_thrs = ev.params.iouThrs
        t50, t75 = int(np.argmin(np.abs(iou_thrs - 0.5))), int(np.argmin(np.abs(iou_thrs - 0.75)))
        ap_k = np.array([prec[:, :, k][prec[:, :, k] > -1].mean() if (prec[:, :, k] > -1).any() else np.nan
                         for k in range(nc)])
        ap50_k = np.array([prec[t50, :, k].mean() if (prec[t50, :, k] > -1).all() else np.nan for k in range(nc)])
        ap75_k = np.array([prec[t75, :, k].mean() if (prec[t75, :, k] > -1).all() else np.nan for k in range(nc)])
        valid = [k for k in subset if n_gt[k] > 0]

        # precision / recall at the threshold maximising the class-mean F1 (IoU 0.5)
        scores, tps = self._matches()
        thr_all = np.unique(np.concatenate([scores[k] for k in valid] or [np.zeros(0)]))
        if len(thr_all) > 10000:
            thr_all = np.quantile(thr_all, np.linspace(0, 1, 10000))
        p_k = np.zeros((len(valid), max(len(thr_all), 1)))
        r_k = np.zeros_like(p_k)
        for j, k in enumerate(valid):
            order = np.argsort(-scores[k], kind="mergesort")
            s, cum_tp = scores[k][order], np.cumsum(tps[k][order])
            if len(s) == 0 or len(thr_all) == 0:
                continue
            n_above = np.searchsorted(-s, -thr_all, side="right")
            tp = np.where(n_above > 0, cum_tp[np.maximum(n_above - 1, 0)], 0)
            p_k[j] = np.where(n_above > 0, tp / np.maximum(n_above, 1), 0.0)
            r_k[j] = tp / n_gt[k]
        f1_k = 2 * p_k * r_k / np.maximum(p_k + r_k, 1e-16)
        best = int(np.argmax(f1_k.mean(0))) if len(valid) else 0
        mean_or0 = lambda a: float(np.mean(a)) if len(a) else 0.0  # noqa: E731

        per_class = {}
        for j, k in enumerate(valid):
            per_class[self.class_names[k]] = {"AP50-95": float(ap_k[k]), "AP50": float(ap50_k[k]),
                                              "AP75": float(ap75_k[k]), "precision": float(p_k[j, best]),
                                              "recall": float(r_k[j, best]), "n_gt": int(n_gt[k])}
        n_pred = int(sum(len(p) for p in self.preds))
        self.last = {
            "mAP50-95": mean_or0(ap_k[valid]), "mAP50": mean_or0(ap50_k[valid]), "mAP75": mean_or0(ap75_k[valid]),
            "precision": mean_or0(p_k[:, best]), "recall": mean_or0(r_k[:, best]),
            "f1": mean_or0(f1_k[:, best]), "conf_best_f1": float(thr_all[best]) if len(thr_all) else 0.0,
            "per_class": per_class,
            "classes": [self.class_names[k] for k in subset],
            "classes_without_gt": [self.class_names[k] for k in subset if n_gt[k] == 0],
            "n_images": len(self.image_ids), "n_gt": int(n_gt[subset].sum()), "n_pred": n_pred,
            "confusion_matrix": self.confusion_matrix().tolist(),
        }
        return self.last

    # ----------------------------------------------------------------------------------------
    def plot(self, out_dir: str | Path, prefix: str = "") -> list[Path]:
        """PR curves and the confusion matrix of the last :meth:`compute` as PNGs in ``out_dir``."""
        if self.coco_eval is None or self.last is None:
            raise RuntimeError("call compute() before plot()")
        out = Path(out_dir)
        pr = self.coco_eval.eval["precision"][0, :, :, 0, -1]  # IoU 0.5: [R, K]
        keep = [self.class_names.index(n) for n in self.last["classes"] if n in self.last["per_class"]]
        return [plot_pr_curves(pr[:, keep], self.coco_eval.params.recThrs, [self.class_names[k] for k in keep],
                               out / f"{prefix}pr_curve.png"),
                plot_confusion_matrix(np.array(self.last["confusion_matrix"]), self.class_names,
                                      out / f"{prefix}confusion_matrix.png")]


def plot_pr_curves(precision: np.ndarray, recall: np.ndarray, names: Sequence[str], path: str | Path) -> Path:
    """Precision ``[R, K]`` (COCO's interpolated precision at IoU 0.5) vs ``recall [R]``: one thin line per
    class, the class mean thick, mAP50 in the legend."""
    from matplotlib.figure import Figure  # the object API renders with Agg and leaves pyplot's state alone

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(8, 6), dpi=110)
    ax = fig.subplots()
    p = np.where(precision < 0, np.nan, precision)
    for k, n in enumerate(names):
        ax.plot(recall, p[:, k], lw=0.8, label=f"{n} {np.nanmean(p[:, k]):.3f}" if len(names) <= 25 else None)
    if len(names):
        mean = np.nanmean(p, 1) if np.isfinite(p).any() else np.zeros(len(recall))
        ax.plot(recall, mean, lw=3, color="blue", label=f"all classes {np.nanmean(mean):.3f} mAP@0.5")
    ax.set(xlabel="Recall", ylabel="Precision", xlim=(0, 1), ylim=(0, 1.01), title="Precision-Recall (IoU 0.5)")
    ax.legend(bbox_to_anchor=(1.02, 1), loc="upper left", fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_confusion_matrix(matrix: np.ndarray, class_names: Sequence[str], path: str | Path,
                          normalize: bool = True) -> Path:
    """``matrix [nc + 1, nc + 1]`` (``M[predicted, true]``) as a heat map, columns normalised to sum 1."""
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    m = matrix.astype(np.float64)
    if normalize:
        m = m / np.maximum(m.sum(0, keepdims=True), 1)
    labels = [*class_names, "background"]
    n = len(labels)
    fig = Figure(figsize=(max(6, 0.45 * n + 2), max(5, 0.4 * n + 1.5)), dpi=110)
    ax = fig.subplots()
    im = ax.imshow(m, cmap="Blues", vmin=0)
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_xticks(range(n), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(n), labels, fontsize=7)
    ax.set(xlabel="True", ylabel="Predicted", title="Confusion matrix" + (" (normalised)" if normalize else ""))
    if n <= 30:
        for i, j in zip(*np.nonzero(m)):
            ax.text(j, i, f"{m[i, j]:.2f}" if normalize else str(int(m[i, j])), ha="center", va="center",
                    fontsize=5, color="white" if m[i, j] > 0.5 * m.max() else "black")
    fig.tight_layout()
    fig.savefig(path)
    return path


# --------------------------------------------------------------------------------------------
# COCO results files


def write_predictions_json(path: str | Path, preds: dict[str, np.ndarray | torch.Tensor]) -> Path:
    """Write ``{image_id: [n, 6] (x1, y1, x2, y2, score, cls)}`` as a COCO results list:
    ``{"image_id": stem, "category_id": cls, "bbox": [x, y, w, h], "score": s}``."""
    rows = []
    for image_id, p in preds.items():
        for x1, y1, x2, y2, s, c in _np(p, 6).tolist():
            rows.append({"image_id": image_id, "category_id": int(c),
                         "bbox": [round(x1, 3), round(y1, 3), round(x2 - x1, 3), round(y2 - y1, 3)],
                         "score": round(s, 5)})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows))
    return path


def read_predictions_json(path: str | Path, num_classes: int | None = None,
                          image_ids: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Read a COCO results file into ``{image_id: [n, 6] (x1, y1, x2, y2, score, cls)}`` (float64).

    Validates every entry (naming the file and entry index): keys present, ``bbox`` 4 finite numbers
    with ``w, h >= 0``, finite ``score``, integer ``category_id`` in ``0..num_classes-1`` and, with
    ``image_ids``, an ``image_id`` that the dataset has."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise PredictionsError(f"{path}: predictions file does not exist") from None
    except json.JSONDecodeError as e:
        raise PredictionsError(f"{path} line {e.lineno}: malformed JSON ({e.msg})") from None
    if not isinstance(data, list):
        raise PredictionsError(f"{path}: expected a JSON list of {{image_id, category_id, bbox, score}}")
    known = set(image_ids) if image_ids is not None else None
    out: dict[str, list[list[float]]] = {}
    for i, d in enumerate(data):
        at = f"{path} entry {i}"
        if not isinstance(d, dict) or not {"image_id", "category_id", "bbox", "score"} <= d.keys():
            raise PredictionsError(f"{at}: needs keys image_id, category_id, bbox, score; got {d!r:.120}")
        image_id, cat, bb, s = str(d["image_id"]), d["category_id"], d["bbox"], d["score"]
        if known is not None and image_id not in known:
            raise PredictionsError(f"{at}: image_id {image_id!r} is not an image of the dataset "
                                   f"(image ids are file stems, e.g. {sorted(known)[:3]})")
        if isinstance(cat, bool) or not isinstance(cat, (int, float)) or cat != int(cat) or cat < 0 or (
                num_classes is not None and cat >= num_classes):
            rng = f"0..{num_classes - 1}" if num_classes is not None else ">= 0"
            raise PredictionsError(f"{at}: category_id {cat!r} must be a 0-based class index in {rng}")
        if not (isinstance(bb, list) and len(bb) == 4 and all(isinstance(v, (int, float)) for v in bb)
                and all(math.isfinite(v) for v in bb) and bb[2] >= 0 and bb[3] >= 0):
            raise PredictionsError(f"{at}: bbox must be [x, y, w, h] with finite numbers and w, h >= 0, got {bb!r}")
        if not isinstance(s, (int, float)) or not math.isfinite(s):
            raise PredictionsError(f"{at}: score must be a finite number, got {s!r}")
        out.setdefault(image_id, []).append([bb[0], bb[1], bb[0] + bb[2], bb[1] + bb[3], float(s), int(cat)])
    return {k: np.array(v, np.float64).reshape(-1, 6) for k, v in out.items()}


def evaluate_predictions(preds: dict[str, np.ndarray], labels: Any, class_subset: Sequence[str] | None = None,
                         ) -> tuple[dict[str, Any], DetectionEvaluator]:
    """Evaluate ``{image_id: [n, 6]}`` against a :class:`visiontrain.detect.data.LabelSet` (images without
    predictions count as having none). Returns the metrics and the evaluator (for plots)."""
    ev = DetectionEvaluator(labels.class_names)
    for r in labels.records:
        ev.add(r.image_id, preds.get(r.image_id), r.boxes, r.classes, (r.height, r.width))
    return ev.compute(class_subset), ev


def evaluate_predictions_file(path: str | Path, dataset: str | Path, split: str = "val",
                              class_names: Sequence[str] | None = None, class_subset: Sequence[str] | None = None
                              ) -> tuple[dict[str, Any], DetectionEvaluator]:
    """Evaluate a COCO results file (see :func:`read_predictions_json`) against a dataset split."""
    from visiontrain.detect.data import load_labels

    labels = load_labels(dataset, split, class_names)
    preds = read_predictions_json(path, len(labels.class_names), [r.image_id for r in labels.records])
    return evaluate_predictions(preds, labels, class_subset)
