"""Evaluating an oriented-box detector over a validation loader: polygon-IoU metrics (:class:`OBBEvaluator`) and,
from the same predictions, the horizontal figures (the predicted polygons' bounding boxes against the labels'
horizontal boxes, scored by :class:`~visiontrain.detect.metrics.DetectionEvaluator`) for comparison."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from torch import nn

from visiontrain.detect.metrics import DetectionEvaluator
from visiontrain.detect.obb.geometry import corners_to_xywhr, xywhr_to_corners
from visiontrain.detect.obb.metrics import OBBEvaluator
from visiontrain.detect.obb.nms import postprocess_obb


def rboxes_to_original(det: np.ndarray, ratio: Sequence[float], pad: Sequence[float]) -> np.ndarray:
    """``[n, 7]`` (cx, cy, w, h, angle, score, cls) from letterboxed to original pixels: the corners map by
    ``x = (x' - pad_x) / rx`` and the rectangle is refitted (exact when ``rx == ry``)."""
    det = np.asarray(det, np.float64).reshape(-1, 7)
    if len(det) == 0:
        return det
    c = xywhr_to_corners(det[:, :5])
    c = (c - np.asarray(pad, np.float64)) / np.asarray(ratio, np.float64)
    return np.concatenate([corners_to_xywhr(c), det[:, 5:]], 1)


def horizontal_preds(det: np.ndarray) -> np.ndarray:
    """``[n, 7]`` oriented -> ``[n, 6]`` (x1, y1, x2, y2, score, cls): the polygons' bounding boxes."""
    c = xywhr_to_corners(det[:, :5]) if len(det) else np.zeros((0, 4, 2))
    return np.concatenate([c.min(1), c.max(1), det[:, 5:7]], 1)


def run_obb_evaluation(model: nn.Module, loader, names: list[str], conf: float, iou: float, max_det: int
                       ) -> tuple[OBBEvaluator, DetectionEvaluator]:
    """Predict over ``loader`` (an oriented :class:`~visiontrain.detect.data.DetectionDataset`'s) and fill both
    evaluators against the labels in original pixels (the horizontal one with the predictions' bounding boxes)."""
    gt = {r.image_id: r for r in loader.dataset.labels.records}
    obb, hbb = OBBEvaluator(names), DetectionEvaluator(names)
    device = next(model.parameters()).device
    for images, _, metas in loader:
        out = model(images.to(device)).float()
        for det, meta in zip(postprocess_obb(out, conf=conf, iou=iou, max_det=max_det), metas):
            det = rboxes_to_original(det.cpu().numpy(), meta["ratio"], meta["pad"])
            rec = gt[meta["image_id"]]
            obb.add(meta["image_id"], det, rec.polygons, rec.classes, rec.difficult)
            hbb.add(meta["image_id"], horizontal_preds(det), rec.boxes, rec.classes, (rec.height, rec.width))
    return obb, hbb


def obb_metrics(obb: OBBEvaluator, hbb: DetectionEvaluator) -> dict[str, Any]:
    """The oriented metrics plus ``hbb/mAP50-95`` and ``hbb/mAP50`` of the same predictions."""
    m = dict(obb.compute())
    h = hbb.compute()
    m["hbb/mAP50-95"], m["hbb/mAP50"] = float(h["mAP50-95"]), float(h["mAP50"])
    return m

