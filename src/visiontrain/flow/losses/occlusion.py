"""Occlusion estimation from a forward and a backward flow, as used by UFlow's photometric losses.

A pixel of image 1 that is hidden in image 2 has no correct match; comparing it photometrically
teaches the network wrong flow, so losses skip estimated occlusions. Two estimators:

- ``brox`` — forward-backward consistency (Sundaram, Brox & Keutzer 2010): with the backward flow
  sampled where the forward flow points, ``bw_w = warp(bw, fw)``, a visible pixel has ``fw + bw_w ~ 0``.
  Occluded where ``|fw + bw_w|^2 >= 0.01 (|fw|^2 + |bw_w|^2) + 0.5``.
- ``wang`` — range map (Wang et al. 2018): splat every pixel of image 2 along the *backward* flow
  into image 1 with bilinear weights and sum the weights ("how many pixels of image 2 land here").
  A pixel of image 1 that nothing lands on is occluded. UFlow's code (its default) uses the soft
  ``occlusion = 1 - clip(range, 0, 1)``; pass ``threshold`` for a hard ``range < threshold``.

Masks are ``[B, 1, H, W]`` floats, 1 = occluded, and are computed from detached flows (stop-gradient
at the mask, UFlow's ``stop_gradient_mask=True``): the loss never moves the flow to hide pixels.
"""

from __future__ import annotations

import torch

from visiontrain.flow.warp import flow_to_sample_coords, warp

OCCLUSION_METHODS = ("wang", "brox", "none")
BROX_ALPHA1 = 0.01
BROX_ALPHA2 = 0.5


def _check_pair(flow_fw: torch.Tensor, flow_bw: torch.Tensor) -> None:
    if flow_fw.dim() != 4 or flow_fw.shape[1] != 2 or flow_fw.shape != flow_bw.shape:
        raise ValueError(
            f"occlusion: need flow_fw and flow_bw of the same shape [B, 2, H, W], got "
            f"{tuple(flow_fw.shape)} and {tuple(flow_bw.shape)}"
        )


@torch.no_grad()
def occlusion_brox(
    flow_fw: torch.Tensor, flow_bw: torch.Tensor, alpha1: float = BROX_ALPHA1, alpha2: float = BROX_ALPHA2
) -> torch.Tensor:
    """Forward-backward check: ``[B, 2, H, W] x 2 -> [B, 1, H, W]`` float, 1 = occluded in image 1.

    To get the occlusions of image 2 (for the backward direction) swap the arguments.
    """
    _check_pair(flow_fw, flow_bw)
    flow_fw, flow_bw = flow_fw.detach(), flow_bw.detach()
    bw_warped = warp(flow_bw, flow_fw)
    sq_diff = ((flow_fw + bw_warped) ** 2).sum(dim=1, keepdim=True)
    sum_sq = (flow_fw**2).sum(dim=1, keepdim=True) + (bw_warped**2).sum(dim=1, keepdim=True)
    return (sq_diff >= alpha1 * sum_sq + alpha2).to(flow_fw.dtype)


@torch.no_grad()
def range_map(flow_bw: torch.Tensor) -> torch.Tensor:
    """How much of image 2 lands on each pixel of image 1 along ``flow_bw [B, 2, H, W]``: ``[B, 1, H, W]``.

    Pixel ``q`` of image 2 goes to ``q + flow_bw(q)`` in image 1 and spreads weight 1 over the four
    surrounding pixels bilinearly; weight falling outside the image is dropped.
    """
    flow_bw = flow_bw.detach()
    batch, _, height, width = flow_bw.shape
    coords = flow_to_sample_coords(flow_bw)  # [B, 2, H, W] target positions in image 1, float32 at least
    x, y = coords[:, 0].reshape(batch, -1), coords[:, 1].reshape(batch, -1)
    x0, y0 = torch.floor(x), torch.floor(y)
    fx, fy = x - x0, y - y0
    counts = torch.zeros(batch, height * width, dtype=coords.dtype, device=flow_bw.device)
    for dx, dy, weight in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
        xi, yi = x0 + dx, y0 + dy
        inside = (xi >= 0) & (xi <= width - 1) & (yi >= 0) & (yi <= height - 1)
        index = yi.clamp(0, height - 1).long() * width + xi.clamp(0, width - 1).long()  # exact integers
        counts.scatter_add_(1, index, torch.where(inside, weight, torch.zeros_like(weight)))
    return counts.view(batch, 1, height, width)


@torch.no_grad()
def occlusion_wang(flow_bw: torch.Tensor, threshold: float | None = None) -> torch.Tensor:
    """Range-map occlusion of image 1 from the backward flow ``[B, 2, H, W]`` -> ``[B, 1, H, W]``.

    ``threshold=None`` (UFlow default): soft ``1 - clip(range, 0, 1)``; else hard ``range < threshold``.
    """
    if flow_bw.dim() != 4 or flow_bw.shape[1] != 2:
        raise ValueError(f"occlusion_wang: flow_bw must be [B, 2, H, W], got {tuple(flow_bw.shape)}")
    counts = range_map(flow_bw)
    if threshold is None:
        return 1.0 - counts.clamp(0.0, 1.0)
    return (counts < threshold).to(flow_bw.dtype)


def estimate_occlusion(
    flow_fw: torch.Tensor, flow_bw: torch.Tensor, method: str = "wang"
) -> torch.Tensor:
    """Occlusion of image 1 (``[B, 1, H, W]``, 1 = occluded) by ``method`` in ``wang | brox | none``."""
    _check_pair(flow_fw, flow_bw)
    if method == "wang":
        return occlusion_wang(flow_bw)
    if method == "brox":
        return occlusion_brox(flow_fw, flow_bw)
    if method == "none":
        return torch.zeros_like(flow_fw[:, :1]).detach()
    raise ValueError(f"occlusion method {method!r} is unknown; use one of {', '.join(OCCLUSION_METHODS)}")
