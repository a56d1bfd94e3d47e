"""Optional SSIM photometric term (UFlow's ``weight_ssim``, 0 by default in the paper's code).

Structural similarity over 3 x 3 windows (Wang et al. 2004) with the usual constants
``C1 = 0.01^2``, ``C2 = 0.03^2`` for images in [0, 1]; the window statistics are computed with
zero padding and averaged with ``avg_pool2d(count_include_pad=False)``. The per-pixel dissimilarity
is ``clip((1 - SSIM) / 2, 0, 1)`` averaged over colour channels; the loss is its mean over the mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SSIM_C1 = 0.01**2
SSIM_C2 = 0.03**2


def ssim_map(x: torch.Tensor, y: torch.Tensor, c1: float = SSIM_C1, c2: float = SSIM_C2) -> torch.Tensor:
    """Per-pixel, per-channel SSIM of ``x, y [B, C, H, W]`` over 3 x 3 windows: ``[B, C, H, W]``."""
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"ssim: need two images of the same shape [B, C, H, W], got {tuple(x.shape)}, {tuple(y.shape)}")

    def pool(t: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(t, 3, stride=1, padding=1, count_include_pad=False)

    mu_x, mu_y = pool(x), pool(y)
    sigma_x = pool(x * x) - mu_x**2
    sigma_y = pool(y * y) - mu_y**2
    sigma_xy = pool(x * y) - mu_x * mu_y
    numerator = (2 * mu_x * mu_y + c1) * (2 * sigma_xy + c2)
    denominator = (mu_x**2 + mu_y**2 + c1) * (sigma_x + sigma_y + c2)
    return numerator / denominator


def ssim_loss(image1: torch.Tensor, warped_image2: torch.Tensor, mask: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Masked SSIM dissimilarity; images ``[B, 3, H, W]`` in [0, 1], ``mask [B, 1, H, W]`` (detached). Scalar."""
    dissimilarity = ((1.0 - ssim_map(image1, warped_image2)) / 2.0).clamp(0.0, 1.0).mean(dim=1, keepdim=True)
    weight = mask.detach().to(dissimilarity.dtype)
    return (dissimilarity * weight).sum() / (weight.sum() + eps)
