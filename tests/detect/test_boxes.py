"""Box geometry: float64 references written from the formulas, and bit parity with Ultralytics' helpers."""

from __future__ import annotations

import math

import pytest
import torch

from visiontrain.detect.boxes import (
    bbox2dist,
    bbox_ciou,
    dfl_decode,
    dist2bbox,
    make_anchors,
    xywh2xyxy,
    xyxy2xywh,
)


def random_xyxy(n: int, g: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=g, dtype=dtype) * 50
    wh = torch.rand(n, 2, generator=g, dtype=dtype) * 20 + 0.05
    return torch.cat((xy, xy + wh), 1)


def ciou_reference(b1: list[float], b2: list[float], eps: float = 1e-7) -> float:
    """CIoU of one pair from the paper's definition (Zheng et al. 2020), with eps on heights/union/diag."""
    x1, y1, x2, y2 = b1
    u1, v1, u2, v2 = b2
    w1, h1 = x2 - x1, y2 - y1 + eps
    w2, h2 = u2 - u1, v2 - v1 + eps
    iw = max(min(x2, u2) - max(x1, u1), 0.0)
    ih = max(min(y2, v2) - max(y1, v1), 0.0)
    inter = iw * ih
    iou = inter / (w1 * h1 + w2 * h2 - inter + eps)
    c2 = (max(x2, u2) - min(x1, u1)) ** 2 + (max(y2, v2) - min(y1, v1)) ** 2 + eps
    rho2 = ((u1 + u2) / 2 - (x1 + x2) / 2) ** 2 + ((v1 + v2) / 2 - (y1 + y2) / 2) ** 2
    v = 4 / math.pi**2 * (math.atan(w2 / h2) - math.atan(w1 / h1)) ** 2
    alpha = v / (1 - iou + v + eps)
    return iou - rho2 / c2 - alpha * v


def test_ciou_matches_float64_reference_including_disjoint_and_nested_boxes():
    g = torch.Generator().manual_seed(0)
    b1 = random_xyxy(300, g)
    b2 = random_xyxy(300, g)
    b2[:50] = b1[:50] + (torch.rand(50, 4, generator=g, dtype=torch.float64) - 0.5) * 0.01  # near-identical
    b2[50:60] = torch.stack((b1[50:60, 0] + 1, b1[50:60, 1] + 1, b1[50:60, 2] - 1, b1[50:60, 3] - 1), 1)
    b2[60:70] = b1[60:70] + 200  # far apart: IoU 0, penalty only
    ours = bbox_ciou(b1, b2)
    ref = torch.tensor([ciou_reference(p.tolist(), q.tolist()) for p, q in zip(b1, b2)], dtype=torch.float64)
    assert ours.shape == (300,)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    assert (ours[60:70] < 0).all() and (ours[:50] > 0).all()


def test_ciou_gradient_treats_alpha_as_constant():
    """Autograd of ``bbox_ciou`` equals central differences of CIoU with ``alpha`` frozen (float64)."""
    g = torch.Generator().manual_seed(1)
    b1 = random_xyxy(40, g).requires_grad_()
    b2 = random_xyxy(40, g)
    b2[:20] = b1[:20].detach() + torch.rand(20, 4, generator=g, dtype=torch.float64)  # overlapping pairs
    bbox_ciou(b1, b2).sum().backward()

    pairs = list(zip(b1.detach().tolist(), b2.tolist()))
    eps = 1e-7

    def alpha_of(p, q):
        w1, h1 = p[2] - p[0], p[3] - p[1] + eps
        w2, h2 = q[2] - q[0], q[3] - q[1] + eps
        inter = max(min(p[2], q[2]) - max(p[0], q[0]), 0) * max(min(p[3], q[3]) - max(p[1], q[1]), 0)
        iou = inter / (w1 * h1 + w2 * h2 - inter + eps)
        v = 4 / math.pi**2 * (math.atan(w2 / h2) - math.atan(w1 / h1)) ** 2
        return v / (1 - iou + v + eps), v

    def ciou_frozen(p, q, alpha):
        a_now, v = alpha_of(p, q)
        return ciou_reference(p, q) + a_now * v - alpha * v  # swap the live alpha for the frozen one

    step = 1e-6
    numeric = torch.zeros_like(b1)
    for i, (p, q) in enumerate(pairs):
        alpha, _ = alpha_of(p, q)
        for j in range(4):
            hi, lo = list(p), list(p)
            hi[j] += step
            lo[j] -= step
            numeric[i, j] = (ciou_frozen(hi, q, alpha) - ciou_frozen(lo, q, alpha)) / (2 * step)
    torch.testing.assert_close(b1.grad, numeric, rtol=1e-5, atol=1e-7)


def test_dfl_decode_is_expected_bin_per_side():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(5, 7, 64, generator=g, dtype=torch.float64)
    ours = dfl_decode(logits, 16)
    p = logits.view(5, 7, 4, 16).exp()
    p = p / p.sum(-1, keepdim=True)
    ref = (p * torch.arange(16, dtype=torch.float64)).sum(-1)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


def test_dist_bbox_round_trip_and_clamp():
    g = torch.Generator().manual_seed(3)
    anchors = torch.rand(100, 2, generator=g, dtype=torch.float64) * 80
    dist = torch.rand(100, 4, generator=g, dtype=torch.float64) * 14
    boxes = dist2bbox(dist, anchors)
    torch.testing.assert_close(bbox2dist(anchors, boxes), dist)
    xywh = dist2bbox(dist, anchors, xywh=True)
    torch.testing.assert_close(xywh2xyxy(xywh), boxes)
    far = bbox2dist(
        anchors, boxes + torch.tensor([-100.0, -100.0, 100.0, 100.0], dtype=torch.float64), reg_max=15
    )
    assert far.max() == pytest.approx(14.99) and far.min() >= 0


def test_conversions_anchors_and_ciou_match_ultralytics_bit_for_bit():
    pytest.importorskip("ultralytics")
    from ultralytics.utils.metrics import bbox_iou
    from ultralytics.utils.ops import xywh2xyxy as u_xywh2xyxy
    from ultralytics.utils.ops import xyxy2xywh as u_xyxy2xywh
    from ultralytics.utils.tal import bbox2dist as u_bbox2dist
    from ultralytics.utils.tal import dist2bbox as u_dist2bbox
    from ultralytics.utils.tal import make_anchors as u_make_anchors

    g = torch.Generator().manual_seed(4)
    b1 = random_xyxy(1000, g, torch.float32)
    b2 = random_xyxy(1000, g, torch.float32)
    assert torch.equal(xyxy2xywh(b1), u_xyxy2xywh(b1))
    assert torch.equal(xywh2xyxy(b1), u_xywh2xyxy(b1))
    assert torch.equal(bbox_ciou(b1, b2), bbox_iou(b1, b2, xywh=False, CIoU=True).squeeze(-1))

    feats = [torch.zeros(2, 3, 40, 60), torch.zeros(2, 3, 20, 30), torch.zeros(2, 3, 10, 15)]
    points, strides = make_anchors(feats, [8, 16, 32])
    u_points, u_strides = u_make_anchors(feats, torch.tensor([8.0, 16.0, 32.0]), 0.5)
    assert torch.equal(points, u_points) and torch.equal(strides, u_strides)
    points2, strides2 = make_anchors([(40, 60), (20, 30), (10, 15)], [8, 16, 32])
    assert torch.equal(points2, u_points) and torch.equal(strides2, u_strides)
    assert points.shape == (40 * 60 + 20 * 30 + 10 * 15, 2)

    dist = torch.rand(len(points), 4, generator=g) * 15
    assert torch.equal(dist2bbox(dist, points), u_dist2bbox(dist, points, xywh=False))
    boxes = dist2bbox(dist, points) + 3
    assert torch.equal(bbox2dist(points, boxes, 15), u_bbox2dist(points, boxes.clone(), 15))


def test_make_anchors_rejects_mismatched_strides():
    with pytest.raises(ValueError, match="3 feature levels but 2 strides"):
        make_anchors([(8, 8), (4, 4), (2, 2)], [8, 16])
