"""Exact IoU of convex polygons, vectorised over pairs (float64, numpy).

The intersection of two convex polygons P and Q is convex, and its vertices are among: the vertices of P
inside (or on) Q, the vertices of Q inside (or on) P, and the crossing points of an edge of P with an edge
of Q. So per pair the candidate points (``n + m + n*m``) are collected with a validity mask, sorted by
angle about their mean, and the shoelace formula gives the area; invalid slots are replaced by the last
valid point, which adds only zero-length edges. Duplicates (shared vertices, touching edges) add nothing.

Polygons are ``[..., K, 2]`` with any orientation (each is turned counter-clockwise by the sign of its
area); they must be convex (rectangles from ``xywhr`` are). A polygon of zero area has IoU 0 with
everything (also with itself). Checked against shapely (tests).
"""

from __future__ import annotations

import numpy as np

EPS = 1e-9


def polygon_area(poly: np.ndarray) -> np.ndarray:
    """Signed shoelace area of ``[..., K, 2]`` polygons (positive counter-clockwise in x-right/y-up axes)."""
    x, y = poly[..., 0], poly[..., 1]
    return 0.5 * (x * np.roll(y, -1, -1) - np.roll(x, -1, -1) * y).sum(-1)


def _ccw(poly: np.ndarray) -> np.ndarray:
    flip = polygon_area(poly) < 0
    return np.where(flip[..., None, None], poly[..., ::-1, :], poly)


def _inside(points: np.ndarray, poly: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``points [N, P, 2]`` inside or on counter-clockwise convex ``poly [N, K, 2]`` -> ``[N, P]``."""
    edge = np.roll(poly, -1, -2) - poly  # [N, K, 2]
    rel = points[:, :, None, :] - poly[:, None, :, :]  # [N, P, K, 2]
    cross = edge[:, None, :, 0] * rel[..., 1] - edge[:, None, :, 1] * rel[..., 0]
    return (cross >= -EPS * scale[:, None, None]).all(-1)


def _crossings(p: np.ndarray, q: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Crossing points of every edge of ``p [N, K, 2]`` with every edge of ``q [N, L, 2]``:
    ``points [N, K*L, 2]`` and ``valid [N, K*L]`` (parallel edges give none)."""
    a, b = p, np.roll(p, -1, -2)
    c, d = q, np.roll(q, -1, -2)
    r = (b - a)[:, :, None, :]  # [N, K, 1, 2]
    s = (d - c)[:, None, :, :]  # [N, 1, L, 2]
    ac = c[:, None, :, :] - a[:, :, None, :]  # [N, K, L, 2]
    denom = r[..., 0] * s[..., 1] - r[..., 1] * s[..., 0]
    ok = np.abs(denom) > EPS * scale[:, None, None] ** 2
    safe = np.where(ok, denom, 1.0)
    t = (ac[..., 0] * s[..., 1] - ac[..., 1] * s[..., 0]) / safe
    u = (ac[..., 0] * r[..., 1] - ac[..., 1] * r[..., 0]) / safe
    tol = 1e-12
    ok &= (t >= -tol) & (t <= 1 + tol) & (u >= -tol) & (u <= 1 + tol)
    pts = a[:, :, None, :] + t[..., None] * r
    N = p.shape[0]
    return pts.reshape(N, -1, 2), ok.reshape(N, -1)


def intersection_area(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Area of ``p ∩ q`` for pairs of convex polygons ``p [N, K, 2]``, ``q [N, L, 2]`` -> ``[N]``."""
    p = _ccw(np.asarray(p, np.float64))
    q = _ccw(np.asarray(q, np.float64))
    N = p.shape[0]
    if N == 0:
        return np.zeros(0)
    both = np.concatenate([p, q], 1)
    scale = np.maximum(np.abs(both).max((1, 2)), 1.0)
    cross_pts, cross_ok = _crossings(p, q, scale)
    pts = np.concatenate([p, q, cross_pts], 1)  # [N, C, 2]
    ok = np.concatenate([_inside(p, q, scale), _inside(q, p, scale), cross_ok], 1)
    count = ok.sum(1)
    centre = (pts * ok[..., None]).sum(1) / np.maximum(count, 1)[:, None]
    angle = np.arctan2(pts[..., 1] - centre[:, None, 1], pts[..., 0] - centre[:, None, 0])
    angle = np.where(ok, angle, np.inf)
    order = np.argsort(angle, axis=1, kind="stable")
    pts = np.take_along_axis(pts, order[..., None], 1)
    last = np.take_along_axis(pts, np.maximum(count - 1, 0)[:, None, None].repeat(2, 2), 1)  # [N, 1, 2]
    valid_sorted = np.arange(pts.shape[1])[None, :] < count[:, None]
    pts = np.where(valid_sorted[..., None], pts, last)
    area = np.abs(polygon_area(pts))
    return np.where(count >= 3, area, 0.0)


def polygon_iou_pairs(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """IoU of pairs of convex polygons ``p [N, K, 2]``, ``q [N, L, 2]`` -> ``[N]`` (0 where the union is 0)."""
    p = np.asarray(p, np.float64)
    q = np.asarray(q, np.float64)
    inter = intersection_area(p, q)
    union = np.abs(polygon_area(p)) + np.abs(polygon_area(q)) - inter
    ok = (union > 0) & (np.abs(polygon_area(p)) > 0) & (np.abs(polygon_area(q)) > 0)
    return np.where(ok, inter / np.where(ok, union, 1.0), 0.0).clip(0.0, 1.0)


def polygon_iou(p: np.ndarray, q: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """IoU matrix ``[N, M]`` between convex polygons ``p [N, K, 2]`` and ``q [M, L, 2]`` (float64).

    Pairs whose bounding rectangles do not overlap are 0 without clipping; the rest are computed in chunks of
    ``chunk`` pairs."""
    p = np.asarray(p, np.float64).reshape(-1, *np.shape(p)[-2:]) if np.size(p) else np.zeros((0, 4, 2))
    q = np.asarray(q, np.float64).reshape(-1, *np.shape(q)[-2:]) if np.size(q) else np.zeros((0, 4, 2))
    out = np.zeros((len(p), len(q)))
    if len(p) == 0 or len(q) == 0:
        return out
    plo, phi = p.min(1), p.max(1)
    qlo, qhi = q.min(1), q.max(1)
    touch = ((np.minimum(phi[:, None], qhi[None]) - np.maximum(plo[:, None], qlo[None])) >= 0).all(-1)
    i, j = np.nonzero(touch)
    for s in range(0, len(i), chunk):
        ii, jj = i[s:s + chunk], j[s:s + chunk]
        out[ii, jj] = polygon_iou_pairs(p[ii], q[jj])
    return out
