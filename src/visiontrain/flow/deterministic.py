"""Bilinear sampling and resizing whose gradients are bit-reproducible on CUDA.

The backward kernels of ``F.grid_sample`` and of bilinear ``F.interpolate`` accumulate into the input's
gradient with atomic adds, whose order changes from run to run on a GPU; torch (2.11 on an H200, measured
by ``benchmarks/gpu_check.py``) neither refuses them nor warns under ``torch.use_deterministic_algorithms``.
RAFT samples its correlation pyramid with ``grid_sample`` and upsamples its flow bilinearly, so two
identical flow runs on a GPU drifted apart (2.9e-4 of the largest weight after 6 steps) and a resumed run
could not be checked against a straight one.

Here the same two operations are written with ops whose backward torch *does* make deterministic in that
mode: the sampler gathers its four neighbours (``gather``'s backward scatters with a sorted,
deterministic kernel under the mode) and the resize is two matrix products with the interpolation
weights (cuBLAS products are deterministic with ``CUBLAS_WORKSPACE_CONFIG``). They are used only where
they matter: a CUDA tensor, deterministic algorithms on, and a gradient being recorded. Everywhere else
(CPU, inference, ONNX export, ``deterministic=false``) the torch op runs unchanged.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F


def needs_deterministic(*tensors: torch.Tensor) -> bool:
    """Whether a bilinear op on these tensors must avoid torch's atomic-add backward kernels."""
    return (torch.are_deterministic_algorithms_enabled() and torch.is_grad_enabled()
            and any(t.is_cuda for t in tensors) and any(t.requires_grad for t in tensors))


def grid_sample_bilinear(image: torch.Tensor, grid: torch.Tensor, align_corners: bool) -> torch.Tensor:
    """``F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=...)``."""
    if needs_deterministic(image, grid):
        return gather_bilinear(image, grid, align_corners)
    return F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=align_corners)


def resize_bilinear(image: torch.Tensor, size: tuple[int, int], align_corners: bool) -> torch.Tensor:
    """``F.interpolate(image, size=size, mode="bilinear", align_corners=...)`` for ``[B, C, H, W]``."""
    if needs_deterministic(image):
        return matmul_resize(image, size, align_corners)
    return F.interpolate(image, size=size, mode="bilinear", align_corners=align_corners)


def gather_bilinear(image: torch.Tensor, grid: torch.Tensor, align_corners: bool) -> torch.Tensor:
    """Bilinear sampling of ``image [N, C, H, W]`` at normalised ``grid [N, Ho, Wo, 2]`` (``x, y`` in
    ``[-1, 1]``), zeros outside, by gathering the four neighbours. Differentiable in both inputs."""
    n, c, h, w = image.shape
    gx, gy = grid[..., 0], grid[..., 1]
    if align_corners:
        x, y = (gx + 1) * (0.5 * (w - 1)), (gy + 1) * (0.5 * (h - 1))
    else:
        x, y = ((gx + 1) * w - 1) * 0.5, ((gy + 1) * h - 1) * 0.5
    finite = torch.isfinite(x) & torch.isfinite(y)  # NaN in, NaN out (as grid_sample); never a wild index
    x, y = torch.where(finite, x, -2.0), torch.where(finite, y, -2.0)
    x0, y0 = x.detach().floor(), y.detach().floor()
    wx1, wy1 = x - x0, y - y0
    flat = image.reshape(n, c, h * w)
    out = image.new_zeros(n, c, grid.shape[1] * grid.shape[2])
    for dx, dy in ((0, 0), (1, 0), (0, 1), (1, 1)):
        xi, yi = x0 + dx, y0 + dy
        weight = (wx1 if dx else 1 - wx1) * (wy1 if dy else 1 - wy1)
        inside = (xi >= 0) & (xi <= w - 1) & (yi >= 0) & (yi <= h - 1)
        index = (yi.clamp(0, h - 1) * w + xi.clamp(0, w - 1)).long().reshape(n, 1, -1).expand(n, c, -1)
        out = out + flat.gather(2, index) * (weight * inside).reshape(n, 1, -1)
    out = out + torch.where(finite, 0.0, float("nan")).to(out.dtype).reshape(n, 1, -1)
    return out.reshape(n, c, *grid.shape[1:3])


@lru_cache(maxsize=64)
def interpolation_matrix(size_in: int, size_out: int, align_corners: bool, dtype: torch.dtype,
                         device: torch.device) -> torch.Tensor:
    """``[size_out, size_in]`` weights of 1-D linear interpolation, as ``F.interpolate`` computes them (built
    once per size and device: RAFT upsamples at every update of every step). Read-only."""
    i = torch.arange(size_out, dtype=torch.float64, device=device)
    if align_corners:
        src = i * ((size_in - 1) / (size_out - 1)) if size_out > 1 else torch.zeros_like(i)
    else:
        src = ((i + 0.5) * (size_in / size_out) - 0.5).clamp(min=0)
    lo = src.floor().clamp(max=size_in - 1)
    frac = src - lo
    hi = (lo + 1).clamp(max=size_in - 1)
    m = torch.zeros(size_out, size_in, dtype=torch.float64, device=device)
    m[torch.arange(size_out, device=device), lo.long()] += 1 - frac
    m[torch.arange(size_out, device=device), hi.long()] += frac
    return m.to(dtype)


def matmul_resize(image: torch.Tensor, size: tuple[int, int], align_corners: bool) -> torch.Tensor:
    """Bilinear resize of ``image [B, C, H, W]`` to ``size`` as ``A_y @ image @ A_x^T``."""
    h, w = image.shape[-2:]
    ay = interpolation_matrix(h, size[0], align_corners, image.dtype, image.device)
    ax = interpolation_matrix(w, size[1], align_corners, image.dtype, image.device)
    return ay @ image @ ax.T
