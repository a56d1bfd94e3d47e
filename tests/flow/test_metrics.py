from __future__ import annotations

import numpy as np
import pytest
import torch

from visiontrain.flow.metrics import (
    METRIC_NAMES,
    FlowMetrics,
    flow_metrics,
    format_comparison,
    format_metrics_table,
)


def _reference_per_image(pred, gt, valid):
    """float64 numpy: per image, the sum over valid pixels of each metric, and the valid count. The rates
    follow torchvision's optical-flow reference (references/optical_flow/utils.py, ``compute_metrics``):
    ``1px = epe < 1`` ... (accuracies), ``f1 = (epe > 3) & (epe / |gt| > 0.05)`` (KITTI outliers)."""
    out = []
    for p, g, v in zip(pred.double().numpy(), gt.double().numpy(), valid.numpy()):
        epe = np.sqrt(((p - g) ** 2).sum(0))[v]
        mag = np.sqrt((g ** 2).sum(0))[v]
        out.append({"epe": epe.sum(), "1px": (epe < 1).sum(), "3px": (epe < 3).sum(), "5px": (epe < 5).sum(),
                    "fl_all": ((epe > 3) & (epe / mag > 0.05)).sum(), "pixels": v.sum()})
    return out


def _batch(seed, b=3, h=10, w=12, invalid=0.4):
    g = torch.Generator().manual_seed(seed)
    gt = torch.randn(b, 2, h, w, generator=g) * 20
    pred = gt + torch.randn(b, 2, h, w, generator=g) * 4
    valid = torch.rand(b, h, w, generator=g) > invalid
    return pred, gt, valid


def test_per_image_sums_match_float64_reference():
    pred, gt, valid = _batch(0)
    got = flow_metrics(pred, gt, valid)
    ref = _reference_per_image(pred, gt, valid)
    for k in (*METRIC_NAMES, "pixels"):
        np.testing.assert_allclose(got[k].numpy(), [r[k] for r in ref], rtol=1e-5, atol=1e-4)


def test_fl_all_needs_both_conditions():
    gt = torch.tensor([[100.0, 0.0], [10.0, 0.0], [1.0, 0.0]]).T.reshape(1, 2, 1, 3)
    err = torch.tensor([[4.0, 0.0], [4.0, 0.0], [0.5, 0.0]]).T.reshape(1, 2, 1, 3)
    m = flow_metrics(gt + err, gt, torch.ones(1, 1, 3, dtype=torch.bool))
    # 4 px on |gt|=100 is 4 % (not an outlier), 4 px on |gt|=10 is one, 0.5 px is under 3 px; 1px and 3px
    # count the pixels with EPE below the threshold (RAFT's accuracies): only the 0.5 px one
    assert m["fl_all"].item() == 1 and m["3px"].item() == 1 and m["1px"].item() == 1 and m["5px"].item() == 3


def test_rates_are_accuracies_and_fl_all_an_error_rate():
    gt = torch.randn(1, 2, 8, 8) * 10
    valid = torch.ones(1, 8, 8, dtype=torch.bool)
    perfect, wrong = FlowMetrics(), FlowMetrics()
    perfect.update(gt, gt, valid)
    wrong.update(gt + 100, gt, valid)
    p, w = perfect.compute(), wrong.compute()
    assert (p["epe"], p["1px"], p["3px"], p["5px"], p["fl_all"]) == (0, 1, 1, 1, 0)
    assert (w["1px"], w["3px"], w["5px"], w["fl_all"]) == (0, 0, 0, 1)
    rows = {line.split()[0]: line for line in format_metrics_table(p).splitlines()}
    assert rows["1px"].split()[1:5] == ["100.00", "%", "100.00", "%"]
    assert rows["1px"].endswith("% of pixels with EPE < 1 px (higher is better)")
    assert rows["fl_all"].split()[1:5] == ["0.00", "%", "0.00", "%"]
    assert rows["fl_all"].endswith("% outliers, EPE > 3 px and > 5 % of |gt| (KITTI Fl-all; lower is better)")
    assert rows["(zero"] == f"(zero flow, predicting no motion, would score EPE {p['zero_epe']:.3f} on these pixels)"
    comparison = format_comparison({"perfect": p, "off by 100 px": w})
    assert "below 1/3/5 px, higher is better" in comparison and "fl_all: KITTI Fl-all outlier rate, lower is" \
        in comparison


def test_accumulator_pixel_weighted_and_per_image():
    meter = FlowMetrics()
    refs = []
    for seed, invalid in ((1, 0.2), (2, 0.7), (3, 0.5)):
        pred, gt, valid = _batch(seed, invalid=invalid)
        if seed == 2:
            valid[1] = False  # an image without valid pixels: skipped by per-image, no effect on pixels
        meter.update(pred, gt, valid)
        refs += _reference_per_image(pred, gt, valid)
    out = meter.compute()
    kept = [r for r in refs if r["pixels"] > 0]
    total = sum(r["pixels"] for r in refs)
    for k in METRIC_NAMES:
        assert out[k] == pytest.approx(sum(r[k] for r in refs) / total, rel=1e-6)
        assert out[f"{k}_per_image"] == pytest.approx(np.mean([r[k] / r["pixels"] for r in kept]), rel=1e-6)
    assert out["images"] == len(kept) == len(refs) - 1 and out["pixels"] == total
    # the two averages genuinely differ when valid counts differ
    assert abs(out["epe"] - out["epe_per_image"]) > 1e-4


def test_empty_and_shape_errors():
    assert np.isnan(FlowMetrics().compute()["epe"])
    pred, gt, valid = _batch(0)
    with pytest.raises(ValueError, match="valid must be"):
        flow_metrics(pred, gt, valid[:, 1:])
    with pytest.raises(ValueError, match=r"\[B, 2, H, W\]"):
        flow_metrics(pred[:, :1], gt[:, :1], valid)


def test_zero_epe_is_the_error_of_predicting_no_motion_on_the_same_pixels():
    pred, gt, valid = _batch(4, invalid=0.4)
    meter = FlowMetrics()
    meter.update(pred, gt, valid)
    zero = FlowMetrics()
    zero.update(torch.zeros_like(gt), gt, valid)
    expected = gt.double().norm(dim=1)[valid].mean().item()
    assert meter.compute()["zero_epe"] == pytest.approx(expected, rel=1e-9)
    assert zero.compute()["epe"] == pytest.approx(expected, rel=1e-6) == zero.compute()["zero_epe"]
