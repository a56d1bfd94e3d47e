"""Draw detections (and ground truth) on images and save image grids (OpenCV, BGR uint8).

Predictions are ``[n, 6]`` rows ``(x1, y1, x2, y2, score, cls)`` and ground truth ``[m, 5]`` rows
``(cls, x1, y1, x2, y2)``, both in the pixels of the image they are drawn on. Predictions get one
colour per class and a ``name score`` tag; ground truth is drawn as thin white boxes underneath.
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch


def class_color(cls: int) -> tuple[int, int, int]:
    """A distinct, stable BGR colour for class ``cls`` (golden-ratio hue steps)."""
    r, g, b = colorsys.hsv_to_rgb((cls * 0.618033988749895) % 1.0, 0.85, 1.0)
    return int(b * 255), int(g * 255), int(r * 255)


def _tag(image: np.ndarray, text: str, x: int, y: int, color: tuple[int, int, int], scale: float) -> None:
    (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    y_top = y - th - base - 2 if y - th - base - 2 >= 0 else y
    cv2.rectangle(image, (x, y_top), (x + tw + 2, y_top + th + base + 2), color, -1)
    luminance = 0.114 * color[0] + 0.587 * color[1] + 0.299 * color[2]
    cv2.putText(image, text, (x + 1, y_top + th + 1), cv2.FONT_HERSHEY_SIMPLEX, scale,
                (0, 0, 0) if luminance > 140 else (255, 255, 255), 1, cv2.LINE_AA)


def draw_detections(image: np.ndarray, preds: np.ndarray | torch.Tensor | None = None,
                    class_names: Sequence[str] | None = None, gt: np.ndarray | torch.Tensor | None = None,
                    conf: float = 0.0, thickness: int | None = None) -> np.ndarray:
    """A copy of BGR ``[H, W, 3]`` uint8 ``image`` with ``gt [m, 5]`` and ``preds [n, 6]`` drawn.

    Predictions scoring below ``conf`` are skipped; labels read ``name 0.87``."""
    out = np.ascontiguousarray(image).copy()
    h, w = out.shape[:2]
    t = thickness or max(1, round(max(h, w) / 400))
    scale = max(0.35, max(h, w) / 1300)

    def name(c: int) -> str:
        return class_names[c] if class_names is not None and 0 <= c < len(class_names) else str(c)

    if gt is not None and len(gt):
        for _c, x1, y1, x2, y2 in np.asarray(gt, dtype=np.float64).reshape(-1, 5):
            cv2.rectangle(out, (round(x1), round(y1)), (round(x2) - 1, round(y2) - 1), (255, 255, 255), 1)
    if preds is not None and len(preds):
        p = np.asarray(preds.detach().cpu() if isinstance(preds, torch.Tensor) else preds, dtype=np.float64)
        p = p.reshape(-1, 6)
        for x1, y1, x2, y2, score, c in p[np.argsort(p[:, 4])]:  # best on top
            if score < conf:
                continue
            color = class_color(int(c))
            cv2.rectangle(out, (round(x1), round(y1)), (round(x2) - 1, round(y2) - 1), color, t)
            _tag(out, f"{name(int(c))} {score:.2f}", round(x1), round(y1), color, scale)
    return out


def make_grid(images: Sequence[np.ndarray], cols: int | None = None, pad: int = 4) -> np.ndarray:
    """Tile ``[H_i, W_i, 3]`` images into one ``[rows * H, cols * W, 3]`` image (gray padding)."""
    if not images:
        raise ValueError("make_grid: no images")
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    ch, cw = max(i.shape[0] for i in images), max(i.shape[1] for i in images)
    grid = np.full((rows * (ch + pad) + pad, cols * (cw + pad) + pad, 3), 60, np.uint8)
    for k, im in enumerate(images):
        r, c = divmod(k, cols)
        y, x = pad + r * (ch + pad), pad + c * (cw + pad)
        grid[y:y + im.shape[0], x:x + im.shape[1]] = im
    return grid


def save_image(path: str | Path, image: np.ndarray) -> Path:
    """Write a BGR image as PNG or JPG (by suffix), creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), image):
        raise ValueError(f"{path}: could not write the image (use a .png or .jpg name)")
    return path


def save_batch_grid(path: str | Path, images: torch.Tensor, preds: Sequence[torch.Tensor | np.ndarray] | None = None,
                    targets: torch.Tensor | None = None, class_names: Sequence[str] | None = None,
                    conf: float = 0.25, max_images: int = 16) -> Path:
    """Draw one batch (``images [B, 3, S, S]`` RGB, float in [0, 1] or uint8) with ``preds[b] [n, 6]``
    and ``targets [N, 6] (batch_idx, cls, x1, y1, x2, y2)`` in the same pixels, and save a grid."""
    imgs = images[:max_images].detach().cpu()
    if imgs.dtype != torch.uint8:
        imgs = (imgs.float().clamp(0, 1) * 255).round().to(torch.uint8)
    tiles = []
    for b, im in enumerate(imgs):
        bgr = np.ascontiguousarray(im.permute(1, 2, 0).numpy()[:, :, ::-1])
        gt = None
        if targets is not None and len(targets):
            gt = targets[targets[:, 0] == b][:, 1:].detach().cpu().numpy()
        tiles.append(draw_detections(bgr, preds[b] if preds is not None else None, class_names, gt, conf))
    return save_image(path, make_grid(tiles))
