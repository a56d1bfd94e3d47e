"""Oriented-box geometry and exact polygon IoU: Ultralytics (conversions, ProbIoU) and shapely as oracles."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from visiontrain.detect.obb.geometry import (
    corners_to_xywhr,
    probiou,
    probiou_matrix,
    regularize_rboxes,
    xywhr_to_corners,
)
from visiontrain.detect.obb.polygon_iou import polygon_iou, polygon_iou_pairs


def random_rboxes(n: int, seed: int, span: float = 100.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    lo = torch.tensor([0, 0, 1, 1, -math.pi])
    hi = torch.tensor([span, span, 40, 25, math.pi])
    return lo + torch.rand(n, 5, generator=g) * (hi - lo)


def test_conversions_match_ultralytics():
    ops = pytest.importorskip("ultralytics.utils.ops")
    b = random_rboxes(200, 0)
    assert torch.equal(xywhr_to_corners(b), ops.xywhr2xyxyxyxy(b))
    assert np.array_equal(xywhr_to_corners(b.numpy()), ops.xywhr2xyxyxyxy(b.numpy()))
    assert torch.equal(regularize_rboxes(b), ops.regularize_rboxes(b))
    c = xywhr_to_corners(b.double())
    ours = corners_to_xywhr(c)
    theirs = ops.xyxyxyxy2xywhr(c)  # cv2.minAreaRect in float32
    assert torch.allclose(ours, theirs, atol=1e-4)


def test_corners_roundtrip_is_exact_and_canonical():
    b = random_rboxes(100, 1).double()
    back = corners_to_xywhr(xywhr_to_corners(b))
    assert (back[:, 2] >= back[:, 3]).all()
    assert ((back[:, 4] >= -math.pi / 4) & (back[:, 4] < 3 * math.pi / 4)).all()
    # the same rectangle: identical corner sets
    assert np.allclose(polygon_iou_pairs(xywhr_to_corners(b).numpy(), xywhr_to_corners(back).numpy()), 1.0)
    assert torch.allclose(back[:, :2], b[:, :2], atol=1e-9)
    assert torch.allclose(back[:, 2:4].sort(1).values, b[:, 2:4].sort(1).values, atol=1e-9)


def test_probiou_matches_ultralytics():
    metrics = pytest.importorskip("ultralytics.utils.metrics")
    a, b = random_rboxes(40, 2), random_rboxes(50, 3)
    assert torch.equal(probiou_matrix(a, b), metrics.batch_probiou(a, b))
    assert torch.equal(probiou(a, b[:40], floor=0.01), metrics.probiou(a, b[:40], floor=0.01).squeeze(-1))
    assert torch.allclose(probiou(a, a), torch.ones(40), atol=1e-3)


def shapely_iou(p: np.ndarray, q: np.ndarray) -> float:
    from shapely.geometry import Polygon

    a, b = Polygon(p), Polygon(q)
    union = a.union(b).area
    return a.intersection(b).area / union if union > 0 and a.area > 0 and b.area > 0 else 0.0


def test_polygon_iou_random_vs_shapely():
    pytest.importorskip("shapely")
    p = xywhr_to_corners(random_rboxes(60, 4, span=60).double().numpy())
    q = xywhr_to_corners(random_rboxes(70, 5, span=60).double().numpy())
    ours = polygon_iou(p, q)
    ref = np.array([[shapely_iou(a, b) for b in q] for a in p])
    assert (ref > 0).sum() > 300  # many overlapping pairs
    assert np.abs(ours - ref).max() < 1e-10


def test_polygon_iou_general_convex_quads_vs_shapely():
    pytest.importorskip("shapely")
    rng = np.random.default_rng(6)
    # convex quads from 4 sorted angles on ellipses, clockwise and counter-clockwise
    ang = np.sort(rng.uniform(0, 2 * np.pi, (80, 4)), 1)
    rad = rng.uniform(5, 20, (80, 1, 2))
    quads = rng.uniform(0, 30, (80, 1, 2)) + rad * np.stack([np.cos(ang), np.sin(ang)], -1)
    quads[::2] = quads[::2, ::-1]
    ours = polygon_iou(quads[:40], quads[40:])
    ref = np.array([[shapely_iou(a, b) for b in quads[40:]] for a in quads[:40]])
    assert np.abs(ours - ref).max() < 1e-10


@pytest.mark.parametrize(
    "p, q, expected",
    [
        ([[0, 0], [2, 0], [2, 2], [0, 2]], [[2, 0], [4, 0], [4, 2], [2, 2]], 0.0),  # touching along an edge
        ([[0, 0], [2, 0], [2, 2], [0, 2]], [[2, 2], [4, 2], [4, 4], [2, 4]], 0.0),  # touching at a corner
        ([[0, 0], [4, 0], [4, 4], [0, 4]], [[1, 1], [2, 1], [2, 2], [1, 2]], 1 / 16),  # nested
        ([[0, 0], [4, 0], [4, 4], [0, 4]], [[0, 0], [2, 0], [2, 2], [0, 2]], 4 / 16),  # nested, sharing a corner
        ([[0, 0], [3, 0], [3, 1], [0, 1]], [[0, 0], [3, 0], [3, 1], [0, 1]], 1.0),  # identical
        ([[0, 0], [3, 0], [3, 1], [0, 1]], [[0, 1], [0, 0], [3, 0], [3, 1]], 1.0),  # identical, rotated order
        ([[0, 0], [3, 0], [3, 1], [0, 1]], [[0, 1], [3, 1], [3, 0], [0, 0]], 1.0),  # identical, clockwise
        ([[0, 0], [2, 0], [2, 0], [0, 0]], [[0, 0], [2, 0], [2, 2], [0, 2]], 0.0),  # zero area (a segment)
        ([[1, 1], [1, 1], [1, 1], [1, 1]], [[1, 1], [1, 1], [1, 1], [1, 1]], 0.0),  # zero area, identical
        ([[0, 0], [2, 0], [2, 2], [0, 2]], [[1, -1], [3, 1], [1, 3], [-1, 1]], None),  # diamond over square
        ([[0, 0], [4, 0], [4, 1], [0, 1]], [[1, -1], [2, -1], [2, 3], [1, 3]], None),  # a cross
    ],
)
def test_polygon_iou_degenerate_vs_shapely(p, q, expected):
    pytest.importorskip("shapely")
    p, q = np.array(p, float), np.array(q, float)
    ours = float(polygon_iou(p[None], q[None])[0, 0])
    ref = shapely_iou(p, q)
    assert ours == pytest.approx(ref, abs=1e-12)
    if expected is not None:
        assert ours == pytest.approx(expected, abs=1e-12)


def test_polygon_iou_empty_inputs():
    assert polygon_iou(np.zeros((0, 4, 2)), np.zeros((3, 4, 2))).shape == (0, 3)
    assert polygon_iou(np.zeros((2, 4, 2)), np.zeros((0, 4, 2))).shape == (2, 0)
