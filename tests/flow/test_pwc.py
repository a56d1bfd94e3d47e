"""PWC flow network (shapes, symmetry, cost volume, ONNX parity) and the backward warp it is built on."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from visiontrain.flow.models.pwc import (
    PWCFlow,
    PWCInputError,
    cost_volume,
    export_flow_onnx,
    normalize_features,
)
from visiontrain.flow.warp import resize_flow, warp, warp_valid_mask

# --- warp ------------------------------------------------------------------------------------------


def test_warp_by_whole_pixels_is_exact() -> None:
    image = torch.rand(2, 3, 10, 12, dtype=torch.float64)
    flow = torch.zeros(2, 2, 10, 12, dtype=torch.float64)
    flow[:, 0], flow[:, 1] = 3.0, -2.0  # out(x, y) = image(x + 3, y - 2)
    out = warp(image, flow)
    assert (out[:, :, 2:, :9] - image[:, :, :8, 3:]).abs().max() < 1e-12  # exact up to float64 rounding
    valid = warp_valid_mask(flow)
    assert valid.shape == (2, 1, 10, 12)
    assert valid[:, :, 2:, :9].all() and valid.sum() == 2 * 8 * 9
    assert out[:, :, :2].abs().max() < 1e-12 and out[..., 9:].abs().max() < 1e-12


def test_warp_is_bilinear_at_fractional_positions() -> None:
    rng = np.random.default_rng(0)
    image = rng.random((1, 2, 6, 7))
    flow = rng.uniform(-1.5, 1.5, (1, 2, 6, 7))
    out = warp(torch.from_numpy(image), torch.from_numpy(flow)).numpy()
    for y in range(6):
        for x in range(7):
            sx, sy = x + flow[0, 0, y, x], y + flow[0, 1, y, x]
            x0, y0 = int(np.floor(sx)), int(np.floor(sy))
            expected = np.zeros(2)
            for xi, yi in ((x0, y0), (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1)):
                if 0 <= xi < 7 and 0 <= yi < 6:
                    expected += (1 - abs(sx - xi)) * (1 - abs(sy - yi)) * image[0, :, yi, xi]
            assert np.abs(out[0, :, y, x] - expected).max() < 1e-12


def test_resize_flow_rescales_vectors() -> None:
    flow = torch.ones(1, 2, 4, 6)
    flow[:, 1] = 2.0
    big = resize_flow(flow, (8, 24))
    assert big.shape == (1, 2, 8, 24)
    assert torch.allclose(big[:, 0], torch.full((1, 8, 24), 4.0)) and torch.allclose(big[:, 1], torch.full((1, 8, 24), 4.0))
    with pytest.raises(ValueError, match=r"\[B, 2, H, W\]"):
        warp(torch.rand(1, 3, 4, 4), torch.rand(1, 3, 4, 4))


# --- building blocks -------------------------------------------------------------------------------


def test_cost_volume_matches_naive_correlation() -> None:
    rng = np.random.default_rng(1)
    f1, f2 = rng.standard_normal((2, 1, 5, 7, 8))
    got = cost_volume(torch.from_numpy(f1), torch.from_numpy(f2), max_displacement=2).numpy()
    assert got.shape == (1, 25, 7, 8)
    for dy in range(-2, 3):
        for dx in range(-2, 3):
            k = (dy + 2) * 5 + (dx + 2)
            for y in range(7):
                for x in range(8):
                    inside = 0 <= y + dy < 7 and 0 <= x + dx < 8
                    expected = (f1[0, :, y, x] * f2[0, :, y + dy, x + dx]).mean() if inside else 0.0
                    assert abs(got[0, k, y, x] - expected) < 1e-12


def test_normalize_features_uses_moments_over_channels_and_both_images() -> None:
    rng = np.random.default_rng(2)
    f1 = rng.normal(3.0, 2.0, (2, 4, 5, 6))
    f2 = rng.normal(-1.0, 0.5, (2, 4, 5, 6))
    n1, n2 = normalize_features(torch.from_numpy(f1), torch.from_numpy(f2))
    for b in range(2):
        mean = (f1[b].mean() + f2[b].mean()) / 2
        std = np.sqrt((f1[b].var() + f2[b].var()) / 2)
        assert np.abs(n1[b].numpy() - (f1[b] - mean) / std).max() < 1e-12
        assert np.abs(n2[b].numpy() - (f2[b] - mean) / std).max() < 1e-12


# --- the network -----------------------------------------------------------------------------------


def randomize_flow_heads(model: PWCFlow, std: float = 0.02) -> PWCFlow:
    """The flow output layers start at zero (an untrained model predicts zero flow); give them weights
    so that tests see non-trivial flows and gradients everywhere."""
    for layer in [decoder.to_flow for decoder in model.decoders] + [model.refine.net[-1]]:
        torch.nn.init.normal_(layer.weight, std=std)
    return model


@pytest.fixture(scope="module")
def tiny_model() -> PWCFlow:
    torch.manual_seed(0)
    return randomize_flow_heads(PWCFlow(channel_multiplier=0.25)).eval()


def test_untrained_model_predicts_zero_flow() -> None:
    out = PWCFlow(channel_multiplier=0.125)(torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64))
    assert out["flow_fw"].abs().max() == 0 and out["flow_bw"].abs().max() == 0


def test_forward_backward_shapes_and_symmetry(tiny_model: PWCFlow) -> None:
    torch.manual_seed(1)
    image1, image2 = torch.rand(2, 3, 64, 96), torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        out = tiny_model(image1, image2)
        swapped = tiny_model(image2, image1)
        alone = tiny_model(image1[1:], image2[1:], backward=False)
    assert out["flow_fw"].shape == out["flow_bw"].shape == (2, 2, 64, 96)
    assert [tuple(f.shape) for f in out["flow_fw_pyramid"]] == [(2, 2, 16, 24), (2, 2, 8, 12), (2, 2, 4, 6), (2, 2, 2, 3)]
    assert len(out["flow_bw_pyramid"]) == 4
    # Full-resolution flow is the 1/4 flow upsampled with vectors x4.
    assert torch.allclose(out["flow_fw"], resize_flow(out["flow_fw_pyramid"][0], (64, 96)))
    # Swapping the images swaps the directions; a pair's result does not depend on its batch.
    assert torch.allclose(swapped["flow_fw"], out["flow_bw"], atol=1e-5)
    assert torch.allclose(alone["flow_fw"], out["flow_fw"][1:], atol=1e-5)
    assert "flow_bw" not in alone
    assert out["flow_fw"].abs().max() > 0.1


def test_bad_input_sizes_are_explained(tiny_model: PWCFlow) -> None:
    with pytest.raises(PWCInputError, match="multiple of 32"):
        tiny_model(torch.rand(1, 3, 60, 96), torch.rand(1, 3, 60, 96))
    with pytest.raises(PWCInputError, match="at least 64"):
        tiny_model(torch.rand(1, 3, 32, 96), torch.rand(1, 3, 32, 96))
    with pytest.raises(PWCInputError, match="same shape"):
        tiny_model(torch.rand(1, 3, 64, 96), torch.rand(1, 3, 64, 64))


def test_gradients_reach_every_parameter() -> None:
    torch.manual_seed(2)
    model = randomize_flow_heads(PWCFlow(channel_multiplier=0.125))
    out = model(torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64))
    (out["flow_fw"].square().mean() + out["flow_bw"].square().mean()).backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


def test_onnx_export_matches_pytorch(tiny_model: PWCFlow, tmp_path) -> None:
    onnxruntime = pytest.importorskip("onnxruntime")
    path = export_flow_onnx(tiny_model, tmp_path / "pwc.onnx", (64, 64))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    torch.manual_seed(3)
    image1 = torch.rand(2, 3, 64, 64)  # batch 2 although exported with batch 1: the batch axis is dynamic
    image2 = image1.roll(3, dims=-1) * 0.9
    flow_fw, flow_bw = session.run(["flow_fw", "flow_bw"], {"image1": image1.numpy(), "image2": image2.numpy()})
    with torch.no_grad():
        out = tiny_model(image1, image2)
    assert np.abs(flow_fw - out["flow_fw"].numpy()).max() <= 1e-4
    assert np.abs(flow_bw - out["flow_bw"].numpy()).max() <= 1e-4
    with pytest.raises(PWCInputError):
        export_flow_onnx(tiny_model, tmp_path / "bad.onnx", (60, 64))


def test_dynamo_export_without_onnxscript_says_what_to_install(tiny_model: PWCFlow, tmp_path, monkeypatch) -> None:
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else find_spec(name, *a))
    with pytest.raises(RuntimeError, match="pip install onnxscript"):
        export_flow_onnx(tiny_model, tmp_path / "pwc.onnx", (64, 64), dynamo=True)
    assert not (tmp_path / "pwc.onnx").exists()
