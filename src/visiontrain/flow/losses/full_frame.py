"""Full-image warping (SMURF, Stone et al. 2021): the model sees a crop, the loss sees the whole frame.

Training on crops loses every pixel whose flow leaves the crop: the photometric loss has nothing to
compare it with and masks it, so motion towards the border is never learned. SMURF instead warps the
*full* second image with the crop's flow (placed at the crop's offset): only flow leaving the whole
image is masked. :class:`FullFrame` carries the full images and the crop offset; :func:`warp_full`
samples the full image at ``(left + x + u, top + y + v)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from visiontrain.flow.deterministic import grid_sample_bilinear
from visiontrain.flow.warp import flow_to_sample_coords


@dataclass(frozen=True)
class FullFrame:
    """The uncropped pair ``image1, image2 [B, 3, H, W]`` and where the crop the model saw starts."""

    image1: torch.Tensor
    image2: torch.Tensor
    top: int
    left: int

    def crop(self, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The crop ``[B, 3, height, width]`` of both images at ``(top, left)``."""
        window = (..., slice(self.top, self.top + height), slice(self.left, self.left + width))
        return self.image1[window], self.image2[window]


def full_frame_coords(flow: torch.Tensor, top: int, left: int) -> torch.Tensor:
    """Sample positions in full-frame pixels of a crop's ``flow [B, 2, h, w]`` at ``(top, left)``: ``[B, 2, h, w]``."""
    coords = flow_to_sample_coords(flow)
    offset = torch.tensor([left, top], dtype=coords.dtype, device=coords.device).view(1, 2, 1, 1)
    return coords + offset


def warp_full(image: torch.Tensor, flow: torch.Tensor, top: int, left: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward-warp the full ``image [B, C, H, W]`` by a crop's ``flow [B, 2, h, w]`` placed at ``(top, left)``.

    Returns ``(warped [B, C, h, w], valid [B, 1, h, w])``; ``valid`` is 1 where the sample lies inside the
    full image (detached). Bilinear, zeros outside, differentiable in the image and the flow."""
    if image.dim() != 4 or image.shape[0] != flow.shape[0]:
        raise ValueError(f"warp_full: image {tuple(image.shape)} and flow {tuple(flow.shape)} need one batch size")
    height, width = image.shape[-2:]
    coords = full_frame_coords(flow, top, left)
    grid = torch.stack([coords[:, 0] * (2.0 / (width - 1)) - 1.0, coords[:, 1] * (2.0 / (height - 1)) - 1.0], dim=-1)
    with torch.autocast(image.device.type, enabled=False):
        out = grid_sample_bilinear(image.to(grid.dtype), grid, align_corners=True)
    c = coords.detach()
    valid = (c[:, 0] >= 0) & (c[:, 0] <= width - 1) & (c[:, 1] >= 0) & (c[:, 1] <= height - 1)
    return out.to(torch.promote_types(image.dtype, flow.dtype)), valid.unsqueeze(1).to(flow.dtype)
