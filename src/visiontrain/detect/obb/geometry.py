"""Oriented-box geometry: ``xywhr`` <-> corner polygons, angle regularisation, ProbIoU.

* :func:`xywhr_to_corners` ``[..., 5] -> [..., 4, 2]``: ``c + u + v, c + u - v, c - u - v, c - u + v`` with
  ``u = w/2 (cos r, sin r)`` and ``v = h/2 (-sin r, cos r)`` (Ultralytics' corner order).
* :func:`corners_to_xywhr` ``[..., 4, 2] -> [..., 5]``: the minimum-area rectangle of the points
  (float64, exact for rectangles), canonical as Ultralytics' ``xyxyxyxy2xywhr``: ``w >= h`` and the angle
  in ``[-pi/4, 3pi/4)``.
* :func:`regularize_rboxes`: Ultralytics' canonical form for predictions: angle in ``[0, pi/2)``, w and h
  swapped where the angle mod pi was in ``[pi/2, pi)``.
* :func:`probiou` (element-wise) and :func:`probiou_matrix` (``[N, M]``): ProbIoU (Llerena et al. 2021,
  arXiv:2106.06072): each box is the Gaussian with its centre and the covariance of a uniform rectangle
  (``w^2/12``, ``h^2/12`` along its axes); ``ProbIoU = 1 - sqrt(1 - exp(-B_D) + eps)`` with ``B_D`` the
  Bhattacharyya distance clamped to ``[eps, 100]``. The ``eps`` placements are Ultralytics' (so the
  assigner ranks anchors identically); ``floor`` is added to both variances (Ultralytics' loss uses 0.01).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor


def xywhr_to_corners(boxes: Tensor | np.ndarray) -> Tensor | np.ndarray:
    """``[..., 5]`` (cx, cy, w, h, r) -> ``[..., 4, 2]`` corners (torch or numpy, dtype kept)."""
    lib = torch if isinstance(boxes, Tensor) else np
    c = boxes[..., :2]
    w, h, r = boxes[..., 2:3], boxes[..., 3:4], boxes[..., 4:5]
    cos, sin = lib.cos(r), lib.sin(r)
    cat = torch.cat if lib is torch else np.concatenate
    u = cat([w / 2 * cos, w / 2 * sin], -1)
    v = cat([-h / 2 * sin, h / 2 * cos], -1)
    return lib.stack([c + u + v, c + u - v, c - u - v, c - u + v], -2)


def canonical_angle(w, h, r):
    """``(w, h, r)`` with ``w >= h`` and ``r`` in ``[-pi/4, 3pi/4)`` (numpy arrays, float64)."""
    swap = w < h
    w, h = np.where(swap, h, w), np.where(swap, w, h)
    r = np.where(swap, r + np.pi / 2, r)
    r = (r + np.pi / 4) % np.pi - np.pi / 4
    return w, h, r


def corners_to_xywhr(points: Tensor | np.ndarray) -> Tensor | np.ndarray:
    """Minimum-area rectangle of each point set ``[..., P, 2]`` (``P >= 3``; ``[..., 2P]`` flat also accepted)
    as canonical ``[..., 5]`` xywhr (``w >= h``, angle in ``[-pi/4, 3pi/4)``).

    The minimum-area rectangle has a side along an edge of the convex hull, and every hull edge joins two of
    the points, so the rectangle aligned with each pair direction is tried and the smallest kept (float64).
    Returns the input's type (a tensor keeps its dtype and device)."""
    is_torch = isinstance(points, Tensor)
    p = points.detach().cpu().double().numpy() if is_torch else np.asarray(points, np.float64)
    if p.shape[-1] != 2:
        p = p.reshape(*p.shape[:-1], -1, 2)
    lead, P = p.shape[:-2], p.shape[-2]
    p = p.reshape(-1, P, 2)
    i, j = np.triu_indices(P, 1)
    d = p[:, j] - p[:, i]  # [N, E, 2] pair directions
    theta = np.arctan2(d[..., 1], d[..., 0])
    cos, sin = np.cos(theta), np.sin(theta)
    # coordinates of every point in the frame of every direction: [N, E, P]
    along = p[:, None, :, 0] * cos[..., None] + p[:, None, :, 1] * sin[..., None]
    across = -p[:, None, :, 0] * sin[..., None] + p[:, None, :, 1] * cos[..., None]
    lo_a, hi_a, lo_c, hi_c = along.min(-1), along.max(-1), across.min(-1), across.max(-1)
    area = (hi_a - lo_a) * (hi_c - lo_c)
    best = np.argmin(area, axis=1) if len(p) else np.zeros(0, np.int64)
    n = np.arange(len(p))
    ca, cc = (lo_a + hi_a)[n, best] / 2, (lo_c + hi_c)[n, best] / 2
    cs, sn, th = cos[n, best], sin[n, best], theta[n, best]
    cx, cy = ca * cs - cc * sn, ca * sn + cc * cs
    w, h, r = canonical_angle((hi_a - lo_a)[n, best], (hi_c - lo_c)[n, best], th)
    out = np.stack([cx, cy, w, h, r], -1).reshape(*lead, 5)
    return torch.as_tensor(out, dtype=points.dtype, device=points.device) if is_torch else out


def regularize_rboxes(rboxes: Tensor) -> Tensor:
    """``[..., 5]`` xywhr with the angle taken modulo pi/2 into ``[0, pi/2)`` and w, h swapped where the angle
    modulo pi lies in ``[pi/2, pi)`` (the same rectangle; Ultralytics' form for predicted boxes)."""
    x, y, w, h, r = rboxes.unbind(-1)
    swap = r % math.pi >= math.pi / 2
    return torch.stack([x, y, torch.where(swap, h, w), torch.where(swap, w, h), r % (math.pi / 2)], -1)


def _covariance(boxes: Tensor, floor: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """``[..., 5]`` xywhr -> covariance ``[[a, c], [c, b]]`` entries, each ``[...]``."""
    va = boxes[..., 2].pow(2) / 12 + floor
    vb = boxes[..., 3].pow(2) / 12 + floor
    r = boxes[..., 4]
    cos, sin = r.cos(), r.sin()
    cos2, sin2 = cos.pow(2), sin.pow(2)
    return va * cos2 + vb * sin2, va * sin2 + vb * cos2, (va - vb) * cos * sin


def _probiou_from_parts(x1, y1, a1, b1, c1, x2, y2, a2, b2, c2, eps: float) -> Tensor:
    sa, sb, sc = a1 + a2, b1 + b2, c1 + c2
    det = sa * sb - sc.pow(2)
    t1 = (sa * (y1 - y2).pow(2) + sb * (x1 - x2).pow(2)) / (det + eps) * 0.25
    t2 = (sc * (x2 - x1) * (y1 - y2)) / (det + eps) * 0.5
    d1 = (a1 * b1 - c1.pow(2)).clamp(min=0)
    d2 = (a2 * b2 - c2.pow(2)).clamp(min=0)
    t3 = (det / (4 * (d1 * d2).sqrt() + eps) + eps).log() * 0.5
    bd = (t1 + t2 + t3).clamp(eps, 100.0)
    return 1 - (1.0 - (-bd).exp() + eps).sqrt()


def probiou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-7, floor: float = 0.0) -> Tensor:
    """Element-wise ProbIoU of ``[..., 5]`` xywhr boxes (broadcasting) -> ``[...]``."""
    a1, b1, c1 = _covariance(boxes1, floor)
    a2, b2, c2 = _covariance(boxes2, floor)
    return _probiou_from_parts(boxes1[..., 0], boxes1[..., 1], a1, b1, c1,
                               boxes2[..., 0], boxes2[..., 1], a2, b2, c2, eps)


def probiou_matrix(boxes1: Tensor | np.ndarray, boxes2: Tensor | np.ndarray, eps: float = 1e-7) -> Tensor:
    """ProbIoU ``[N, M]`` between ``boxes1 [N, 5]`` and ``boxes2 [M, 5]`` (xywhr)."""
    b1 = torch.as_tensor(boxes1)
    b2 = torch.as_tensor(boxes2)
    return probiou(b1[:, None, :], b2[None, :, :], eps)
