"""Optical-flow error metrics over valid pixels, and an accumulator over a dataset.

Per pixel, ``epe = ||pred - gt||_2``. Rates are *error* rates: ``1px`` is the fraction of valid pixels
with ``epe > 1`` (torchvision's reference reports the complement, an accuracy ``epe < 1``). KITTI
``fl_all`` is the fraction of valid pixels with ``epe > 3`` **and** ``epe > 0.05 * |gt|``.
"""

from __future__ import annotations

import torch

METRIC_NAMES = ("epe", "1px", "3px", "5px", "fl_all")


def flow_error_maps(pred: torch.Tensor, gt: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-pixel ``epe`` and the outlier indicators (float 0/1); ``pred``, ``gt``: ``[B, 2, H, W]`` ->
    each map ``[B, H, W]``."""
    if pred.shape != gt.shape or pred.ndim != 4 or pred.shape[1] != 2:
        raise ValueError(f"flow metrics: pred {list(pred.shape)} and gt {list(gt.shape)} must both be [B, 2, H, W]")
    epe = torch.linalg.vector_norm(pred.float() - gt.float(), dim=1)
    gt_norm = torch.linalg.vector_norm(gt.float(), dim=1)
    return {
        "epe": epe,
        "1px": (epe > 1).float(),
        "3px": (epe > 3).float(),
        "5px": (epe > 5).float(),
        "fl_all": ((epe > 3) & (epe > 0.05 * gt_norm)).float(),
    }


def flow_metrics(pred: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image sums over valid pixels: each value ``[B]``, plus ``"pixels"`` = valid count ``[B]``.

    ``valid`` is ``[B, H, W]`` bool. Divide a sum by ``pixels`` for the per-image mean."""
    maps = flow_error_maps(pred, gt)
    v = valid.bool()
    if v.shape != maps["epe"].shape:
        raise ValueError(f"flow metrics: valid must be [B, H, W] = {list(maps['epe'].shape)}, got {list(v.shape)}")
    out = {k: torch.where(v, m, torch.zeros_like(m)).flatten(1).double().sum(1) for k, m in maps.items()}
    out["pixels"] = v.flatten(1).sum(1).double()
    return out


class FlowMetrics:
    """Accumulates flow metrics over a dataset.

    ``compute()`` returns, for every name in :data:`METRIC_NAMES`:

    * ``<name>``: pixel-weighted (every valid pixel of the dataset counts once; the KITTI and Sintel
      convention when images have equal size),
    * ``<name>_per_image``: the mean over images of each image's own average (images without a valid
      pixel are skipped),

    and ``images`` / ``pixels`` counts. Sums are kept in float64 on the CPU.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums = dict.fromkeys(METRIC_NAMES, 0.0)
        self.image_means = dict.fromkeys(METRIC_NAMES, 0.0)
        self.pixels = 0.0
        self.images = 0  # images with at least one valid pixel
        self.seen = 0

    @torch.no_grad()
    def update(self, pred: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor) -> None:
        """``pred``, ``gt``: ``[B, 2, H, W]``; ``valid``: ``[B, H, W]`` bool."""
        per = {k: v.cpu() for k, v in flow_metrics(pred, gt, valid).items()}
        has = per["pixels"] > 0
        self.seen += int(per["pixels"].numel())
        self.images += int(has.sum())
        self.pixels += float(per["pixels"].sum())
        for k in METRIC_NAMES:
            self.sums[k] += float(per[k].sum())
            self.image_means[k] += float((per[k][has] / per["pixels"][has]).sum())

    def compute(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for k in METRIC_NAMES:
            out[k] = self.sums[k] / self.pixels if self.pixels else float("nan")
        for k in METRIC_NAMES:
            out[f"{k}_per_image"] = self.image_means[k] / self.images if self.images else float("nan")
        out["images"] = float(self.images)
        out["pixels"] = self.pixels
        return out
