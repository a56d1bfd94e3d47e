"""Every augmentation keeps the ground truth exact: warping augmented image 2 by the augmented flow
reproduces augmented image 1 on pixels that stay visible (synthetic pairs give exact GT and visibility)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from visiontrain.engine.task import sample_rng
from visiontrain.flow.augment import (
    FlowAugment,
    FlowAugmentConfig,
    color_jitter,
    crop,
    hflip,
    photometric,
    random_crop,
    resize,
    vflip,
)
from visiontrain.flow.synthetic import pair_rng, render_pair

SIZE = (120, 160)


def _warp(image2: np.ndarray, flow: np.ndarray) -> np.ndarray:
    h, w = flow.shape[:2]
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    grid = np.stack([(x + flow[..., 0]) / (w - 1) * 2 - 1, (y + flow[..., 1]) / (h - 1) * 2 - 1], -1)
    img = torch.from_numpy(np.ascontiguousarray(image2)).permute(2, 0, 1)[None]
    return F.grid_sample(img, torch.from_numpy(grid)[None], align_corners=True)[0].permute(1, 2, 0).numpy()


def _sample(seed: int = 0) -> dict:
    """A synthetic sample plus ``safe``: visible pixels whose surroundings (2 px) in image 1 and whose
    bilinear neighbours in image 2 all belong to the pixel's own layer (interpolation cannot mix layers)."""
    pair = render_pair(pair_rng(seed, 1), SIZE)
    h, w = SIZE
    y, x = np.mgrid[0:h, 0:w]
    x0 = np.clip(np.floor(x + pair.flow[..., 0]).astype(int), 0, w - 2)
    y0 = np.clip(np.floor(y + pair.flow[..., 1]).astype(int), 0, h - 2)
    safe = pair.visible.copy()
    for dy in (0, 1):
        for dx in (0, 1):
            safe &= pair.layer2[y0 + dy, x0 + dx] == pair.layer
    layer = pair.layer.astype(np.float32)
    uniform = (cv2.dilate(layer, np.ones((5, 5))) == cv2.erode(layer, np.ones((5, 5))))
    return {"image1": pair.image1, "image2": pair.image2, "flow": pair.flow, "valid": np.ones(SIZE, bool),
            "safe": safe & uniform}


def _warp_errors(s: dict) -> tuple[float, float]:
    """Mean |warp(image2, flow) - image1| on safe pixels whose target lies inside the (augmented) image 2,
    and the same with the flow off by 0.5 px."""
    h, w = s["flow"].shape[:2]
    y, x = np.mgrid[0:h, 0:w]
    tx, ty = x + s["flow"][..., 0], y + s["flow"][..., 1]
    safe = s["safe"] & (tx >= 0) & (tx <= w - 1.5) & (ty >= 0) & (ty <= h - 1.5)
    assert safe.mean() > 0.4
    err = np.abs(_warp(s["image2"], s["flow"]) - s["image1"]).mean(-1)[safe].mean()
    off = np.abs(_warp(s["image2"], s["flow"] + np.float32(0.5)) - s["image1"]).mean(-1)[safe].mean()
    return float(err), float(off)


def _resize_safe(safe: np.ndarray, height: int, width: int) -> np.ndarray:
    return cv2.resize(safe.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR) > 1 - 1e-4


def _assert_exact(s: dict) -> None:
    err, off = _warp_errors(s)
    assert err < 0.008, err
    assert off > 3 * err, (err, off)


def test_reference_sample_is_exact():
    _assert_exact(_sample())


@pytest.mark.parametrize("op", ["hflip", "vflip", "crop"])
def test_flip_and_crop_keep_gt_exact(op):
    s = _sample(1)
    out = {"hflip": hflip, "vflip": vflip, "crop": lambda t: crop(t, 13, 21, 96, 128)}[op](s)
    _assert_exact(out)
    if op == "crop":
        np.testing.assert_array_equal(out["flow"], s["flow"][13:109, 21:149])
    else:
        axis, comp = (1, 0) if op == "hflip" else (0, 1)
        np.testing.assert_array_equal(np.flip(out["flow"], axis)[..., comp], -s["flow"][..., comp])
        back = {"hflip": hflip, "vflip": vflip}[op](out)
        np.testing.assert_array_equal(back["flow"], s["flow"])
        np.testing.assert_array_equal(back["image1"], s["image1"])


@pytest.mark.parametrize("size", [(150, 200), (90, 120), (130, 130)])
def test_rescale_and_stretch_keep_gt_exact(size):
    s = _sample(2)
    out = resize(s, *size)
    assert out["image1"].shape == (*size, 3) and out["flow"].shape == (*size, 2) and out["valid"].all()
    out["safe"] = _resize_safe(s["safe"], *size)
    _assert_exact(out)


def test_sparse_rescale_matches_dense_where_valid():
    """KITTI-style sparse GT: resampled only from valid pixels, and equal to the dense result there."""
    s = _sample(3)
    rng = np.random.default_rng(0)
    blocks = cv2.resize((rng.random((12, 16)) > 0.5).astype(np.uint8), SIZE[::-1], interpolation=cv2.INTER_NEAREST)
    sparse = dict(s, valid=blocks.astype(bool) & (rng.random(SIZE) > 0.1))
    sparse["flow"] = np.where(sparse["valid"][..., None], s["flow"], np.float32(1e4))  # garbage where invalid
    for size in ((150, 200), (96, 128)):
        dense_out, sparse_out = resize(s, *size), resize(sparse, *size)
        v = sparse_out["valid"]
        assert 0.1 < v.mean() < sparse["valid"].mean()  # pixels next to an invalid one are dropped
        np.testing.assert_allclose(sparse_out["flow"][v], dense_out["flow"][v], atol=2e-4)
        assert (sparse_out["flow"][~v] == 0).all()


def test_symmetric_jitter_keeps_gt_exact_and_asymmetric_differs():
    s = _sample(4)
    cfg = FlowAugmentConfig(asymmetric_prob=0.0)
    out = photometric(s, np.random.default_rng(1), cfg)
    assert out["flow"] is s["flow"] and not np.allclose(out["image1"], s["image1"])
    _assert_exact(out)
    # symmetric = one pointwise map: jittering the two images side by side gives the same pixels
    params = {"brightness": 1.2, "contrast": 0.8, "saturation": 1.3, "hue": 0.1}
    both = color_jitter(np.concatenate([s["image1"], s["image2"]], 1), params, 0.4)
    np.testing.assert_array_equal(both[:, :SIZE[1]], color_jitter(s["image1"], params, 0.4))
    np.testing.assert_array_equal(both[:, SIZE[1]:], color_jitter(s["image2"], params, 0.4))
    # asymmetric: image 2 gets another map, so it no longer matches the symmetric result
    asym = photometric(s, np.random.default_rng(1), FlowAugmentConfig(asymmetric_prob=1.0))
    sym2 = photometric(s, np.random.default_rng(1), FlowAugmentConfig(asymmetric_prob=0.0))
    assert not np.allclose(asym["image2"], sym2["image2"], atol=1e-3)


def test_photometric_false_keeps_colours_and_geometry_still_applies():
    s = _sample(6)
    s.pop("safe")
    cfg = FlowAugmentConfig(photometric=False, scale_prob=0.0, hflip_prob=1.0, vflip_prob=0.0)
    out = FlowAugment(cfg, crop_size=None)(dict(s), sample_rng(3, 0, 0))
    # only the (forced) horizontal flip: pixels are the mirrored input, bit for bit
    np.testing.assert_array_equal(out["image1"], s["image1"][:, ::-1])
    np.testing.assert_array_equal(out["image2"], s["image2"][:, ::-1])
    np.testing.assert_array_equal(out["flow"][..., 0], -s["flow"][:, ::-1, 0])
    jittered = FlowAugment(FlowAugmentConfig(scale_prob=0.0, hflip_prob=1.0, vflip_prob=0.0), crop_size=None)(
        dict(s), sample_rng(3, 0, 0))
    assert not np.allclose(jittered["image1"], out["image1"], atol=1e-3)  # the default does jitter


def test_identity_jitter_is_identity():
    image = _sample(0)["image1"]
    params = {"brightness": 1.0, "contrast": 1.0, "saturation": 1.0, "hue": 0.0}
    np.testing.assert_allclose(color_jitter(image, params, 0.5), image, atol=2e-6)


def test_full_pipeline_keeps_gt_exact_and_is_deterministic():
    aug = FlowAugment(FlowAugmentConfig(scale_prob=1.0, stretch_prob=1.0, hflip_prob=0.5, vflip_prob=0.5,
                                        asymmetric_prob=0.0), crop_size=(96, 128))
    s = _sample(5)
    safe = s.pop("safe")
    for index in range(4):
        out = aug(dict(s), sample_rng(7, 0, index))
        assert out["image1"].shape == (96, 128, 3) and out["flow"].shape == (96, 128, 2)
        # the same draws again with the safe mask riding as (sparse-style) validity, which resize keeps
        # only where all bilinear neighbours are safe
        ride = aug(dict(s, valid=safe), sample_rng(7, 0, index))
        out["safe"] = ride["valid"]
        np.testing.assert_array_equal(ride["image1"], out["image1"])
        _assert_exact(out)
    a = aug(dict(s), sample_rng(7, 3, 1))
    b = aug(dict(s), sample_rng(7, 3, 1))
    c = aug(dict(s), sample_rng(7, 4, 1))
    np.testing.assert_array_equal(a["flow"], b["flow"])
    np.testing.assert_array_equal(a["image2"], b["image2"])
    assert not np.array_equal(a["image1"], c["image1"])


def test_crop_larger_than_image_is_an_error_and_disabled_augmentation():
    """An image smaller than the crop is never upscaled (it used to be, silently)."""
    s = _sample(6)
    with pytest.raises(ValueError, match=r"images are 120×160 \(H×W\), smaller than the crop 128×192; images are "
                                         r"never upscaled"):
        FlowAugment(FlowAugmentConfig(enabled=False), crop_size=(128, 192))(dict(s), np.random.default_rng(0))
    with pytest.raises(ValueError, match="smaller than the crop"):
        random_crop(dict(s), (121, 160), np.random.default_rng(0))
    out = FlowAugment(FlowAugmentConfig(enabled=False), crop_size=(120, 160))(dict(s), np.random.default_rng(0))
    np.testing.assert_array_equal(out["flow"], s["flow"])  # a crop of the image's own size is the image
    same = FlowAugment(FlowAugmentConfig(enabled=False), crop_size=None)(dict(s), np.random.default_rng(0))
    np.testing.assert_array_equal(same["image1"], s["image1"])


def test_random_rescale_may_enlarge_but_the_crop_never_forces_it(monkeypatch):
    """With rescale factors below 1 drawn every time, an image that covers the crop is only shrunk (down to
    the crop at most), never enlarged because of the crop; factors above 1 still enlarge it."""
    import visiontrain.flow.augment as augment

    s = _sample(7)
    seen = []
    monkeypatch.setattr(augment, "resize", lambda sample, h, w: seen.append((h, w)) or resize(sample, h, w))
    for low, high, fits in ((-1.0, -0.5, lambda h, w: 96 <= h <= 120 and 128 <= w <= 160),
                            (0.5, 1.0, lambda h, w: h > 120 and w > 160)):
        seen.clear()
        aug = FlowAugment(FlowAugmentConfig(scale_prob=1.0, min_scale=low, max_scale=high, stretch_prob=0.0,
                                            hflip_prob=0.0, vflip_prob=0.0, photometric=False), crop_size=(96, 128))
        for index in range(6):
            assert aug(dict(s), sample_rng(0, 0, index))["image1"].shape == (96, 128, 3)
        assert len(seen) == 6 and all(fits(h, w) for h, w in seen), seen
