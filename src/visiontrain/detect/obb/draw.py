"""Drawing oriented detections: rotated boxes with class and score, and batch grids."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch

from visiontrain.detect.draw import _tag, class_color, make_grid, save_image
from visiontrain.detect.obb.geometry import xywhr_to_corners


def draw_rotated(image: np.ndarray, preds: np.ndarray | torch.Tensor | None = None,
                 class_names: Sequence[str] | None = None, gt_polygons: np.ndarray | None = None,
                 conf: float = 0.0, thickness: int | None = None) -> np.ndarray:
    """A copy of BGR ``image`` with ground-truth polygons ``[m, 4, 2]`` (thin white) and predictions ``[n, 7]``
    (cx, cy, w, h, angle, score, cls) drawn as rotated boxes tagged ``name 0.87``; scores below ``conf`` skipped."""
    out = np.ascontiguousarray(image).copy()
    h, w = out.shape[:2]
    t = thickness or max(1, round(max(h, w) / 400))
    scale = max(0.35, max(h, w) / 1300)
    to_cv = lambda p: np.round((np.asarray(p, np.float64).reshape(-1, 2) - 0.5) * 16).astype(np.int32)  # noqa: E731
    if gt_polygons is not None:
        for poly in np.asarray(gt_polygons).reshape(-1, 4, 2):
            cv2.polylines(out, [to_cv(poly)], True, (255, 255, 255), 1, cv2.LINE_AA, shift=4)
    if preds is not None and len(preds):
        p = np.asarray(preds.detach().cpu() if isinstance(preds, torch.Tensor) else preds, np.float64).reshape(-1, 7)
        for row in p[np.argsort(p[:, 5])]:
            if row[5] < conf:
                continue
            c = int(row[6])
            color = class_color(c)
            corners = xywhr_to_corners(row[:5])
            cv2.polylines(out, [to_cv(corners)], True, color, t, cv2.LINE_AA, shift=4)
            head = corners[0]  # tag at the first corner
            name = class_names[c] if class_names is not None and 0 <= c < len(class_names) else str(c)
            _tag(out, f"{name} {row[5]:.2f}", round(head[0]), round(head[1]), color, scale)
    return out


def save_obb_batch_grid(path: str | Path, images: torch.Tensor, preds: Sequence[torch.Tensor] | None = None,
                        class_names: Sequence[str] | None = None, conf: float = 0.25, max_images: int = 16) -> Path:
    """Draw ``images [B, 3, S, S]`` (RGB in [0, 1]) with ``preds[b] [n, 7]`` and save them as one grid."""
    imgs = (images[:max_images].detach().cpu().float().clamp(0, 1) * 255).round().to(torch.uint8)
    tiles = [draw_rotated(np.ascontiguousarray(im.permute(1, 2, 0).numpy()[:, :, ::-1]),
                          preds[b] if preds is not None else None, class_names, conf=conf)
             for b, im in enumerate(imgs)]
    return save_image(path, make_grid(tiles))
