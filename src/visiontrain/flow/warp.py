"""Backward warping of images (or features, or flow fields) by an optical flow.

Conventions: a flow ``[B, 2, H, W]`` holds ``(u, v)`` in pixels; ``flow[:, :, y, x]`` says that pixel
``(x, y)`` of image 1 moved to ``(x + u, y + v)`` in image 2. *Backward warping* image 2 by the forward
flow samples image 2 at those positions, which reproduces image 1 wherever the pixel stays visible::

    warped[b, :, y, x] = image2[b, :, y + v, x + u]      (bilinear interpolation)

Pixel ``(x, y)`` is the *centre* of the pixel at column ``x``, row ``y``. ``grid_sample`` is called with
``align_corners=True``, under which normalised coordinate -1 is the centre of the first pixel and +1
the centre of the last, so ``x_norm = 2 x / (W - 1) - 1`` maps integer pixel positions exactly onto
pixel centres: a flow of whole pixels moves pixels without any blur.

Samples that fall outside ``[0, W-1] x [0, H-1]`` read zeros (``padding_mode="zeros"``, fading out
bilinearly within one pixel of the border); :func:`warp_valid_mask` says which samples were in bounds.
All functions are ONNX-exportable (``grid_sample`` needs opset >= 16). Training under deterministic
algorithms on a GPU swaps in the reproducible bilinear ops of :mod:`visiontrain.flow.deterministic`.
"""

from __future__ import annotations

import torch

from .deterministic import grid_sample_bilinear, resize_bilinear


def flow_to_sample_coords(flow: torch.Tensor) -> torch.Tensor:
    """Absolute sample positions ``(x + u, y + v)`` in pixels, ``[B, 2, H, W]``, in float32 at least: a
    bf16 or fp16 flow (autocast) cannot hold pixel positions (bf16 is exact only up to 256)."""
    _check_flow(flow)
    _, _, height, width = flow.shape
    flow = flow.to(torch.promote_types(flow.dtype, torch.float32))
    ys = torch.arange(height, dtype=flow.dtype, device=flow.device).view(1, height, 1).expand(1, height, width)
    xs = torch.arange(width, dtype=flow.dtype, device=flow.device).view(1, 1, width).expand(1, height, width)
    grid = torch.cat([xs, ys], dim=0).unsqueeze(0)  # [1, 2, H, W]
    return grid + flow


def warp(image: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Backward-warp ``image [B, C, H, W]`` by ``flow [B, 2, H, W]``: ``out(x) = image(x + flow(x))``.

    Bilinear, zeros outside the image, differentiable in both the image and the flow.
    Returns ``[B, C, H, W]``.
    """
    if image.dim() != 4:
        raise ValueError(f"warp: image must be [B, C, H, W], got shape {tuple(image.shape)}")
    _check_flow(flow)
    if image.shape[0] != flow.shape[0] or image.shape[-2:] != flow.shape[-2:]:
        raise ValueError(
            f"warp: image {tuple(image.shape)} and flow {tuple(flow.shape)} must share batch size and H, W"
        )
    height, width = flow.shape[-2:]
    coords = flow_to_sample_coords(flow)
    # align_corners=True: pixel centre 0 -> -1, pixel centre W-1 -> +1.
    grid_x = coords[:, 0] * (2.0 / (width - 1)) - 1.0
    grid_y = coords[:, 1] * (2.0 / (height - 1)) - 1.0
    grid = torch.stack([grid_x, grid_y], dim=-1)  # [B, H, W, 2], float32: positions need its precision
    with torch.autocast(image.device.type, enabled=False):
        out = grid_sample_bilinear(image.to(grid.dtype), grid, align_corners=True)
    return out.to(torch.promote_types(image.dtype, flow.dtype))


def warp_valid_mask(flow: torch.Tensor) -> torch.Tensor:
    """``[B, 1, H, W]`` float mask, 1 where ``(x + u, y + v)`` lies inside ``[0, W-1] x [0, H-1]``.

    Pixels whose flow points outside image 2 have nothing to be compared with; photometric losses
    multiply by this mask. It is a comparison, so it carries no gradient.
    """
    coords = flow_to_sample_coords(flow.detach())
    height, width = flow.shape[-2:]
    inside = (coords[:, 0] >= 0) & (coords[:, 0] <= width - 1) & (coords[:, 1] >= 0) & (coords[:, 1] <= height - 1)
    return inside.unsqueeze(1).to(flow.dtype)


def resize_flow(flow: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinearly resize ``flow [B, 2, h, w]`` to ``size = (H, W)`` and rescale ``u`` by ``W / w`` and
    ``v`` by ``H / h`` so the vectors stay in pixels of the new resolution. Returns ``[B, 2, H, W]``."""
    _check_flow(flow)
    height, width = size
    h, w = flow.shape[-2:]
    if (h, w) == (height, width):
        return flow
    resized = resize_bilinear(flow, (height, width), align_corners=False)
    scale = torch.tensor([width / w, height / h], dtype=flow.dtype, device=flow.device).view(1, 2, 1, 1)
    return resized * scale


def _check_flow(flow: torch.Tensor) -> None:
    if flow.dim() != 4 or flow.shape[1] != 2:
        raise ValueError(f"flow must be [B, 2, H, W] (u, v in pixels), got shape {tuple(flow.shape)}")
    if flow.shape[-1] < 2 or flow.shape[-2] < 2:
        raise ValueError(f"flow must be at least 2x2 pixels to warp, got H, W = {tuple(flow.shape[-2:])}")
