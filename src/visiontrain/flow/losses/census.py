"""Census loss: the photometric loss of UFlow (Jonschkowski et al. 2020), after DDFlow / Meister et al.

A census transform describes each pixel by the signs of its differences to the 7 x 7 neighbourhood,
which makes the comparison robust to brightness and contrast changes between the frames. UFlow uses
a soft, differentiable version; every constant below is the default of the paper's public code:

1. grayscale intensities ``I = 255 * (0.2989 R + 0.5870 G + 0.1140 B)`` (images in [0, 1]);
2. for each of the 49 neighbours ``n`` of pixel ``p`` (zero padding outside the image):
   ``d = I(n) - I(p)``, normalised to ``t = d / sqrt(0.81 + d^2)`` (a soft sign);
3. soft Hamming distance between the transforms of image 1 and warped image 2:
   ``h = sum_n (t1 - t2)^2 / (0.1 + (t1 - t2)^2)`` (the centre term is always 0);
4. robust penalty ``rho(h) = (|h| + 0.01)^0.4``;
5. the mask with a 3-pixel border set to zero (``7 // 2``) so zero padding never matters;
6. ``loss = sum(rho(h) * mask') / sum(mask')``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

GRAY_WEIGHTS = (0.2989, 0.5870, 0.1140)  # ITU-R 601 weights, as tf.image.rgb_to_grayscale
CENSUS_PATCH_SIZE = 7
CENSUS_EPS = 0.81  # soft sign: d / sqrt(0.81 + d^2)
HAMMING_THRESH = 0.1  # soft Hamming: e / (0.1 + e), e = squared difference
ROBUST_EPS = 0.01
ROBUST_Q = 0.4


def robust_abs(x: torch.Tensor, eps: float = ROBUST_EPS, q: float = ROBUST_Q) -> torch.Tensor:
    """The robust penalty of UFlow's code, ``(|x| + eps)^q`` (elementwise, same shape as ``x``)."""
    return (x.abs() + eps) ** q


def rgb_to_gray255(image: torch.Tensor) -> torch.Tensor:
    """``[B, 3, H, W]`` RGB in [0, 1] -> ``[B, 1, H, W]`` grayscale in [0, 255]."""
    if image.dim() != 4 or image.shape[1] != 3:
        raise ValueError(f"expected an RGB image batch [B, 3, H, W], got shape {tuple(image.shape)}")
    weights = torch.tensor(GRAY_WEIGHTS, dtype=image.dtype, device=image.device).view(1, 3, 1, 1)
    return (image * weights).sum(dim=1, keepdim=True) * 255.0


def census_transform(image: torch.Tensor, patch_size: int = CENSUS_PATCH_SIZE) -> torch.Tensor:
    """Soft census transform ``[B, 3, H, W] -> [B, patch_size^2, H, W]`` (see the module doc)."""
    gray = rgb_to_gray255(image)
    k = patch_size * patch_size
    # Identity kernel: output channel i copies neighbour i of the patch (row-major), zero padding.
    kernel = torch.eye(k, dtype=image.dtype, device=image.device).view(k, 1, patch_size, patch_size)
    neighbours = F.conv2d(gray, kernel, padding=patch_size // 2)
    diff = neighbours - gray
    return diff / torch.sqrt(CENSUS_EPS + diff * diff)


def soft_hamming(census1: torch.Tensor, census2: torch.Tensor, thresh: float = HAMMING_THRESH) -> torch.Tensor:
    """``sum_k e / (thresh + e)`` with ``e = (c1 - c2)^2``, ``[B, K, H, W] -> [B, 1, H, W]``."""
    sq = (census1 - census2) ** 2
    return (sq / (thresh + sq)).sum(dim=1, keepdim=True)


def zero_mask_border(mask: torch.Tensor, border: int) -> torch.Tensor:
    """A copy of ``mask [B, 1, H, W]`` with ``border`` pixels on every side set to zero."""
    if border <= 0:
        return mask
    height, width = mask.shape[-2:]
    inner = torch.zeros_like(mask)
    inner[..., border : height - border, border : width - border] = 1.0
    return mask * inner


def census_loss(
    image1: torch.Tensor,
    warped_image2: torch.Tensor,
    mask: torch.Tensor,
    patch_size: int = CENSUS_PATCH_SIZE,
    eps: float = 1e-6,
) -> torch.Tensor:
    """UFlow's census loss between ``image1`` and ``warped_image2`` (both ``[B, 3, H, W]`` in [0, 1]).

    ``mask [B, 1, H, W]`` (1 = compare this pixel; typically non-occluded x in-bounds) is treated as a
    constant: it is detached here, so an occlusion or validity mask never passes gradient to the flow.
    The mask's 3-pixel border is zeroed; the result is the masked sum of ``(h + 0.01)^0.4`` divided by
    the sum of that border-zeroed mask (``+ eps``, so an empty mask gives 0, not NaN). Returns a scalar.
    """
    if image1.shape != warped_image2.shape:
        raise ValueError(f"census_loss: image1 {tuple(image1.shape)} != warped_image2 {tuple(warped_image2.shape)}")
    expected = (image1.shape[0], 1, *image1.shape[-2:])
    if tuple(mask.shape) != expected:
        raise ValueError(f"census_loss: mask must be [B, 1, H, W] = {expected}, got {tuple(mask.shape)}")
    hamming = soft_hamming(census_transform(image1, patch_size), census_transform(warped_image2, patch_size))
    weight = zero_mask_border(mask.detach().to(hamming.dtype), patch_size // 2)
    return (robust_abs(hamming) * weight).sum() / (weight.sum() + eps)
