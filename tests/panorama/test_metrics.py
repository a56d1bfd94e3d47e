"""Masked image metrics against float64 formulas and torchmetrics; LPIPS/FID only from local files."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchmetrics.functional.image import structural_similarity_index_measure

from visiontrain.panorama.metrics import (
    MetricWeightsError,
    PerceptualMetrics,
    RegionMetrics,
    build_lpips,
    masked_image_metrics,
)


def test_masked_metrics_match_reference_formulas() -> None:
    g = torch.Generator().manual_seed(0)
    target = torch.rand(3, 3, 24, 40, generator=g) * 2 - 1
    pred = (target + 0.2 * torch.randn(3, 3, 24, 40, generator=g)).clamp(-1, 1)
    mask = torch.rand(3, 24, 40, generator=g) > 0.4
    out = masked_image_metrics(pred, target, mask)
    p, t = ((pred.double() + 1) / 2).numpy(), ((target.double() + 1) / 2).numpy()
    for i in range(3):
        m = mask[i].numpy()
        diff = (p[i] - t[i])[:, m]
        mse = (diff ** 2).mean()
        assert math.isclose(float(out["mse"][i]), mse, rel_tol=1e-5)
        assert math.isclose(float(out["mae"][i]), np.abs(diff).mean(), rel_tol=1e-5)
        assert math.isclose(float(out["psnr"][i]), 10 * math.log10(1 / mse), rel_tol=1e-5)
    full = masked_image_metrics(pred, target, torch.ones_like(mask))
    ref = structural_similarity_index_measure((pred + 1) / 2, (target + 1) / 2, data_range=1.0, reduction="none")
    assert torch.allclose(full["ssim"], ref.float(), atol=1e-5)
    # identical images: SSIM 1 everywhere, PSNR capped by the 1e-10 floor
    same = masked_image_metrics(target, target, mask)
    assert torch.allclose(same["ssim"], torch.ones(3), atol=1e-5) and (same["psnr"] == 100).all()


def test_region_metrics_split_seen_and_unseen() -> None:
    target = torch.zeros(2, 3, 16, 32)
    pred = target.clone()
    seen = torch.zeros(2, 16, 32, dtype=torch.bool)
    seen[:, :, :16] = True
    pred[:, :, :, 16:] = 0.5  # unseen half off by 0.25 in [0, 1] units
    seen[1] = True  # second image: nothing unseen, so it must not count for the unseen region
    pred[1] = 0.0
    acc = RegionMetrics(prefix="m_")
    acc.update(pred, target, seen)
    r = acc.compute()
    assert r["m_mse_seen"] == 0.0
    assert math.isclose(r["m_mse_unseen"], 0.0625, rel_tol=1e-6)  # only image 0 counts
    assert math.isclose(r["m_mse"], (0.0625 / 2 + 0.0) / 2, rel_tol=1e-6)
    assert math.isclose(r["m_psnr_unseen"], 10 * math.log10(1 / 0.0625), rel_tol=1e-6)


def test_lpips_without_weights_gives_a_message_and_never_downloads(monkeypatch) -> None:
    def no_download(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    with pytest.raises(MetricWeightsError, match="lpips_weights=.*Nothing is downloaded"):
        build_lpips("")
    with pytest.raises(MetricWeightsError, match="no such file"):
        PerceptualMetrics(lpips_weights="/nonexistent/alexnet.pth")
    with pytest.raises(MetricWeightsError, match="no such file"):
        PerceptualMetrics(fid_weights="/nonexistent/inception.pth")
    assert not PerceptualMetrics().enabled


@pytest.mark.slow
def test_lpips_from_a_local_file(tmp_path, monkeypatch) -> None:
    import torchvision

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda *a, **k: (_ for _ in ()).throw(
        AssertionError("download attempted")))
    torch.manual_seed(0)
    path = tmp_path / "alexnet.pth"
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), path)
    metrics = PerceptualMetrics(lpips_weights=str(path))
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    metrics.update(x, x)
    assert metrics.compute()["lpips"] == pytest.approx(0.0, abs=1e-6)
    assert float(metrics.lpips(x, -x).mean()) > 0
    # the backbone holds the file's weights (not a fresh random init)
    conv = metrics.lpips.net.slice1[0]
    assert torch.equal(conv.weight, torch.load(path, weights_only=True)["features.0.weight"])
    bad = tmp_path / "bad.pth"
    torch.save({"w": torch.zeros(1)}, bad)
    with pytest.raises(MetricWeightsError, match="not an AlexNet state dict"):
        build_lpips(str(bad))


@pytest.mark.slow
def test_fid_from_a_local_file(tmp_path) -> None:
    import torchvision

    torch.manual_seed(0)
    path = tmp_path / "inception.pth"
    torch.save(torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict(), path)
    metrics = PerceptualMetrics(fid_weights=str(path))
    x = torch.rand(4, 3, 32, 64) * 2 - 1
    metrics.update(x, x)
    assert metrics.compute()["fid"] == pytest.approx(0.0, abs=1e-2)
