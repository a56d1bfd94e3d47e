"""Detection augmentation: letterbox, 4-image mosaic, random affine, HSV jitter, horizontal flip.

Every function takes its randomness from a ``numpy.random.Generator`` passed in (the dataset makes
one per sample with :func:`visiontrain.engine.task.sample_rng`), never from global state.

Coordinates are continuous pixels: pixel ``(i, j)`` covers ``[j, j + 1) x [i, i + 1)``, so a box
``(x1, y1, x2, y2)`` around a filled rectangle of columns ``c0..c1`` has ``x1 = c0``, ``x2 = c1 + 1``.
Geometric transforms are exact in that convention: OpenCV's warp works on pixel *centres*, and
:func:`warp_affine` converts, so a transformed box is the bounding box of the transformed pixels.

Labels are ``[n, 5]`` float32 arrays ``(cls, x1, y1, x2, y2)``, or for oriented boxes ``[n, 9]``
``(cls, x1, y1, …, x4, y4)``: the four corners, which every geometric step transforms exactly (flips, scale,
rotation, mosaic placement move the corners; polygons are never clipped, only dropped when what remains of
their bounding box inside the image is too small); images are ``[H, W, 3]`` uint8.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from visiontrain.detect.config import AugmentConfig

PAD_VALUE = 114


def resize_long_side(
    image: np.ndarray, size: int, interpolation: int | None = None, augment: bool = False
) -> tuple[np.ndarray, tuple[float, float]]:
    """Resize ``[h, w, 3]`` so its longer side is ``size``; returns the image and ``(rx, ry)``.

    The per-axis ratios are exact (``new_w / w``), so ``x_new = x * rx``. Downscaling without
    augmentation uses area interpolation, everything else bilinear."""
    h, w = image.shape[:2]
    r = size / max(h, w)
    nw, nh = min(max(1, math.ceil(w * r - 1e-9)), size), min(max(1, math.ceil(h * r - 1e-9)), size)
    if (nw, nh) == (w, h):
        return image, (1.0, 1.0)
    if interpolation is None:
        interpolation = cv2.INTER_LINEAR if (augment or r > 1) else cv2.INTER_AREA
    return cv2.resize(image, (nw, nh), interpolation=interpolation), (nw / w, nh / h)


def letterbox(
    image: np.ndarray, size: int, augment: bool = False
) -> tuple[np.ndarray, tuple[float, float], tuple[float, float]]:
    """Resize the longer side to ``size`` and pad to ``[size, size, 3]`` with gray, centred.

    Returns ``(image, (rx, ry), (pad_x, pad_y))``: a point maps as ``x' = x * rx + pad_x``."""
    resized, ratio = resize_long_side(image, size, augment=augment)
    out, pad = pad_to_square(resized, size)
    return out, ratio, pad


def pad_to_square(image: np.ndarray, size: int) -> tuple[np.ndarray, tuple[float, float]]:
    """Centre ``[h, w, 3]`` (h, w <= size) on a gray ``[size, size, 3]`` canvas; returns it and ``(pad_x, pad_y)``."""
    h, w = image.shape[:2]
    left, top = (size - w) // 2, (size - h) // 2
    if (h, w) == (size, size):
        return image, (0.0, 0.0)
    out = cv2.copyMakeBorder(
        image,
        top,
        size - h - top,
        left,
        size - w - left,
        cv2.BORDER_CONSTANT,
        value=(PAD_VALUE, PAD_VALUE, PAD_VALUE),
    )
    return out, (float(left), float(top))


def scale_labels(
    labels: np.ndarray, ratio: tuple[float, float], pad: tuple[float, float] = (0.0, 0.0)
) -> np.ndarray:
    """``[n, 5]`` (or ``[n, 9]`` corner) labels mapped by ``x * rx + pad_x``, ``y * ry + pad_y`` (a copy)."""
    out = labels.astype(np.float32, copy=True)
    out[:, 1::2] = out[:, 1::2] * ratio[0] + pad[0]
    out[:, 2::2] = out[:, 2::2] * ratio[1] + pad[1]
    return out


def is_oriented(labels: np.ndarray) -> bool:
    """Labels hold four corners per object (``[n, 9]``) rather than a box (``[n, 5]``)."""
    return labels.ndim == 2 and labels.shape[1] == 9


def label_boxes(labels: np.ndarray) -> np.ndarray:
    """``[n, 4]`` xyxy: the boxes, or the bounding boxes of the corners."""
    if not is_oriented(labels):
        return labels[:, 1:5]
    pts = labels[:, 1:9].reshape(-1, 4, 2)
    return np.concatenate([pts.min(1), pts.max(1)], 1) if len(pts) else np.zeros((0, 4), np.float32)


def mosaic4(
    images: list[np.ndarray], labels: list[np.ndarray], size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Tile 4 images around a random centre of a ``[2*size, 2*size, 3]`` canvas.

    ``images[k]`` (longer side <= ``size``) touches the centre with its bottom-right, bottom-left,
    top-right and top-left corner for k = 0..3; parts beyond the canvas are cut and boxes clipped to
    the canvas. Returns the canvas and the ``[n, 5]`` labels in canvas pixels."""
    s2 = 2 * size
    xc, yc = (int(v) for v in rng.uniform(size * 0.5, size * 1.5, 2))
    canvas = np.full((s2, s2, 3), PAD_VALUE, dtype=np.uint8)
    out = []
    for k, (img, lab) in enumerate(zip(images, labels)):
        h, w = img.shape[:2]
        x0 = xc - w if k in (0, 2) else xc  # top-left of the image on the canvas (may be negative)
        y0 = yc - h if k in (0, 1) else yc
        cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x0 + w, s2), min(y0 + h, s2)
        canvas[cy0:cy1, cx0:cx1] = img[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]
        out.append(scale_labels(lab, (1.0, 1.0), (x0, y0)))
    merged = np.concatenate(out) if out else np.zeros((0, 5), np.float32)
    return canvas, merged if is_oriented(merged) else clip_labels(merged, s2, s2)


def clip_labels(labels: np.ndarray, width: float, height: float) -> np.ndarray:
    """Clip boxes to ``[0, width] x [0, height]`` in place and return ``labels``."""
    labels[:, [1, 3]] = labels[:, [1, 3]].clip(0, width)
    labels[:, [2, 4]] = labels[:, [2, 4]].clip(0, height)
    return labels


def affine_matrix(
    in_size: tuple[int, int],
    out_size: int,
    rng: np.random.Generator,
    degrees: float = 0.0,
    translate: float = 0.0,
    scale: float = 0.0,
    shear: float = 0.0,
) -> tuple[np.ndarray, float]:
    """A random ``[3, 3]`` affine in continuous pixel coordinates and its scale factor.

    The centre of the ``in_size = (w, h)`` input goes to the centre of the ``out_size`` square
    output, shifted by up to ``translate * out_size``; around it the input is rotated, scaled and
    sheared."""
    centre = np.eye(3)
    centre[0, 2], centre[1, 2] = -in_size[0] / 2, -in_size[1] / 2
    angle = math.radians(rng.uniform(-degrees, degrees))
    s = rng.uniform(1 - scale, 1 + scale)
    rot = np.eye(3)
    rot[:2, :2] = [[s * math.cos(angle), s * math.sin(angle)], [-s * math.sin(angle), s * math.cos(angle)]]
    sh = np.eye(3)
    sh[0, 1] = math.tan(math.radians(rng.uniform(-shear, shear)))
    sh[1, 0] = math.tan(math.radians(rng.uniform(-shear, shear)))
    tr = np.eye(3)
    tr[0, 2] = rng.uniform(0.5 - translate, 0.5 + translate) * out_size
    tr[1, 2] = rng.uniform(0.5 - translate, 0.5 + translate) * out_size
    return tr @ sh @ rot @ centre, float(s)


def warp_affine(image: np.ndarray, matrix: np.ndarray, out_size: int) -> np.ndarray:
    """Apply a continuous-coordinate ``[3, 3]`` affine to ``[H, W, 3]``; output ``[out, out, 3]``.

    OpenCV maps pixel centres (index ``i`` sits at ``i + 0.5``), so the translation is corrected by
    ``0.5 * (A @ 1 - 1)``."""
    a, t = matrix[:2, :2], matrix[:2, 2]
    m = np.concatenate([a, (t + 0.5 * a.sum(1) - 0.5)[:, None]], 1)
    return cv2.warpAffine(
        image,
        m,
        (out_size, out_size),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=(PAD_VALUE, PAD_VALUE, PAD_VALUE),
    )


def transform_boxes(boxes: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """``[n, 4]`` xyxy boxes through a ``[3, 3]`` affine: the bounds of the 4 transformed corners."""
    x1, y1, x2, y2 = boxes.T
    corners = np.stack(
        [np.stack([x1, y1], 1), np.stack([x2, y1], 1), np.stack([x2, y2], 1), np.stack([x1, y2], 1)], 1
    )
    pts = corners @ matrix[:2, :2].T + matrix[:2, 2]  # [n, 4, 2]
    return np.concatenate([pts.min(1), pts.max(1)], 1).astype(np.float32)


def box_candidates(
    before: np.ndarray,
    after: np.ndarray,
    area_gain: float,
    min_size: float = 2.0,
    min_area_ratio: float = 0.1,
    max_aspect: float = 100.0,
) -> np.ndarray:
    """``[n]`` bool: boxes still worth training on after a transform (``[n, 4]`` xyxy before/after).

    Keeps boxes at least ``min_size`` wide and tall, that keep ``min_area_ratio`` of their area
    (``before`` area times ``area_gain``, the transform's area scale) and whose aspect ratio stays
    below ``max_aspect``."""
    w0, h0 = before[:, 2] - before[:, 0], before[:, 3] - before[:, 1]
    w1, h1 = after[:, 2] - after[:, 0], after[:, 3] - after[:, 1]
    aspect = np.maximum(w1 / (h1 + 1e-16), h1 / (w1 + 1e-16))
    return (
        (w1 > min_size)
        & (h1 > min_size)
        & (w1 * h1 / (w0 * h0 * area_gain + 1e-16) > min_area_ratio)
        & (aspect < max_aspect)
    )


def random_affine(
    image: np.ndarray, labels: np.ndarray, out_size: int, rng: np.random.Generator, cfg: AugmentConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Warp ``[H, W, 3]`` (a letterboxed image or a mosaic canvas) to ``[out, out, 3]``.

    Boxes go through the same matrix, are clipped to the output and filtered by
    :func:`box_candidates`. Returns the image and the kept ``[m, 5]`` labels."""
    h, w = image.shape[:2]
    m, s = affine_matrix((w, h), out_size, rng, cfg.degrees, cfg.translate, cfg.scale, cfg.shear)
    identity = np.allclose(m, np.eye(3)) and (h, w) == (out_size, out_size)
    out = image if identity else warp_affine(image, m, out_size)
    if len(labels) == 0:
        return out, labels.reshape(0, labels.shape[1] if labels.ndim == 2 else 5).astype(np.float32)
    if is_oriented(labels):  # corners through the matrix, unclipped; kept by their clipped bounding boxes
        pts = labels[:, 1:9].reshape(-1, 4, 2) @ m[:2, :2].T + m[:2, 2]
        corners = pts.reshape(-1, 8).astype(np.float32)
        after = np.concatenate([pts.min(1), pts.max(1)], 1).clip(0, out_size)
        keep = box_candidates(label_boxes(labels), after, abs(np.linalg.det(m[:2, :2])), cfg.min_box_size,
                              cfg.min_area_ratio, cfg.max_aspect)
        return out, np.concatenate([labels[keep, :1], corners[keep]], 1).astype(np.float32)
    boxes = transform_boxes(labels[:, 1:5], m)
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, out_size)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, out_size)
    keep = box_candidates(
        labels[:, 1:5],
        boxes,
        abs(np.linalg.det(m[:2, :2])),
        cfg.min_box_size,
        cfg.min_area_ratio,
        cfg.max_aspect,
    )
    return out, np.concatenate([labels[keep, :1], boxes[keep]], 1).astype(np.float32)


def hsv_jitter(
    image: np.ndarray, rng: np.random.Generator, hgain: float, sgain: float, vgain: float
) -> np.ndarray:
    """Random hue/saturation/value gains on a BGR ``[H, W, 3]`` uint8 image, via lookup tables."""
    if not (hgain or sgain or vgain):
        return image
    gains = rng.uniform(-1, 1, 3) * (hgain, sgain, vgain) + 1
    hue, sat, val = cv2.split(cv2.cvtColor(image, cv2.COLOR_BGR2HSV))
    x = np.arange(256, dtype=np.float32)
    lut_h = ((x * gains[0]) % 180).astype(np.uint8)
    lut_s = np.clip(x * gains[1], 0, 255).astype(np.uint8)
    lut_v = np.clip(x * gains[2], 0, 255).astype(np.uint8)
    hsv = cv2.merge((cv2.LUT(hue, lut_h), cv2.LUT(sat, lut_s), cv2.LUT(val, lut_v)))
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)


def flip_lr(image: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mirror ``[H, W, 3]`` left-right; boxes become ``(W - x2, W - x1)``."""
    w = image.shape[1]
    out = labels.copy()
    if is_oriented(labels):
        out[:, 1::2] = w - labels[:, 1::2]
        return np.ascontiguousarray(image[:, ::-1]), out
    out[:, 1], out[:, 3] = w - labels[:, 3], w - labels[:, 1]
    return np.ascontiguousarray(image[:, ::-1]), out


def flip_ud(image: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mirror ``[H, W, 3]`` top-bottom; boxes become ``(H - y2, H - y1)``."""
    h = image.shape[0]
    out = labels.copy()
    if is_oriented(labels):
        out[:, 2::2] = h - labels[:, 2::2]
        return np.ascontiguousarray(image[::-1]), out
    out[:, 2], out[:, 4] = h - labels[:, 4], h - labels[:, 2]
    return np.ascontiguousarray(image[::-1]), out


def augment_train(
    images: list[np.ndarray],
    labels: list[np.ndarray],
    size: int,
    rng: np.random.Generator,
    cfg: AugmentConfig,
    mosaic: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """The training pipeline on images already resized to longer side ``size`` (BGR, labels in their pixels).

    ``mosaic=True`` needs 4 images: mosaic on a ``2*size`` canvas, then a random affine that
    crops the centre to ``size``. Otherwise only ``images[0]`` is used: letterbox to ``size``, then a
    random affine. Then HSV jitter and flips. Returns ``[size, size, 3]`` and ``[m, 5]`` labels."""
    if mosaic:
        canvas, lab = mosaic4(images[:4], labels[:4], size, rng)
    else:
        canvas, pad = pad_to_square(images[0], size)
        lab = scale_labels(labels[0], (1.0, 1.0), pad)
    img, lab = random_affine(canvas, lab, size, rng, cfg)
    img = hsv_jitter(img, rng, cfg.hsv_h, cfg.hsv_s, cfg.hsv_v)
    if rng.random() < cfg.fliplr:
        img, lab = flip_lr(img, lab)
    if rng.random() < cfg.flipud:
        img, lab = flip_ud(img, lab)
    return img, lab
