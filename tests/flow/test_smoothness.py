"""Edge-aware smoothness against float64 references written pixel by pixel from the formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from visiontrain.flow.losses.smoothness import (
    downsample_image,
    smoothness_first_order,
    smoothness_second_order,
)


def _robust(x: float) -> float:
    return float(np.sqrt(x * x + 1e-6))


def reference_first_order(image: np.ndarray, flow: np.ndarray, k: float = 150.0) -> float:
    batch, channels, height, width = image.shape
    total_x, total_y = 0.0, 0.0
    for b in range(batch):
        for y in range(height):
            for x in range(width):
                if x + 1 < width:
                    w = np.exp(-np.mean([(k * (image[b, c, y, x + 1] - image[b, c, y, x])) ** 2 for c in range(channels)]))
                    total_x += sum(w * _robust(flow[b, c, y, x + 1] - flow[b, c, y, x]) for c in range(2))
                if y + 1 < height:
                    w = np.exp(-np.mean([(k * (image[b, c, y + 1, x] - image[b, c, y, x])) ** 2 for c in range(channels)]))
                    total_y += sum(w * _robust(flow[b, c, y + 1, x] - flow[b, c, y, x]) for c in range(2))
    n_x = batch * 2 * height * (width - 1)
    n_y = batch * 2 * (height - 1) * width
    return (total_x / n_x + total_y / n_y) / 2


def reference_second_order(image: np.ndarray, flow: np.ndarray, k: float = 150.0) -> float:
    batch, channels, height, width = image.shape
    total_x, total_y = 0.0, 0.0
    for b in range(batch):
        for y in range(height):
            for x in range(width):
                if 0 < x < width - 1:
                    w = np.exp(-np.mean([(k * (image[b, c, y, x + 1] - image[b, c, y, x - 1])) ** 2 for c in range(channels)]))
                    total_x += sum(
                        w * _robust(flow[b, c, y, x + 1] - 2 * flow[b, c, y, x] + flow[b, c, y, x - 1]) for c in range(2)
                    )
                if 0 < y < height - 1:
                    w = np.exp(-np.mean([(k * (image[b, c, y + 1, x] - image[b, c, y - 1, x])) ** 2 for c in range(channels)]))
                    total_y += sum(
                        w * _robust(flow[b, c, y + 1, x] - 2 * flow[b, c, y, x] + flow[b, c, y - 1, x]) for c in range(2)
                    )
    n_x = batch * 2 * height * (width - 2)
    n_y = batch * 2 * (height - 2) * width
    return (total_x / n_x + total_y / n_y) / 2


@pytest.fixture
def image_and_flow() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    # Small image steps so the edge weights are neither all 0 nor all 1 (150 * 0.01 = 1.5).
    image = 0.5 + 0.01 * rng.standard_normal((2, 3, 7, 9))
    image[:, :, :, 5:] += 0.2  # a strong vertical edge: weights ~ 0 across it
    flow = rng.standard_normal((2, 2, 7, 9))
    return image, flow


def test_first_order_matches_reference(image_and_flow: tuple[np.ndarray, np.ndarray]) -> None:
    image, flow = image_and_flow
    got = smoothness_first_order(torch.from_numpy(image), torch.from_numpy(flow)).item()
    assert got == pytest.approx(reference_first_order(image, flow), rel=1e-12)
    got = smoothness_first_order(torch.from_numpy(image), torch.from_numpy(flow), edge_constant=10.0).item()
    assert got == pytest.approx(reference_first_order(image, flow, 10.0), rel=1e-12)


def test_second_order_matches_reference(image_and_flow: tuple[np.ndarray, np.ndarray]) -> None:
    image, flow = image_and_flow
    got = smoothness_second_order(torch.from_numpy(image), torch.from_numpy(flow)).item()
    assert got == pytest.approx(reference_second_order(image, flow), rel=1e-12)


def test_edges_switch_smoothness_off_and_affine_flow_is_free_for_second_order() -> None:
    height, width = 8, 12
    image = torch.zeros(1, 3, height, width, dtype=torch.float64)
    image[..., 6:] = 1.0  # edge between columns 5 and 6
    flow = torch.zeros(1, 2, height, width, dtype=torch.float64)
    flow[:, 0, :, 6:] = 5.0  # motion boundary exactly at the image edge
    step_at_edge = smoothness_first_order(image, flow).item()
    flow_shifted = torch.zeros_like(flow)
    flow_shifted[:, 0, :, 3:] = 5.0  # same jump, but where the image is flat
    assert step_at_edge < 0.01 * smoothness_first_order(image, flow_shifted).item()
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64), indexing="ij")
    affine = torch.stack([0.3 * xs - 0.2 * ys + 1, 0.1 * xs + 0.5 * ys])[None]
    flat = torch.full((1, 3, height, width), 0.5, dtype=torch.float64)
    assert smoothness_second_order(flat, affine).item() == pytest.approx(1e-3, rel=1e-9)  # only the eps
    assert smoothness_first_order(flat, affine).item() > 0.1


def test_downsample_image_and_shape_errors() -> None:
    image = torch.arange(16.0).view(1, 1, 4, 4).repeat(1, 3, 1, 1)
    small = downsample_image(image, (2, 2))
    assert torch.equal(small[0, 0], torch.tensor([[2.5, 4.5], [10.5, 12.5]]))
    with pytest.raises(ValueError, match="downsample"):
        smoothness_first_order(torch.rand(1, 3, 8, 8), torch.rand(1, 2, 4, 4))
