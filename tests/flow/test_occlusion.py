"""Occlusion estimators against float64 per-pixel references, on a pair with a known occluded strip,
and the stop-gradient at the mask."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from visiontrain.flow.losses.occlusion import (
    estimate_occlusion,
    occlusion_brox,
    occlusion_wang,
    range_map,
)
from visiontrain.flow.unsupervised import UnsupervisedFlowObjective
from visiontrain.flow.warp import warp


def bilinear_zero(field: np.ndarray, x: float, y: float) -> np.ndarray:
    """Sample field [C, H, W] at (x, y); corners outside the image count as zero."""
    _, height, width = field.shape
    x0, y0 = int(np.floor(x)), int(np.floor(y))
    out = np.zeros(field.shape[0])
    for xi, yi in ((x0, y0), (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1)):
        if 0 <= xi < width and 0 <= yi < height:
            out += (1 - abs(x - xi)) * (1 - abs(y - yi)) * field[:, yi, xi]
    return out


def reference_brox(fw: np.ndarray, bw: np.ndarray) -> np.ndarray:
    _, height, width = fw.shape
    occ = np.zeros((height, width))
    for y in range(height):
        for x in range(width):
            f = fw[:, y, x]
            b = bilinear_zero(bw, x + f[0], y + f[1])
            occ[y, x] = float(np.sum((f + b) ** 2) >= 0.01 * (np.sum(f**2) + np.sum(b**2)) + 0.5)
    return occ


def reference_range(bw: np.ndarray) -> np.ndarray:
    _, height, width = bw.shape
    counts = np.zeros((height, width))
    for y in range(height):
        for x in range(width):
            tx, ty = x + bw[0, y, x], y + bw[1, y, x]
            x0, y0 = int(np.floor(tx)), int(np.floor(ty))
            for xi, yi in ((x0, y0), (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1)):
                if 0 <= xi < width and 0 <= yi < height:
                    counts[yi, xi] += (1 - abs(tx - xi)) * (1 - abs(ty - yi))
    return counts


def random_flows(seed: int, height: int = 9, width: int = 11) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    fw = 2.0 * rng.standard_normal((2, height, width))
    bw = -fw + 0.8 * rng.standard_normal((2, height, width))
    return fw, bw


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_brox_and_range_map_match_float64_references(seed: int) -> None:
    fw, bw = random_flows(seed)
    fw_t, bw_t = torch.from_numpy(fw)[None], torch.from_numpy(bw)[None]
    brox = occlusion_brox(fw_t, bw_t)[0, 0].numpy()
    expected = reference_brox(fw, bw)
    assert 0 < expected.sum() < expected.size  # both outcomes occur
    assert np.array_equal(brox, expected)
    counts = range_map(bw_t)[0, 0].numpy()
    assert np.abs(counts - reference_range(bw)).max() < 1e-12
    soft = occlusion_wang(bw_t)[0, 0].numpy()
    assert np.abs(soft - (1 - np.clip(reference_range(bw), 0, 1))).max() < 1e-12
    hard = occlusion_wang(bw_t, threshold=0.5)[0, 0].numpy()
    assert np.array_equal(hard, (reference_range(bw) < 0.5).astype(float))


def moving_square_pair(shift: tuple[float, float] = (4.0, 0.0), height: int = 48, width: int = 64):
    """Static textured background, a textured square of side 16 moving by ``shift``.

    Returns images, the exact forward / backward flows, and the known occluded region of image 1:
    background pixels the square covers in image 2."""
    rng = np.random.default_rng(0)
    background = rng.random((3, height, width))
    texture = rng.random((3, 16, 16))
    top, left, side = 16, 20, 16
    dx, dy = shift
    ys, xs = np.mgrid[0:height, 0:width]
    in_square1 = (ys >= top) & (ys < top + side) & (xs >= left) & (xs < left + side)
    in_square2 = (ys >= top + dy) & (ys < top + dy + side) & (xs >= left + dx) & (xs < left + dx + side)
    image1, image2 = background.copy(), background.copy()
    image1[:, in_square1] = texture.reshape(3, -1)
    image2[:, in_square2] = texture.reshape(3, -1)
    fw = np.zeros((2, height, width))
    fw[0][in_square1], fw[1][in_square1] = dx, dy
    bw = np.zeros((2, height, width))
    bw[0][in_square2], bw[1][in_square2] = -dx, -dy
    occluded = in_square2 & ~in_square1
    as_t = lambda a: torch.from_numpy(a)[None].float()  # noqa: E731
    return as_t(image1), as_t(image2), as_t(fw), as_t(bw), torch.from_numpy(occluded)


def iou(pred: torch.Tensor, truth: torch.Tensor) -> float:
    pred, truth = pred.bool(), truth.bool()
    return (pred & truth).sum().item() / max(1, (pred | truth).sum().item())


@pytest.mark.parametrize("method", ["wang", "brox"])
@pytest.mark.parametrize("shift", [(4.0, 0.0), (3.0, 2.0)])
def test_known_occluded_region_is_found(method: str, shift: tuple[float, float]) -> None:
    image1, image2, fw, bw, occluded = moving_square_pair(shift)
    assert occluded.sum() > 40
    # Exact flows ...
    occ = estimate_occlusion(fw, bw, method)[0, 0] > 0.5
    assert iou(occ, occluded) >= 0.9
    # ... and flows with per-pixel errors of 0.1 px, as a trained network's would have.
    generator = torch.Generator().manual_seed(0)
    fw_noisy = fw + 0.1 * torch.randn(fw.shape, generator=generator)
    bw_noisy = bw + 0.1 * torch.randn(bw.shape, generator=generator)
    occ = estimate_occlusion(fw_noisy, bw_noisy, method)[0, 0] > 0.5
    assert iou(occ, occluded) >= 0.5
    # The photometric check agrees: outside the occluded strip the exact warp reproduces image 1.
    if shift == (4.0, 0.0):
        err = (warp(image2, fw) - image1).abs().sum(1)[0]
        assert err[~occluded].max() < 1e-4 and err[occluded].mean() > 0.1


def test_mask_carries_no_gradient_to_the_flow() -> None:
    image1, image2, fw, bw, _ = moving_square_pair()
    for method in ("wang", "brox"):
        flow_fw = (fw + 0.3 * torch.randn_like(fw)).requires_grad_(True)
        flow_bw = (bw + 0.3 * torch.randn_like(bw)).requires_grad_(True)
        objective = UnsupervisedFlowObjective(occlusion=method, smooth2_weight=0.0, selfsup_weight=0.0)
        masks = objective.occlusion_masks(flow_fw, flow_bw)
        assert all(not m.requires_grad for m in masks.values())
        assert masks["occlusion_fw"].sum() > 0  # a non-trivial mask is in play

        def fixed(_i1: torch.Tensor, _i2: torch.Tensor, a=flow_fw, b=flow_bw) -> dict:
            return {"flow_fw": a, "flow_bw": b}

        terms = objective(fixed, image1, image2, step=0)
        grad_fw, grad_bw = torch.autograd.grad(terms["census"], (flow_fw, flow_bw))
        # Same loss with the masks frozen as constants computed beforehand: identical gradients.
        from visiontrain.flow.losses.census import census_loss

        const = {k: v.clone() for k, v in masks.items()}
        loss = (census_loss(image1, warp(image2, flow_fw), const["mask_fw"])
                + census_loss(image2, warp(image1, flow_bw), const["mask_bw"])) / 2
        ref_fw, ref_bw = torch.autograd.grad(loss, (flow_fw, flow_bw))
        assert torch.equal(grad_fw, ref_fw) and torch.equal(grad_bw, ref_bw)
        # Only the forward warp connects flow_fw to the census loss of the forward direction: the
        # backward-direction term gives flow_fw no gradient although its mask depends on flow_fw.
        loss_bw = census_loss(image2, warp(image1, flow_bw), masks["mask_bw"])
        assert torch.autograd.grad(loss_bw, flow_fw, allow_unused=True)[0] is None


def test_unknown_method_is_rejected() -> None:
    with pytest.raises(ValueError, match="wang"):
        estimate_occlusion(torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 4, 4), "forward-backward")


def test_range_map_and_warp_of_a_bf16_flow_match_float32_on_a_wide_image():
    """bf16 holds integers exactly only up to 256: pixel positions and flat indices of a 288x352 image
    must be computed in float32 (a bf16 range map indexed past the end and crashed under amp=bf16)."""
    from visiontrain.flow.losses.occlusion import range_map
    from visiontrain.flow.warp import warp

    g = torch.Generator().manual_seed(0)
    flow = torch.randn(2, 2, 288, 352, generator=g) * 3
    image = torch.rand(2, 3, 288, 352, generator=g)
    ref_range, ref_warp = range_map(flow), warp(image, flow)
    low = flow.bfloat16()
    assert torch.allclose(range_map(low), range_map(low.float()))  # bf16 flow values, exact positions
    assert (range_map(low) - ref_range).abs().mean() < 0.02  # only the flow's own bf16 rounding remains
    with torch.autocast("cpu", dtype=torch.bfloat16):
        warped = warp(image, low)
    assert warped.dtype == torch.float32
    assert torch.allclose(warped, warp(image, low.float()), atol=1e-6)
    assert (warped - ref_warp).abs().mean() < 0.01
