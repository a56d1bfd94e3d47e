"""Pictures of flow: the Middlebury colour wheel, end-point-error maps and a side-by-side figure."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

if TYPE_CHECKING:
    import torch

# Middlebury colour wheel (Baker et al., "A Database and Evaluation Methodology for Optical Flow"):
# segment lengths red-yellow, yellow-green, green-cyan, cyan-blue, blue-magenta, magenta-red.
_SEGMENTS = (15, 6, 4, 11, 13, 6)


def make_colorwheel() -> np.ndarray:
    """The 55 colours of the Middlebury wheel, ``[55, 3]`` float in ``[0, 255]`` (RGB)."""
    wheel = []
    for segment, length in enumerate(_SEGMENTS):
        rise = np.floor(255 * np.arange(length) / length)
        full = np.full(length, 255.0)
        zero = np.zeros(length)
        wheel.append(np.stack([
            (full, rise, zero),  # red -> yellow
            (255 - rise, full, zero),  # yellow -> green
            (zero, full, rise),  # green -> cyan
            (zero, 255 - rise, full),  # cyan -> blue
            (rise, zero, full),  # blue -> magenta
            (full, zero, 255 - rise),  # magenta -> red
        ][segment], axis=1))
    return np.concatenate(wheel)


def flow_to_color(flow: np.ndarray, max_flow: float | None = None) -> np.ndarray:
    """``flow [H, W, 2]`` -> ``uint8 [H, W, 3]`` RGB. Hue is the direction, saturation the magnitude
    relative to ``max_flow`` (default: the largest magnitude in ``flow``); magnitudes beyond it are
    drawn darker. Non-finite vectors are black."""
    flow = np.asarray(flow, np.float64)
    if flow.ndim != 3 or flow.shape[2] != 2:
        raise ValueError(f"flow_to_color: flow must be [H, W, 2], got {list(flow.shape)}")
    finite = np.isfinite(flow).all(-1)
    u = np.where(finite, flow[..., 0], 0.0)
    v = np.where(finite, flow[..., 1], 0.0)
    radius = np.sqrt(u * u + v * v)
    if max_flow is None:
        max_flow = float(radius.max()) if radius.size else 0.0
    scale = float(max_flow) + float(np.finfo(np.float32).eps)
    u, v, radius = u / scale, v / scale, radius / scale
    wheel = make_colorwheel()
    ncols = wheel.shape[0]
    angle = np.arctan2(-v, -u) / np.pi
    fk = (angle + 1) / 2 * (ncols - 1)
    k0 = np.floor(fk).astype(np.int64)
    k1 = np.where(k0 + 1 == ncols, 0, k0 + 1)
    f = (fk - k0)[..., None]
    col = ((1 - f) * wheel[k0] + f * wheel[k1]) / 255.0
    r = radius[..., None]
    col = np.where(r <= 1, 1 - r * (1 - col), col * 0.75)
    out = np.floor(255 * col).astype(np.uint8)
    out[~finite] = 0
    return out


def error_to_color(epe: np.ndarray, valid: np.ndarray | None = None, max_error: float = 10.0) -> np.ndarray:
    """End-point error ``[H, W]`` -> ``uint8 [H, W, 3]`` RGB heat map (0 black-blue ... ``max_error``
    and beyond yellow-white, OpenCV's inferno); invalid pixels are mid grey."""
    epe = np.nan_to_num(np.asarray(epe, np.float64), nan=0.0)
    level = np.clip(epe / max(max_error, 1e-9) * 255.0, 0, 255).astype(np.uint8)
    rgb = cv2.applyColorMap(level, cv2.COLORMAP_INFERNO)[..., ::-1].copy()
    if valid is not None:
        rgb[~np.asarray(valid, bool)] = 128
    return rgb


def _to_uint8(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype == np.uint8:
        return image
    return np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)


def _label(tile: np.ndarray, text: str) -> np.ndarray:
    tile = np.ascontiguousarray(tile)
    scale = max(0.4, tile.shape[1] / 640)
    cv2.putText(tile, text, (6, int(20 * scale) + 4), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(tile, text, (6, int(20 * scale) + 4), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1,
                cv2.LINE_AA)
    return tile


def side_by_side(image1: np.ndarray, pred: np.ndarray, gt: np.ndarray | None = None,
                 valid: np.ndarray | None = None, max_error: float = 10.0) -> np.ndarray:
    """A 2x2 figure ``[2H, 2W, 3] uint8`` RGB: image 1, prediction, ground truth, end-point error
    (with GT), or 1x2 (image 1, prediction) without. Prediction and GT share one colour scale."""
    pred = np.asarray(pred, np.float32)
    if gt is None:
        return np.concatenate([_label(_to_uint8(image1), "image 1"),
                               _label(flow_to_color(pred), "prediction")], axis=1)
    gt = np.asarray(gt, np.float32)
    valid = np.ones(gt.shape[:2], bool) if valid is None else np.asarray(valid, bool)
    gt_norm = np.linalg.norm(gt, axis=-1)
    max_flow = float(gt_norm[valid].max()) if valid.any() else float(np.linalg.norm(pred, axis=-1).max())
    epe = np.linalg.norm(pred - gt, axis=-1)
    gt_color = flow_to_color(gt, max_flow)
    gt_color[~valid] = 0
    mean_epe = float(epe[valid].mean()) if valid.any() else float("nan")
    top = np.concatenate([_label(_to_uint8(image1), "image 1"),
                          _label(flow_to_color(pred, max_flow), "prediction")], axis=1)
    bottom = np.concatenate([_label(gt_color, "ground truth"),
                             _label(error_to_color(epe, valid, max_error), f"EPE {mean_epe:.2f} px")], axis=1)
    return np.concatenate([top, bottom], axis=0)


def batch_figure(batch: dict, i: int, pred: torch.Tensor, max_error: float = 10.0) -> np.ndarray:
    """:func:`side_by_side` of sample ``i`` of a collated batch (``image1 [B, 3, H, W]``, optional ``flow``
    and ``valid``, ``sizes`` of padded samples) with its prediction ``pred [2, H, W]``."""
    h, w = batch["sizes"][i] if "sizes" in batch else batch["image1"].shape[-2:]
    image = batch["image1"][i, :, :h, :w].permute(1, 2, 0).cpu().numpy()
    flow = pred[:, :h, :w].permute(1, 2, 0).float().cpu().numpy()
    gt = valid = None
    if batch.get("flow") is not None:
        gt = batch["flow"][i, :, :h, :w].permute(1, 2, 0).cpu().numpy()
        valid = batch["valid"][i, :h, :w].cpu().numpy()
    return side_by_side(image, flow, gt, valid, max_error)


def save_png(path: str | Path, rgb: np.ndarray) -> None:
    """Write an RGB ``uint8 [H, W, 3]`` picture as PNG (folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), np.ascontiguousarray(rgb[..., ::-1])):
        raise OSError(f"{path}: could not write PNG")
