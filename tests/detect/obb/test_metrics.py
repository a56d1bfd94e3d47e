"""OBB metrics: COCO AP with polygon IoU equals faster_coco_eval's bbox AP on axis-aligned boxes; DOTA VOC07
AP50 and the ProbIoU-matched figure on hand-checked cases."""

from __future__ import annotations

import numpy as np
import pytest

from visiontrain.detect.metrics import DetectionEvaluator
from visiontrain.detect.obb.geometry import xywhr_to_corners
from visiontrain.detect.obb.metrics import OBBEvaluator, voc07_ap


def axis_aligned_problem(seed: int, n_images: int = 12, nc: int = 3):
    rng = np.random.default_rng(seed)
    images = []
    for i in range(n_images):
        m = int(rng.integers(0, 8))
        gt = np.concatenate([rng.uniform(20, 180, (m, 2)), rng.uniform(8, 60, (m, 2))], 1)  # xywh
        gcls = rng.integers(0, nc, m)
        # detections: jittered gts (some good, some poor) plus random false positives
        jit = gt + rng.normal(0, 1, gt.shape) * np.array([4, 4, 6, 6])
        fp = np.concatenate([rng.uniform(20, 180, (3, 2)), rng.uniform(8, 60, (3, 2))], 1)
        det = np.concatenate([jit, fp])
        det[:, 2:] = np.abs(det[:, 2:]) + 1
        dcls = np.concatenate([np.where(rng.random(m) < 0.85, gcls, rng.integers(0, nc, m)), rng.integers(0, nc, 3)])
        score = rng.random(len(det))
        images.append((f"im{i}", gt, gcls, det, dcls, score))
    return images


def xywh_to_xyxy(b):
    return np.concatenate([b[:, :2] - b[:, 2:] / 2, b[:, :2] + b[:, 2:] / 2], 1)


@pytest.mark.parametrize("seed", [0, 1])
def test_polygon_coco_ap_equals_faster_coco_eval_on_axis_aligned_boxes(seed):
    names = ["a", "b", "c"]
    hbb, obb = DetectionEvaluator(names), OBBEvaluator(names)
    for image_id, gt, gcls, det, dcls, score in axis_aligned_problem(seed):
        hbb.add(image_id, np.concatenate([xywh_to_xyxy(det), score[:, None], dcls[:, None]], 1), xywh_to_xyxy(gt),
                gcls, (200, 200))
        # angle 0 for some, pi/2 with w/h swapped for others: the same rectangles
        rb = np.concatenate([det, np.zeros((len(det), 1))], 1)
        rb[::2] = np.concatenate([det[::2, :2], det[::2, 3:4], det[::2, 2:3], np.full((len(det[::2]), 1), np.pi / 2)], 1)
        poly = xywhr_to_corners(np.concatenate([gt, np.zeros((len(gt), 1))], 1))
        obb.add(image_id, np.concatenate([rb, score[:, None], dcls[:, None]], 1), poly, gcls)
    ref, ours = hbb.compute(), obb.compute()
    for key in ("mAP50-95", "mAP50", "mAP75"):
        assert ours[key] == pytest.approx(ref[key], abs=1e-9), key
    for name, row in ours["per_class"].items():
        assert row["AP50-95"] == pytest.approx(ref["per_class"][name]["AP50-95"], abs=1e-9)
    assert 0.1 < ours["mAP50"] < 0.95  # a non-trivial case


def test_rotation_invariance_and_perfect_predictions():
    rng = np.random.default_rng(3)
    rb = np.concatenate([rng.uniform(50, 150, (6, 2)), rng.uniform(10, 40, (6, 2)), rng.uniform(-1, 2, (6, 1))], 1)
    ev = OBBEvaluator(["x"])
    ev.add("a", np.concatenate([rb, np.ones((6, 1)), np.zeros((6, 1))], 1), xywhr_to_corners(rb), np.zeros(6))
    m = ev.compute()
    assert m["mAP50-95"] == pytest.approx(1.0) and m["dota_AP50"] == pytest.approx(1.0)
    assert m["mAP50-95_probiou"] == pytest.approx(0.995)  # Ultralytics' compute_ap tops out at 0.995


def test_dota_voc07_ap_hand_case():
    # one image, 2 gts (one difficult), 3 detections: TP (0.9), on difficult (0.8, ignored), FP (0.7, duplicate)
    gt = np.array([[50, 50, 20, 10, 0.3], [150, 150, 20, 10, 0.0]])
    det = np.array([[50, 50, 20, 10, 0.3, 0.9, 0], [150, 150, 20, 10, 0.0, 0.8, 0], [50.5, 50, 20, 10, 0.3, 0.7, 0]])
    ev = OBBEvaluator(["x"])
    ev.add("a", det, xywhr_to_corners(gt), [0, 0], difficult=[False, True])
    m = ev.compute()
    assert m["dota_AP50"] == pytest.approx(1.0)  # recall 1 reached at precision 1 by the first detection
    # COCO AP ignores the difficult flag: 2 gts, both found -> AP50 = 1
    assert m["mAP50"] == pytest.approx(1.0)
    # VOC07 11-point by hand: precision 1/2 at recall 1/2, recall never 1
    assert voc07_ap(np.array([0.9, 0.5]), np.array([0.0, 1.0]), np.array([1.0, 0.0]), 2) == pytest.approx(
        6 / 11 * 0.5)


def test_probiou_figure_differs_from_polygon_iou():
    # a box shifted by 30 % of its width: polygon IoU ~0.54, ProbIoU ~0.6 -> both match at 0.5; at 0.6 only one
    gt = np.array([[100, 100, 40, 20, 0.5]])
    det = np.array([[100 + 12 * np.cos(0.5), 100 + 12 * np.sin(0.5), 40, 20, 0.5, 0.9, 0]])
    ev = OBBEvaluator(["x"])
    ev.add("a", det, xywhr_to_corners(gt), [0])
    m = ev.compute()
    assert m["mAP50"] == pytest.approx(1.0)
    assert m["mAP50-95"] != pytest.approx(m["mAP50-95_probiou"])


def test_bad_inputs_named():
    ev = OBBEvaluator(["x"])
    with pytest.raises(ValueError, match="class 3"):
        ev.add("a", np.array([[1, 1, 2, 2, 0, 0.5, 3]]), np.zeros((0, 4, 2)), [])


def test_probiou_figure_equals_ultralytics_validation():
    """``mAP50(-95)_probiou`` equals Ultralytics' ``match_predictions`` + ``ap_per_class`` on the same data."""
    pytest.importorskip("ultralytics")
    import torch
    from ultralytics.engine.validator import BaseValidator
    from ultralytics.utils.metrics import ap_per_class, batch_probiou

    from visiontrain.detect.obb.geometry import corners_to_xywhr

    rng = np.random.default_rng(7)
    nc, names = 3, ["a", "b", "c"]
    ev = OBBEvaluator(names)
    val = BaseValidator.__new__(BaseValidator)
    val.iouv = torch.linspace(0.5, 0.95, 10)
    tps, confs, pcls, tcls = [], [], [], []
    for i in range(10):
        m = int(rng.integers(0, 7))
        gt = np.concatenate([rng.uniform(30, 170, (m, 2)), rng.uniform(8, 50, (m, 2)), rng.uniform(-0.7, 2.3, (m, 1))], 1)
        gcls = rng.integers(0, nc, m)
        det = np.concatenate([gt + rng.normal(0, 1, gt.shape) * [3, 3, 4, 4, 0.1],
                              np.concatenate([rng.uniform(30, 170, (3, 2)), rng.uniform(8, 50, (3, 2)),
                                              rng.uniform(-0.7, 2.3, (3, 1))], 1)])
        det[:, 2:4] = np.abs(det[:, 2:4]) + 1
        dcls = np.concatenate([np.where(rng.random(m) < 0.8, gcls, rng.integers(0, nc, m)), rng.integers(0, nc, 3)])
        score = rng.random(len(det))
        poly = xywhr_to_corners(gt)
        ev.add(f"im{i}", np.concatenate([det, score[:, None], dcls[:, None]], 1), poly, gcls)
        order = np.argsort(-score, kind="stable")
        d, s, c = det[order], score[order], dcls[order]
        g = torch.as_tensor(corners_to_xywhr(poly)) if m else torch.zeros(0, 5, dtype=torch.float64)
        iou = batch_probiou(g, torch.as_tensor(d)) if m else torch.zeros(0, len(d))
        tps.append(val.match_predictions(torch.as_tensor(c), torch.as_tensor(gcls), iou).numpy())
        confs.append(s)
        pcls.append(c)
        tcls.append(gcls)
    ap = ap_per_class(np.concatenate(tps), np.concatenate(confs), np.concatenate(pcls), np.concatenate(tcls))[5]
    m = ev.compute()
    assert m["mAP50-95_probiou"] == pytest.approx(float(ap.mean()), abs=1e-9)
    assert m["mAP50_probiou"] == pytest.approx(float(ap[:, 0].mean()), abs=1e-9)
    assert 0.1 < m["mAP50_probiou"] < 0.99
