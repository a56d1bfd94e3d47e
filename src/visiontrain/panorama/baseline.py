"""Direct back-projection: the panorama as far as the four views see it, and a non-learned baseline.

Each panorama pixel's ray is projected into every view (UCM, :func:`.camera.panorama_view_grid`). Where it
falls inside one or more views, the pixel takes the bilinearly sampled colour of the view whose optical axis
is closest to the ray; the rest is "unseen". The baseline fills the unseen part with the mean colour of the
four views. The model uses the same back-projection as part of its conditioning.
"""

from __future__ import annotations

import torch
from torch import Tensor

from visiontrain.panorama.camera import gather_bilinear, panorama_view_grid


def backproject_views(views: Tensor, pixels: Tensor, inside: Tensor, axis_cos: Tensor) -> tuple[Tensor, Tensor]:
    """Back-project views onto the panorama grid.

    Args:
        views: ``[B, V, C, s, s]``.
        pixels, inside, axis_cos: from :func:`.camera.panorama_view_grid` — ``[B, V, H, W, 2]``,
            ``[B, V, H, W]``, ``[B, V, H, W]``.
    Returns:
        ``colours [B, C, H, W]`` (0 where unseen) and ``seen [B, H, W]`` bool.
    """
    b, v, c = views.shape[:3]
    h, w = pixels.shape[2:4]
    samples = gather_bilinear(views.flatten(0, 1), pixels.flatten(0, 1).reshape(b * v, h * w, 2), "border")
    samples = samples.reshape(b, v, c, h, w)
    score = torch.where(inside, axis_cos, torch.full_like(axis_cos, -torch.inf))  # [B, V, H, W]
    best = score.argmax(1, keepdim=True)  # [B, 1, H, W]
    seen = inside.any(1)  # [B, H, W]
    chosen = samples.gather(1, best[:, :, None].expand(b, 1, c, h, w))[:, 0]  # [B, C, H, W]
    colours = chosen * seen[:, None].to(chosen.dtype)
    return colours, seen


def backprojection_baseline(views: Tensor, cameras: Tensor, pano_size: int) -> tuple[Tensor, Tensor]:
    """The baseline panorama ``[B, C, H, 2H]`` and ``seen [B, H, 2H]``.

    ``views [B, V, C, s, s]`` with camera rows ``cameras [B, V, 5]``; unseen pixels get the mean colour of
    all view pixels of that sample.
    """
    size = views.shape[-1]
    pixels, inside, axis_cos = panorama_view_grid(pano_size, cameras.to(torch.float32), size)
    colours, seen = backproject_views(views, pixels, inside, axis_cos)
    mean = views.mean(dim=(1, 3, 4))  # [B, C]
    filled = torch.where(seen[:, None], colours, mean[:, :, None, None].expand_as(colours))
    return filled, seen
