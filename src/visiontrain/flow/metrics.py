"""Optical-flow metrics over valid pixels, an accumulator over a dataset, and the tables that print them.

Per pixel, ``epe = ||pred - gt||_2`` (pixels, lower is better). The thresholds follow RAFT and
torchvision's optical-flow reference:

* ``1px``, ``3px``, ``5px``: the fraction of valid pixels with ``epe`` **below** 1, 3, 5 px, an *accuracy*
  (higher is better);
* ``fl_all``: KITTI's Fl-all, the fraction of valid pixels that are *outliers*, ``epe > 3`` **and**
  ``epe > 0.05 * |gt|``, an *error rate* (lower is better). torchvision's reference calls it ``f1`` and
  reports it in percent.

``zero_epe`` is the EPE that predicting no motion at all would get on the same pixels (the mean ``|gt|``,
pixel-weighted): a model whose ``epe`` is not clearly below it has learned nothing yet.

Before the task-layer redesign (issue 17) ``1px``/``3px``/``5px`` were error rates (``epe > t``); such an
older number is ``1 -`` the number now (up to pixels with ``epe`` exactly at the threshold).
"""

from __future__ import annotations

import torch

METRIC_NAMES = ("epe", "1px", "3px", "5px", "fl_all")
THRESHOLDS = {"1px": 1.0, "3px": 3.0, "5px": 5.0}
MEANING = {  # what each metric is, for tables (higher / lower is better)
    "epe": "end-point error in px (lower is better)",
    "1px": "% of pixels with EPE < 1 px (higher is better)",
    "3px": "% of pixels with EPE < 3 px (higher is better)",
    "5px": "% of pixels with EPE < 5 px (higher is better)",
    "fl_all": "% outliers, EPE > 3 px and > 5 % of |gt| (KITTI Fl-all; lower is better)",
}


def flow_error_maps(pred: torch.Tensor, gt: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-pixel ``epe``, the below-threshold indicators ``1px``/``3px``/``5px``, the KITTI outlier
    indicator ``fl_all`` (float 0/1) and ``zero_epe`` (``|gt|``, zero flow's error); ``pred``, ``gt``:
    ``[B, 2, H, W]`` -> each map ``[B, H, W]``."""
    if pred.shape != gt.shape or pred.ndim != 4 or pred.shape[1] != 2:
        raise ValueError(f"flow metrics: pred {list(pred.shape)} and gt {list(gt.shape)} must both be [B, 2, H, W]")
    epe = torch.linalg.vector_norm(pred.float() - gt.float(), dim=1)
    gt_norm = torch.linalg.vector_norm(gt.float(), dim=1)
    maps = {"epe": epe}
    maps.update({name: (epe < t).float() for name, t in THRESHOLDS.items()})
    maps["fl_all"] = ((epe > 3) & (epe > 0.05 * gt_norm)).float()
    maps["zero_epe"] = gt_norm
    return maps


def flow_metrics(pred: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image sums over valid pixels: each value ``[B]``, ``"zero_epe"`` (the sum of ``|gt|``: zero
    flow's EPE) and ``"pixels"`` = valid count ``[B]``.

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

    ``compute()`` returns, for every name in :data:`METRIC_NAMES` (meanings in the module doc):

    * ``<name>``: pixel-weighted (every valid pixel of the dataset counts once; the KITTI and Sintel
      convention when images have equal size),
    * ``<name>_per_image``: the mean over images of each image's own average (images without a valid
      pixel are skipped),

    ``zero_epe`` (zero flow's pixel-weighted EPE on the same pixels) and ``images`` / ``pixels`` counts.
    Sums are kept in float64 on the CPU.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums = dict.fromkeys((*METRIC_NAMES, "zero_epe"), 0.0)
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
        self.sums["zero_epe"] += float(per["zero_epe"].sum())

    def compute(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for k in METRIC_NAMES:
            out[k] = self.sums[k] / self.pixels if self.pixels else float("nan")
        for k in METRIC_NAMES:
            out[f"{k}_per_image"] = self.image_means[k] / self.images if self.images else float("nan")
        out["zero_epe"] = self.sums["zero_epe"] / self.pixels if self.pixels else float("nan")
        out["images"] = float(self.images)
        out["pixels"] = self.pixels
        return out


def _shown(name: str, value: float) -> str:
    """``epe`` in px with 3 decimals, the rates in percent with 2."""
    return f"{value:.3f}" if name == "epe" else f"{100 * value:.2f} %"


def format_metrics_table(metrics: dict[str, float], title: str = "") -> str:
    """A plain-text table: one row per metric with its pixel-weighted and per-image values and what it
    means (which rates are accuracies and which is an error rate)."""
    lines = [title] if title else []
    lines.append(f"{'metric':<8} {'pixel-weighted':>14} {'per-image':>10}  meaning")
    for k in METRIC_NAMES:
        lines.append(f"{k:<8} {_shown(k, metrics[k]):>14} {_shown(k, metrics[k + '_per_image']):>10}  {MEANING[k]}")
    if "zero_epe" in metrics:
        lines.append(f"(zero flow, predicting no motion, would score EPE {metrics['zero_epe']:.3f} on these pixels)")
    return "\n".join(lines)


def format_comparison(rows: dict[str, dict[str, float]], width: int = 40) -> str:
    """Several methods side by side (the benchmarks' tables): a row per method, a column per metric
    (pixel-weighted), then a line saying which columns are accuracies and which is an error rate."""
    lines = [f"{'method':<{width}}" + "".join(f"{k:>10}" for k in METRIC_NAMES)]
    lines += [f"{name:<{width}}" + "".join(f"{_shown(k, m[k]):>10}" for k in METRIC_NAMES) for name, m in rows.items()]
    lines.append("(epe in px, lower is better; 1px/3px/5px: % of valid pixels with EPE below 1/3/5 px, higher is "
                 "better (RAFT's convention); fl_all: KITTI Fl-all outlier rate, lower is better; pixel-weighted)")
    return "\n".join(lines)
