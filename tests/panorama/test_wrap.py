"""Seam-free convolutions: periodic in x, zero-padded in y, parameter-compatible with plain ones; the seam
metric."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from visiontrain.panorama.camera import standard_cameras
from visiontrain.panorama.metrics import SeamMetric, seam_difference
from visiontrain.panorama.model import PanoramaFlowModel, PanoramaModelConfig
from visiontrain.panorama.wrap import WrapXConv2d, pad_wrap_x, upsample_wrap_x, wrap_x_convs

TINY = dict(pano_size=16, view_size=32, encoder_channels=[8, 8, 8], fused_channels=4, unet_channels=[8, 16],
            norm_groups=4)


def test_wrapped_conv_matches_explicit_circular_padding() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, padding=1)
    wrapped = WrapXConv2d.from_conv(conv)
    assert wrapped.weight is conv.weight and wrapped.bias is conv.bias and wrapped.padding == (0, 0)
    x = torch.randn(2, 3, 6, 10, dtype=torch.float64)
    conv, wrapped = conv.double(), wrapped.double()
    # reference: circular in x by hand, zeros in y
    ref = F.conv2d(F.pad(torch.cat((x[..., -1:], x, x[..., :1]), -1), (0, 0, 1, 1)), conv.weight, conv.bias)
    assert torch.allclose(wrapped(x), ref, atol=1e-12)
    # inside the image (away from the seam columns) it is the plain convolution
    assert torch.allclose(wrapped(x)[..., 1:-1], conv(x)[..., 1:-1], atol=1e-12)
    assert not torch.allclose(wrapped(x)[..., 0], conv(x)[..., 0])
    assert pad_wrap_x(x, 2, 1).shape == (2, 3, 8, 14)


@pytest.mark.parametrize("k", [1, 3, 7])
def test_wrapped_conv_stack_is_periodic_in_x(k: int) -> None:
    """Shift the input by k columns → the output is shifted by k columns (a stride-1 stack; exact)."""
    torch.manual_seed(0)
    stack = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 8, 5, padding=2), nn.SiLU(),
                          nn.Conv2d(8, 2, 3, padding=1)).double()
    assert wrap_x_convs(stack) == 3
    x = torch.randn(2, 3, 8, 16, dtype=torch.float64)
    assert torch.allclose(stack(torch.roll(x, k, -1)), torch.roll(stack(x), k, -1), atol=1e-12)
    plain = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1)).double()
    assert not torch.allclose(plain(torch.roll(x, k, -1)), torch.roll(plain(x), k, -1), atol=1e-6)


def test_wrapped_decoder_is_periodic_and_loads_plain_weights() -> None:
    """The whole UNet decoder (strided convs, attention, norms) commutes with shifts by multiples of its total
    stride; the wrapped and plain models share state-dict keys, so weights move between them."""
    torch.manual_seed(0)
    model = PanoramaFlowModel(PanoramaModelConfig(**TINY)).double().eval()
    assert model.cfg.wrap_x and any(isinstance(m, WrapXConv2d) for m in model.unet.modules())
    plain = PanoramaFlowModel(PanoramaModelConfig(**{**TINY, "wrap_x": False})).double().eval()
    assert not any(isinstance(m, WrapXConv2d) for m in plain.modules())
    plain.load_state_dict(model.state_dict())  # strict: same keys and shapes
    x, cond = torch.randn(1, 3, 16, 32, dtype=torch.float64), torch.randn(1, 8, 16, 32, dtype=torch.float64)
    t = torch.tensor([0.7], dtype=torch.float64)
    for k in (2, 6, 16):  # 2 UNet levels: total stride 2
        shifted = model(torch.roll(x, k, -1), t, torch.roll(cond, k, -1))
        assert torch.allclose(shifted, torch.roll(model(x, t, cond), k, -1), atol=1e-9)
    assert not torch.allclose(plain(torch.roll(x, 2, -1), t, torch.roll(cond, 2, -1)),
                              torch.roll(plain(x, t, cond), 2, -1), atol=1e-6)


def test_upsample_across_the_seam() -> None:
    x = torch.randn(1, 2, 3, 5, dtype=torch.float64)
    up = upsample_wrap_x(x, 4)
    plain = F.interpolate(x, scale_factor=4, mode="bilinear", align_corners=False)
    assert up.shape == plain.shape == (1, 2, 12, 20)
    assert torch.allclose(up[..., 2:-2], plain[..., 2:-2], atol=1e-12)  # same away from the seam
    assert torch.allclose(upsample_wrap_x(torch.roll(x, 1, -1), 4), torch.roll(up, 4, -1), atol=1e-12)


def test_condition_of_a_wrapped_model_has_no_clamped_edge() -> None:
    torch.manual_seed(0)
    model = PanoramaFlowModel(PanoramaModelConfig(**TINY)).eval()
    views = torch.rand(1, 4, 3, 32, 32) * 2 - 1
    cond = model.condition(views, standard_cameras(0.85, 55.0)[None])
    assert cond.shape == (1, 8, 16, 32) and torch.isfinite(cond).all()


def test_seam_metric() -> None:
    truth = torch.zeros(2, 3, 4, 8)
    truth[..., 0] = 0.2  # [0, 1] scale: |0.6 − 0.5| = 0.1
    pred = truth.clone()
    pred[..., -1] = -1.0  # [0, 1] scale: |0.6 − 0| = 0.6
    assert torch.allclose(seam_difference(truth), torch.full((2,), 0.1))
    metric = SeamMetric()
    metric.update(pred, truth)
    out = metric.compute()
    assert out["seam"] == pytest.approx(0.6) and out["seam_truth"] == pytest.approx(0.1)
    assert out["seam_ratio"] == pytest.approx(6.0)
    assert SeamMetric().compute() == {}
