"""Model shapes, the geometric placement of view latents on the 2:1 grid, gradients, time scaling."""

from __future__ import annotations

import math

import pytest
import torch

from visiontrain.panorama.camera import panorama_view_grid, standard_cameras
from visiontrain.panorama.model import LatentFusion, PanoramaFlowModel, PanoramaModelConfig

TINY = dict(pano_size=16, view_size=32, encoder_channels=[8, 8, 8], fused_channels=4, unet_channels=[8, 16],
            norm_groups=4)


def test_shapes_and_condition_reuse() -> None:
    torch.manual_seed(0)
    model = PanoramaFlowModel(PanoramaModelConfig(**TINY)).eval()
    views = torch.rand(2, 4, 3, 32, 32) * 2 - 1
    cams = standard_cameras(0.85, 55.0)[None].expand(2, 4, 5)
    cond = model.condition(views, cams)
    assert cond.shape == (2, 4 + 4, 16, 32)
    x, t = torch.randn(2, 3, 16, 32), torch.rand(2)
    out = model(x, t, cond)
    assert out.shape == (2, 3, 16, 32)
    assert torch.allclose(model(x, t, {"views": views, "cameras": cams}), out, atol=1e-6)
    # back-projected colours and seen mask are channels of the condition
    assert set(cond[:, -1].unique().tolist()) == {0.0, 1.0}
    no_bp = PanoramaFlowModel(PanoramaModelConfig(**{**TINY, "backprojection": False, "prediction": "velocity"}))
    assert no_bp.condition(views, cams).shape[1] == 4


def test_sample_prediction_is_a_residual_over_the_baseline() -> None:
    """prediction='sample': with a zero UNet output the model's x̂ is exactly the back-projection baseline,
    so one Euler step from t = 1 returns the baseline; the velocity is (x̂ − x_t) / max(t, t_min)."""
    from visiontrain.panorama.baseline import backprojection_baseline
    from visiontrain.panorama.flow_matching import euler_sample

    torch.manual_seed(0)
    model = PanoramaFlowModel(PanoramaModelConfig(**TINY)).eval()
    torch.nn.init.zeros_(model.unet.conv_out.weight)
    views = torch.rand(2, 4, 3, 32, 32) * 2 - 1
    cams = standard_cameras(0.85, 55.0)[None].expand(2, 4, 5)
    cond = model.condition(views, cams)
    baseline, _ = backprojection_baseline(views, cams, 16)
    assert torch.allclose(model.base(cond), baseline, atol=1e-6)
    one_step = euler_sample(model, cond, (2, 3, 16, 32), steps=1, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(one_step, baseline, atol=1e-5)
    x_t, t = torch.randn(2, 3, 16, 32), torch.tensor([0.5, 0.01])
    v = model(x_t, t, cond)
    assert torch.allclose(v[0], (baseline[0] - x_t[0]) / 0.5, atol=1e-5)
    assert torch.allclose(v[1], (baseline[1] - x_t[1]) / 0.05, atol=1e-4)  # t clamped at t_min
    with pytest.raises(ValueError, match="needs backprojection=True"):
        PanoramaFlowModel(PanoramaModelConfig(**{**TINY, "backprojection": False}))
    with pytest.raises(ValueError, match="choose 'sample' or 'velocity'"):
        PanoramaFlowModel(PanoramaModelConfig(**{**TINY, "prediction": "eps"}))


def test_keep_seen_pins_seen_pixels_to_the_backprojection() -> None:
    """keep_seen (default): whatever the UNet outputs, x̂ equals the back-projection on seen pixels, so every
    sample carries the cameras' colours there; off, the same UNet output changes the seen pixels too."""
    from visiontrain.panorama.baseline import backprojection_baseline
    from visiontrain.panorama.flow_matching import euler_sample

    torch.manual_seed(0)
    views = torch.rand(2, 4, 3, 32, 32) * 2 - 1
    cams = standard_cameras(0.85, 55.0)[None].expand(2, 4, 5)
    baseline, seen = backprojection_baseline(views, cams, 16)
    assert 0.1 < seen.float().mean() < 0.9
    for keep in (True, False):
        model = PanoramaFlowModel(PanoramaModelConfig(**{**TINY, "keep_seen": keep})).eval()
        torch.nn.init.normal_(model.unet.conv_out.weight, std=0.5)  # a far-from-trained output
        cond = model.condition(views, cams)
        raw = euler_sample(model, cond, (2, 3, 16, 32), steps=12, generator=torch.Generator().manual_seed(1))
        x = model.finalize(raw, cond)
        if keep:  # the last Euler times fall below t_min: the path alone stops just short of the baseline
            assert (raw - baseline).abs().amax(dim=1)[seen].max() > 1e-3
        else:
            assert torch.equal(x, raw)
        seen_err = (x - baseline).abs().amax(dim=1)[seen]
        unseen_err = (x - baseline).abs().amax(dim=1)[~seen]
        assert unseen_err.mean() > 0.05  # the unseen region is generated either way
        if keep:
            assert seen_err.max() == 0
        else:
            assert seen_err.mean() > 0.05


def test_temperature_zero_is_deterministic_and_one_is_the_default() -> None:
    from visiontrain.panorama.flow_matching import euler_sample

    model = PanoramaFlowModel(PanoramaModelConfig(**TINY)).eval()
    torch.nn.init.normal_(model.unet.conv_out.weight, std=0.5)
    views = torch.rand(1, 4, 3, 32, 32) * 2 - 1
    cond = model.condition(views, standard_cameras(0.85, 55.0)[None])
    draw = [euler_sample(model, cond, (1, 3, 16, 32), steps=3, generator=torch.Generator().manual_seed(s),
                         temperature=0.0) for s in (1, 2)]
    assert torch.equal(draw[0], draw[1])
    a = euler_sample(model, cond, (1, 3, 16, 32), steps=3, generator=torch.Generator().manual_seed(1))
    b = euler_sample(model, cond, (1, 3, 16, 32), steps=3, generator=torch.Generator().manual_seed(1),
                     temperature=1.0)
    assert torch.equal(a, b) and not torch.allclose(a, draw[0])
    with pytest.raises(ValueError, match="temperature"):
        euler_sample(model, cond, (1, 3, 16, 32), steps=1, temperature=-1.0)
    from visiontrain.config import ConfigError, load_config
    from visiontrain.panorama.config import PanoramaTrainConfig

    with pytest.raises(ConfigError, match="temperature"):
        load_config(PanoramaTrainConfig, overrides=["temperature=-0.5"])


def test_time_is_scaled_by_1000() -> None:
    model = PanoramaFlowModel(PanoramaModelConfig(**TINY)).eval()
    seen = []
    model.unet.register_forward_pre_hook(lambda mod, args: seen.append(args[1].clone()))
    model(torch.zeros(2, 3, 16, 32), torch.tensor([0.25, 0.5]), torch.zeros(2, 8, 16, 32))
    assert torch.allclose(seen[0], torch.tensor([250.0, 500.0]))


def test_view_latents_land_at_their_longitudes() -> None:
    """Only the front latent is non-zero → features appear around longitude 0 (the middle columns);
    the back view's coverage is split across the seam (both edges)."""
    h, size = 64, 128
    cams = standard_cameras(0.85, 220.0)[None]
    pixels, inside, _ = panorama_view_grid(h, cams, size)
    latents = torch.zeros(1, 4, 2, size // 8, size // 8)
    latents[0, 0] = 1.0
    warped = LatentFusion.warp(latents, pixels, inside)  # [1, 4, 3, 8, 16]
    assert warped.shape == (1, 4, 3, 8, 16)
    cols_front = warped[0, 0, 0].sum(0).nonzero().flatten().tolist()
    assert cols_front == [6, 7, 8, 9]  # lon ±45° around the middle of 16 columns of 22.5°
    assert warped[0, 1:, :2].abs().sum() == 0
    cols_back = warped[0, 2, 2].sum(0).nonzero().flatten().tolist()
    assert cols_back == [0, 1, 14, 15]
    cols_right = warped[0, 1, 2].sum(0).nonzero().flatten().tolist()
    assert cols_right == [10, 11, 12, 13]
    # a latent cell fully inside a view has coverage 1 and the feature value 1 (border padding)
    assert math.isclose(float(warped[0, 0, 2].max()), 1.0) and math.isclose(float(warped[0, 0, 0].max()), 1.0)


def test_gradients_reach_the_encoder_through_the_geometry() -> None:
    torch.manual_seed(0)
    model = PanoramaFlowModel(PanoramaModelConfig(**TINY))
    views = torch.rand(2, 4, 3, 32, 32)
    cams = standard_cameras(0.85, 55.0)[None].expand(2, 4, 5)
    out = model(torch.randn(2, 3, 16, 32), torch.rand(2), {"views": views, "cameras": cams})
    out.square().mean().backward()
    for name in ("encoder.net.0.weight", "fusion.mix.0.weight", "unet.conv_in.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_config_errors() -> None:
    with pytest.raises(ValueError, match="multiples of 8"):
        PanoramaFlowModel(PanoramaModelConfig(**{**TINY, "pano_size": 12}))
    with pytest.raises(ValueError, match="divisible by 16"):
        PanoramaFlowModel(PanoramaModelConfig(**{**TINY, "pano_size": 8, "unet_channels": [8, 8, 8, 8, 16]}))
