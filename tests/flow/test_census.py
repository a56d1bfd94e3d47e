"""Census loss against a float64 NumPy reference written from the formula (loops over the 49 neighbours)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from visiontrain.flow.losses.census import census_loss, census_transform


def reference_census_loss(image1: np.ndarray, image2: np.ndarray, mask: np.ndarray) -> float:
    """float64 reference; images [B, 3, H, W] in [0, 1], mask [B, 1, H, W]."""
    gray_weights = np.array([0.2989, 0.5870, 0.1140]).reshape(1, 3, 1, 1)
    g1 = (image1 * gray_weights).sum(1) * 255.0  # [B, H, W]
    g2 = (image2 * gray_weights).sum(1) * 255.0
    batch, height, width = g1.shape
    p1 = np.pad(g1, ((0, 0), (3, 3), (3, 3)))
    p2 = np.pad(g2, ((0, 0), (3, 3), (3, 3)))
    hamming = np.zeros((batch, height, width))
    for dy in range(-3, 4):
        for dx in range(-3, 4):
            d1 = p1[:, 3 + dy : 3 + dy + height, 3 + dx : 3 + dx + width] - g1
            d2 = p2[:, 3 + dy : 3 + dy + height, 3 + dx : 3 + dx + width] - g2
            t1 = d1 / np.sqrt(0.81 + d1**2)
            t2 = d2 / np.sqrt(0.81 + d2**2)
            sq = (t1 - t2) ** 2
            hamming += sq / (0.1 + sq)
    robust = (np.abs(hamming) + 0.01) ** 0.4
    border = np.zeros((height, width))
    border[3 : height - 3, 3 : width - 3] = 1.0
    weight = mask[:, 0] * border
    return float((robust * weight).sum() / weight.sum())


@pytest.mark.parametrize("seed", [0, 1])
def test_census_loss_matches_float64_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    image1 = rng.random((2, 3, 17, 23))
    image2 = np.clip(image1 + 0.05 * rng.standard_normal(image1.shape), 0, 1)
    mask = (rng.random((2, 1, 17, 23)) > 0.3).astype(np.float64)
    expected = reference_census_loss(image1, image2, mask)
    got64 = census_loss(torch.from_numpy(image1), torch.from_numpy(image2), torch.from_numpy(mask), eps=0.0)
    assert got64.dtype == torch.float64
    assert abs(got64.item() - expected) < 1e-10
    got32 = census_loss(torch.from_numpy(image1).float(), torch.from_numpy(image2).float(), torch.from_numpy(mask).float())
    assert abs(got32.item() - expected) < 1e-4 * expected


def test_census_is_local_to_the_7x7_patch() -> None:
    """Changing rows 0..2 leaves pixels of rows >= 6 untouched; identical images give the minimum 0.01^0.4."""
    rng = np.random.default_rng(3)
    image1 = torch.from_numpy(rng.random((1, 3, 16, 16)))
    image2 = image1.clone()
    image2[..., :3, :] = 0.0  # only the border rows differ ...
    mask = torch.ones(1, 1, 16, 16, dtype=torch.float64)
    # ... but neighbours of rows 3..5 reach into them, so compare against a mask that excludes those too
    inner = torch.zeros_like(mask)
    inner[..., 6:, :] = 1
    assert census_loss(image1, image2, inner, eps=0).item() == pytest.approx(0.01**0.4, rel=1e-12)
    assert census_loss(image1, image1, mask, eps=0).item() == pytest.approx(0.01**0.4, rel=1e-12)


def test_census_is_invariant_to_brightness_offset_but_not_to_structure() -> None:
    rng = np.random.default_rng(4)
    image = torch.from_numpy(rng.random((1, 3, 20, 20)) * 0.5)
    mask = torch.ones(1, 1, 20, 20, dtype=torch.float64)
    base = census_loss(image, image, mask).item()
    assert census_loss(image, image + 0.3, mask).item() == pytest.approx(base, abs=1e-9)
    assert census_loss(image, image.flip(-1), mask).item() > base + 0.5


def test_census_transform_shape_and_mask_gradient_is_cut() -> None:
    image = torch.rand(2, 3, 12, 14)
    assert census_transform(image).shape == (2, 49, 12, 14)
    mask = torch.rand(2, 1, 12, 14, requires_grad=True)
    warped = torch.rand(2, 3, 12, 14, requires_grad=True)
    census_loss(image, warped, mask).backward()
    assert mask.grad is None and warped.grad is not None and warped.grad.abs().sum() > 0


def test_census_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="mask must be"):
        census_loss(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8), torch.rand(1, 8, 8))
    with pytest.raises(ValueError, match="RGB"):
        census_loss(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8))
