"""A floor under the photometric mask: the objective cannot escape into the all-occluded state.

Photometric losses compare only pixels the mask keeps (estimated non-occluded and pointing inside
image 2) and are normalised by the kept count. When the flow points out of the image, or the range
map marks everything occluded, the mask keeps nothing: the census loss is then exactly 0, its
gradient is 0 and smoothness is happy with any constant flow. Nothing brings the flow back; a run that
reaches this state stays there (seen: EPE 212 after 3,000 steps, issue 18). UFlow's and SMURF's code
normalise exactly as we did (``sum(mask * e) / (sum(mask) + 1e-6)``) and have no guard; they rely on
schedules that never get there. This module is our variant, in two parts:

- **Fallback to the unmasked loss** below a kept share ``floor`` (per image, ``share = mean(mask)``):
  ``weight = mask + (1 - mask) * fallback`` with ``fallback = clip((floor - share) / floor, 0, 1)``. A
  healthy mask (share >= floor, typically 0.8-0.95) is used unchanged; an empty one becomes all ones,
  so the loss is the plain mean over every pixel and the all-occluded state costs what the worst
  matching costs instead of 0. The blend is continuous in the share.
- **An out-of-frame pull** with the same per-image ``fallback`` factor: the mean distance in pixels by
  which ``x + flow(x)`` lies outside the image. Its gradient points every
  outward sample back towards the frame, where the photometric loss has gradient again (a sample far
  outside reads zeros, whose gradient is 0 even in the unmasked loss). It is 0 for a healthy mask, so
  genuine out-of-frame motion at the border is not penalised in normal training.

Masks are detached throughout (the loss never moves the flow to change its own mask).
"""

from __future__ import annotations

import torch

from visiontrain.flow.warp import flow_to_sample_coords

MASK_FLOOR = 0.2  # below this kept share the photometric loss starts to fall back to the unmasked one


def kept_share(mask: torch.Tensor) -> torch.Tensor:
    """Share of each image the mask ``[B, 1, H, W]`` keeps: ``[B]`` in [0, 1], detached."""
    if mask.dim() != 4 or mask.shape[1] != 1:
        raise ValueError(f"kept_share: mask must be [B, 1, H, W], got {tuple(mask.shape)}")
    return mask.detach().float().mean(dim=(1, 2, 3))


def fallback_factor(share: torch.Tensor, floor: float = MASK_FLOOR) -> torch.Tensor:
    """``clip((floor - share) / floor, 0, 1)`` per image, ``[B] -> [B]``: 0 for a healthy mask, 1 for an
    empty one; ``floor=0`` switches the fallback off (always 0)."""
    if not 0.0 <= floor < 1.0:
        raise ValueError(f"mask floor must be in [0, 1), got {floor}")
    if floor == 0:
        return torch.zeros_like(share)
    return ((floor - share) / floor).clamp(0.0, 1.0)


def floored_mask(mask: torch.Tensor, floor: float = MASK_FLOOR) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight [B, 1, H, W], fallback [B])``: the mask with masked-out pixels brought back in
    proportion to how far the kept share fell below ``floor``. Both detached."""
    fallback = fallback_factor(kept_share(mask), floor)
    mask = mask.detach()
    weight = mask + (1.0 - mask) * fallback.to(mask.dtype).view(-1, 1, 1, 1)
    return weight, fallback


def out_of_frame_distance(flow: torch.Tensor, frame: tuple[int, int] | None = None,
                          offset: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """How far ``x + flow(x)`` lies outside ``[0, W-1] x [0, H-1]``, in pixels: ``[B, 2, h, w] -> [B, 1, h, w]``
    (``dx + dy``, 0 inside). ``frame=(H, W)`` and ``offset=(top, left)``: the flow is a crop's, placed in a
    larger frame (full-image warping); default: the flow's own size. Differentiable in the flow: the
    gradient points back to the frame."""
    coords = flow_to_sample_coords(flow)
    height, width = frame if frame is not None else flow.shape[-2:]
    if offset != (0, 0):
        coords = coords + torch.tensor([offset[1], offset[0]], dtype=coords.dtype, device=coords.device).view(1, 2, 1, 1)
    x, y = coords[:, 0:1], coords[:, 1:2]
    dx = (-x).clamp(min=0) + (x - (width - 1)).clamp(min=0)
    dy = (-y).clamp(min=0) + (y - (height - 1)).clamp(min=0)
    return dx + dy


def out_of_frame_loss(flow: torch.Tensor, fallback: torch.Tensor, frame: tuple[int, int] | None = None,
                      offset: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """``mean_b(fallback_b * mean_pixels(distance_b))`` in pixels: the pull back into the image, weighted per
    image by its ``fallback [B]`` (so 0 while the mask is healthy). Scalar. In pixels, not in image sizes:
    a collapsed state must cost more than any photometric error (at most ~4.5 for census) so that its
    gradient wins over the unmasked loss's noise."""
    frame = tuple(frame) if frame is not None else tuple(flow.shape[-2:])
    distance = out_of_frame_distance(flow, frame, offset).mean(dim=(1, 2, 3))  # [B]
    return (fallback.to(distance.dtype) * distance).mean()
