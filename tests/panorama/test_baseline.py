"""The back-projection baseline copies what the views see and fills the rest with their mean colour."""

from __future__ import annotations

import torch

from visiontrain.panorama.baseline import backprojection_baseline
from visiontrain.panorama.camera import coverage_mask, equirect_rays, render_views, standard_cameras
from visiontrain.panorama.metrics import RegionMetrics


def smooth_panorama(h: int) -> torch.Tensor:
    """Colours that vary smoothly with the ray direction: ``[1, 3, H, 2H]`` in [−1, 1]."""
    rays = equirect_rays(h)
    return (0.8 * torch.stack((rays[..., 0], rays[..., 1] * rays[..., 2], rays[..., 2]), 0))[None]


def test_baseline_reproduces_seen_pixels_and_fills_with_the_mean() -> None:
    h, size, xi, f = 32, 64, 0.85, 110.0
    pano_hi = smooth_panorama(256)
    cams = standard_cameras(xi, f)[None]
    views, _ = render_views(pano_hi, cams, size)
    base, seen = backprojection_baseline(views, cams, h)
    assert base.shape == (1, 3, h, 2 * h)
    assert torch.equal(seen[0], coverage_mask(h, xi, f, size))
    target = torch.nn.functional.interpolate(pano_hi, size=(h, 2 * h), mode="area")
    mean = views.mean(dim=(1, 3, 4))[0]
    unseen = ~seen[0]
    assert torch.allclose(base[0][:, unseen], mean[:, None].expand(3, int(unseen.sum())))
    acc = RegionMetrics()
    acc.update(base, target, seen)
    r = acc.compute()
    assert r["psnr_seen"] > 35  # resampling error only
    assert r["psnr_unseen"] < 20 and r["psnr_seen"] > r["psnr"] > r["psnr_unseen"]


def test_constant_world_is_reproduced_everywhere() -> None:
    pano = torch.full((2, 3, 16, 32), 0.3)
    pano[1] = -0.5
    cams = torch.stack((standard_cameras(0.85, 55.0), standard_cameras(1.2, 50.0)))
    views, _ = render_views(pano, cams, 32)
    base, seen = backprojection_baseline(views, cams, 16)
    assert torch.allclose(base, pano, atol=1e-6)
    assert seen[0].any() and (~seen[0]).any()
