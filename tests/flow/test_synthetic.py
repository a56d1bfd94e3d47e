from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.datasets import FlyingChairs

from visiontrain.flow.io import read_flo, read_image
from visiontrain.flow.synth import FlowGenConfig, flow_pair
from visiontrain.flow.synthetic import pair_rng, random_scene, render_pair, write_synthetic_chairs

SIZE = (96, 128)


def backward_warp(image2: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """Oracle: sample image 2 at x + flow(x) with torch's bilinear grid_sample (pixel centres at integers)."""
    h, w = flow.shape[:2]
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    grid = np.stack([(x + flow[..., 0]) / (w - 1) * 2 - 1, (y + flow[..., 1]) / (h - 1) * 2 - 1], -1)
    img = torch.from_numpy(np.ascontiguousarray(image2)).permute(2, 0, 1)[None]
    out = F.grid_sample(img, torch.from_numpy(grid)[None], mode="bilinear", align_corners=True)
    return out[0].permute(1, 2, 0).numpy()


def interpolation_safe(pair) -> np.ndarray:
    """Visible pixels whose four bilinear neighbours in image 2 all show the pixel's own layer."""
    h, w = pair.flow.shape[:2]
    y, x = np.mgrid[0:h, 0:w]
    x0 = np.clip(np.floor(x + pair.flow[..., 0]).astype(int), 0, w - 2)
    y0 = np.clip(np.floor(y + pair.flow[..., 1]).astype(int), 0, h - 2)
    same = pair.visible.copy()
    for dy in (0, 1):
        for dx in (0, 1):
            same &= pair.layer2[y0 + dy, x0 + dx] == pair.layer
    return same


def test_flow_is_exact_at_continuous_points():
    """Frame 2 rendered at x + flow(x) reproduces frame 1 at x exactly, for every visible pixel."""
    for seed in range(3):
        scene = random_scene(pair_rng(seed, 1), SIZE)
        pair = scene.pair()
        y, x = np.mgrid[0:SIZE[0], 0:SIZE[1]].astype(np.float64)
        color2, top2 = scene.render(2, x + pair.flow[..., 0].astype(np.float64), y + pair.flow[..., 1])
        v = pair.visible
        assert v.mean() > 0.8
        np.testing.assert_array_equal(top2[v], pair.layer[v])
        assert np.abs(color2[v] - pair.image1[v]).max() < 1e-5  # float32 rounding only
        # and a flow off by half a pixel is clearly wrong
        color_off, _ = scene.render(2, x + pair.flow[..., 0] + 0.5, y + pair.flow[..., 1])
        assert np.abs(color_off[v] - pair.image1[v]).mean() > 10 * np.abs(color2[v] - pair.image1[v]).mean()


def test_warping_image2_by_gt_reproduces_image1():
    """On the pixel grid: bilinear warping of image 2 by the GT matches image 1 on visible pixels."""
    for seed in range(3):
        pair = render_pair(pair_rng(seed, 2), SIZE)
        safe = interpolation_safe(pair)
        assert safe.mean() > 0.75
        err = np.abs(backward_warp(pair.image2, pair.flow) - pair.image1).mean(-1)[safe]
        err_off = np.abs(backward_warp(pair.image2, pair.flow + np.float32(0.5)) - pair.image1).mean(-1)[safe]
        assert err.mean() < 0.006 and np.percentile(err, 99) < 0.04
        assert err_off.mean() > 4 * err.mean()


def test_scenes_have_learnable_motion_and_several_layers():
    mags, layers = [], []
    for i in range(1, 6):
        pair = render_pair(pair_rng(7, i), (192, 256))
        mags.append(np.linalg.norm(pair.flow, axis=-1))
        layers.append(len(np.unique(pair.layer)))
        assert pair.image1.dtype == np.float32 and 0 <= pair.image1.min() and pair.image1.max() <= 1
        assert pair.image1.std() > 0.08  # textured, not flat
    allmag = np.concatenate([m.ravel() for m in mags])
    assert 1.0 < allmag.mean() < 15.0 and allmag.max() < 40.0
    assert min(layers) >= 3


def test_deterministic_and_independent_of_set_size(tmp_path):
    a = render_pair(pair_rng(3, 5), SIZE)
    b = render_pair(pair_rng(3, 5), SIZE)
    c = render_pair(pair_rng(4, 5), SIZE)
    np.testing.assert_array_equal(a.image1, b.image1)
    np.testing.assert_array_equal(a.flow, b.flow)
    assert not np.array_equal(a.image1, c.image1)
    write_synthetic_chairs(tmp_path / "small", 2, 1, SIZE, seed=3)
    write_synthetic_chairs(tmp_path / "big", 4, 2, SIZE, seed=3)
    for name in ("00001_img1.ppm", "00002_flow.flo"):
        assert (tmp_path / "small/data" / name).read_bytes() == (tmp_path / "big/data" / name).read_bytes()


def test_chairs_layout_is_read_by_torchvision(tmp_path):
    root = tmp_path / "FlyingChairs"
    write_synthetic_chairs(root, train=3, val=2, size=SIZE, seed=1)
    assert (root / "FlyingChairs_train_val.txt").read_text().split() == ["1", "1", "1", "2", "2"]
    train, val = FlyingChairs(str(tmp_path), "train"), FlyingChairs(str(tmp_path), "val")
    assert len(train) == 3 and len(val) == 2
    img1, img2, flow = val[0]
    assert img1.size == (SIZE[1], SIZE[0]) and flow.shape == (2, *SIZE)
    # what was written is the rendered pair (images 8-bit, flow exact)
    pair = flow_pair(pair_rng(1, 4), SIZE)
    np.testing.assert_array_equal(flow.transpose(1, 2, 0), pair.flow)
    np.testing.assert_allclose(read_image(root / "data/00004_img1.ppm"), pair.image1, atol=0.5 / 255 + 1e-6)
    assert read_flo(root / "data/00004_flow.flo")[1].all()


def test_legacy_style_writes_the_legacy_pairs(tmp_path):
    root = write_synthetic_chairs(tmp_path / "legacy", 1, 0, SIZE, seed=2, max_translation=9.0,
                                  gen=FlowGenConfig(style="legacy"))
    pair = render_pair(pair_rng(2, 1), SIZE, 9.0)
    np.testing.assert_array_equal(read_flo(root / "data/00001_flow.flo")[0], pair.flow)
    np.testing.assert_allclose(read_image(root / "data/00001_img2.ppm"), pair.image2, atol=0.5 / 255 + 1e-6)
