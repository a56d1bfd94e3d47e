"""Edge-aware smoothness of a flow field, as in UFlow (Jonschkowski et al. 2020).

Flow should be smooth except where the image has an edge. Image gradients ``g`` (images in [0, 1],
mean over colour channels) give exponential edge weights ``w = exp(-mean_c((150 g)^2))``; the flow's
first (or second) differences are penalised with ``robust_l1(x) = sqrt(x^2 + 0.001^2)``:

    first order:  (mean(w_x * robust_l1(d_x flow)) + mean(w_y * robust_l1(d_y flow))) / 2
    second order: (mean(w_xx * robust_l1(d_xx flow)) + mean(w_yy * robust_l1(d_yy flow))) / 2

with ``d_x f = f[x+1] - f[x]``, ``d_xx f = f[x+1] - 2 f[x] + f[x-1]``, and for second order the image
gradient taken over the same 3-pixel span (``I[x+1] - I[x-1]``). Means run over batch, flow
channels and pixels. UFlow applies this at pyramid level 2 (1/4 resolution): the flow is the
model's 1/4-resolution flow (in pixels of that resolution) and the image is area-downsampled to it
(:func:`downsample_image`). Paper-code defaults: edge constant 150, exponential weighting,
``weight_smooth1 = 0``, ``weight_smooth2 = 2``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EDGE_CONSTANT = 150.0
ROBUST_L1_EPS = 0.001


def robust_l1(x: torch.Tensor, eps: float = ROBUST_L1_EPS) -> torch.Tensor:
    """``sqrt(x^2 + eps^2)``: a differentiable absolute value."""
    return torch.sqrt(x * x + eps * eps)


def edge_weights(image_grad: torch.Tensor, edge_constant: float = EDGE_CONSTANT) -> torch.Tensor:
    """Exponential edge weighting ``exp(-mean_c((edge_constant * g)^2))``: ``[B, C, h, w] -> [B, 1, h, w]``."""
    return torch.exp(-((edge_constant * image_grad) ** 2).mean(dim=1, keepdim=True))


def _check(image: torch.Tensor, flow: torch.Tensor, min_size: int) -> None:
    if image.dim() != 4 or flow.dim() != 4 or flow.shape[1] != 2:
        raise ValueError(f"smoothness: need image [B, C, h, w] and flow [B, 2, h, w], got "
                         f"{tuple(image.shape)} and {tuple(flow.shape)}")
    if image.shape[0] != flow.shape[0] or image.shape[-2:] != flow.shape[-2:]:
        raise ValueError(
            f"smoothness: image {tuple(image.shape)} and flow {tuple(flow.shape)} must share B, h, w "
            "(downsample the image to the flow's resolution with downsample_image)"
        )
    if min(flow.shape[-2:]) < min_size:
        raise ValueError(f"smoothness: flow of size {tuple(flow.shape[-2:])} is smaller than {min_size} pixels")


def smoothness_first_order(
    image: torch.Tensor, flow: torch.Tensor, edge_constant: float = EDGE_CONSTANT
) -> torch.Tensor:
    """Edge-aware first-order smoothness of ``flow [B, 2, h, w]`` guided by ``image [B, C, h, w]``. Scalar."""
    _check(image, flow, 2)
    weight_x = edge_weights(image[..., :, 1:] - image[..., :, :-1], edge_constant)
    weight_y = edge_weights(image[..., 1:, :] - image[..., :-1, :], edge_constant)
    flow_dx = flow[..., :, 1:] - flow[..., :, :-1]
    flow_dy = flow[..., 1:, :] - flow[..., :-1, :]
    return ((weight_x * robust_l1(flow_dx)).mean() + (weight_y * robust_l1(flow_dy)).mean()) / 2.0


def smoothness_second_order(
    image: torch.Tensor, flow: torch.Tensor, edge_constant: float = EDGE_CONSTANT
) -> torch.Tensor:
    """Edge-aware second-order smoothness of ``flow [B, 2, h, w]`` guided by ``image [B, C, h, w]``. Scalar."""
    _check(image, flow, 3)
    weight_xx = edge_weights(image[..., :, 2:] - image[..., :, :-2], edge_constant)
    weight_yy = edge_weights(image[..., 2:, :] - image[..., :-2, :], edge_constant)
    flow_dxx = flow[..., :, 2:] - 2.0 * flow[..., :, 1:-1] + flow[..., :, :-2]
    flow_dyy = flow[..., 2:, :] - 2.0 * flow[..., 1:-1, :] + flow[..., :-2, :]
    return ((weight_xx * robust_l1(flow_dxx)).mean() + (weight_yy * robust_l1(flow_dyy)).mean()) / 2.0


def downsample_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Area-average ``image [B, C, H, W]`` to ``size = (h, w)`` (the flow level's resolution)."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return F.adaptive_avg_pool2d(image, size)
