"""Pictures: tensors in [−1, 1] → uint8 images, PNG files and a views / generated / ground-truth figure."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
from torch import Tensor

from visiontrain.panorama.camera import VIEW_NAMES


def to_uint8(image: Tensor) -> np.ndarray:
    """``[3, H, W]`` in [−1, 1] → RGB ``[H, W, 3]`` uint8."""
    x = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 0).numpy()


def save_image(path: str | Path, image: Tensor) -> Path:
    """Write ``[3, H, W]`` in [−1, 1] as an image file (format from the suffix)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), cv2.cvtColor(to_uint8(image), cv2.COLOR_RGB2BGR)):
        raise OSError(f"{path}: could not write the image")
    return path


def save_panorama_figure(path: str | Path, views: Tensor, panels: dict[str, Tensor],
                         seen: Tensor | None = None) -> Path:
    """One figure per sample: the four views ``[4, 3, s, s]`` on top, then each panorama in ``panels``
    (e.g. generated, back-projection baseline, ground truth; ``[3, H, 2H]``) with the seen-region outline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = 1 + len(panels)
    fig = plt.figure(figsize=(8, 1.9 + 3.6 * len(panels) / 2))
    grid = fig.add_gridspec(rows, 4, height_ratios=[1.0] + [2.0] * len(panels))
    for i in range(4):
        ax = fig.add_subplot(grid[0, i])
        ax.imshow(to_uint8(views[i]))
        ax.set_title(VIEW_NAMES[i], fontsize=8)
        ax.axis("off")
    for r, (title, pano) in enumerate(panels.items(), start=1):
        ax = fig.add_subplot(grid[r, :])
        ax.imshow(to_uint8(pano))
        if seen is not None:
            ax.contour(seen.detach().cpu().float().numpy(), levels=[0.5], colors="w", linewidths=0.6)
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
