"""The layered generator (visiontrain.flow.synth): exact ground truth, motion statistics, factor switches."""

from __future__ import annotations

import numpy as np
import pytest

from visiontrain.config import ConfigError, load_config
from visiontrain.flow.config import FlowSynthConfig
from visiontrain.flow.synth import FlowGenConfig, flow_pair
from visiontrain.flow.synth.motion import random_warp
from visiontrain.flow.synth.scene import random_layered_scene
from visiontrain.flow.synthetic import pair_rng, synthetic_chairs_spec

from .test_synthetic import backward_warp, interpolation_safe

SIZE = (96, 128)
CLEAN = FlowGenConfig().without_photometric()


def _scenes(n: int, cfg: FlowGenConfig = CLEAN, size=SIZE, seed: int = 0):
    return [random_layered_scene(pair_rng(seed, i), size, cfg) for i in range(1, n + 1)]


def test_flow_is_exact_at_continuous_points_with_warps_rotation_and_zoom():
    """Frame 2 rendered at x + flow(x) shows what frame 1 shows at x, on every visible pixel, also on
    non-rigid, rotating and zooming layers; half a pixel off is clearly wrong."""
    warped = 0
    y, x = np.mgrid[0:SIZE[0], 0:SIZE[1]].astype(np.float64)
    for scene in _scenes(4):
        pair = scene.pair()
        warped += sum(layer.warp is not None for layer in scene.layers)
        color2, top2, _ = scene.render(2, x + pair.flow[..., 0].astype(np.float64), y + pair.flow[..., 1])
        v = pair.visible
        assert v.mean() > 0.3
        np.testing.assert_array_equal(top2[v], pair.layer[v])
        assert np.abs(color2[v] - pair.image1[v]).max() < 1e-4  # float32 flow rounding only
        color_off, _, _ = scene.render(2, x + pair.flow[..., 0] + 0.5, y + pair.flow[..., 1])
        assert np.abs(color_off[v] - pair.image1[v]).mean() > 20 * np.abs(color2[v] - pair.image1[v]).mean()
    assert warped >= 2


def test_warping_image2_by_gt_reproduces_image1():
    """On the pixel grid, with camera effects off: bilinear warping of image 2 by the GT matches image 1."""
    for i in range(1, 4):
        pair = flow_pair(pair_rng(5, i), SIZE, CLEAN)
        safe = interpolation_safe(pair)
        assert safe.mean() > 0.3
        err = np.abs(backward_warp(pair.image2, pair.flow) - pair.image1).mean(-1)[safe]
        err_off = np.abs(backward_warp(pair.image2, pair.flow + np.float32(0.5)) - pair.image1).mean(-1)[safe]
        assert err.mean() < 0.01 and np.percentile(err, 99) < 0.06
        assert err_off.mean() > 3 * err.mean()


def test_camera_effects_change_images_not_ground_truth():
    full, clean = flow_pair(pair_rng(3, 2), SIZE), flow_pair(pair_rng(3, 2), SIZE, CLEAN)
    np.testing.assert_array_equal(full.flow, clean.flow)
    np.testing.assert_array_equal(full.visible, clean.visible)
    changed = [not np.array_equal(flow_pair(pair_rng(3, i), SIZE).image2, flow_pair(pair_rng(3, i), SIZE,
                                                                                      CLEAN).image2)
               for i in range(1, 6)]
    assert sum(changed) >= 3
    for i in range(1, 4):
        p = flow_pair(pair_rng(3, i), SIZE)
        assert p.image1.dtype == np.float32 and 0 <= p.image1.min() and p.image2.max() <= 1


def test_motion_is_long_tailed_and_layered():
    """Most pairs move little, some a quarter of the width; long_tail=false stays in the legacy range."""
    width = SIZE[1]
    medians, maxima, layers = [], [], []
    for i in range(1, 25):
        pair = flow_pair(pair_rng(11, i), SIZE, CLEAN)
        mag = np.linalg.norm(pair.flow, axis=-1)
        medians.append(np.median(mag))
        maxima.append(mag.max())
        layers.append(len(np.unique(pair.layer)))
    assert np.median(medians) < 0.08 * width  # most pairs: small motion
    assert max(maxima) > 0.2 * width  # the tail: up to ~25 % of the width and more
    assert np.mean(layers) >= 3
    short = [np.linalg.norm(flow_pair(pair_rng(11, i), SIZE, FlowGenConfig(long_tail=False).without_photometric()
                                      ).flow, axis=-1).max() for i in range(1, 13)]
    assert max(short) < 0.15 * width


def test_factor_switches():
    rigid = FlowGenConfig(rotation_zoom=False, nonrigid=False, min_layers=1, max_layers=1).without_photometric()
    for scene in _scenes(6, rigid):
        assert len(scene.layers) == 2
        for layer in scene.layers:
            assert layer.warp is None
            np.testing.assert_allclose(layer.motion[:, :2], np.eye(2), atol=1e-12)  # pure translation
    free = [layer for scene in _scenes(6) for layer in scene.layers]
    assert any(layer.warp is not None for layer in free)
    assert any(abs(np.linalg.det(layer.motion[:, :2]) - 1) > 1e-3 for layer in free)  # zoom
    assert 3 <= np.mean([len(s.layers) for s in _scenes(6)]) <= 9


def test_warp_is_smooth_and_invertible():
    rng = np.random.default_rng(0)
    for _ in range(10):
        warp = random_warp(rng, 100.0)
        gradient = np.sum(np.abs(warp.amp) * np.linalg.norm(warp.freq, axis=1))
        assert 0 < gradient <= 0.3 + 1e-9  # |Jacobian - I| < 1: one-to-one
        u = rng.uniform(-50, 50, 1000)
        du, dv = warp(u, u * 0.5)
        assert np.hypot(du, dv).max() <= warp.reach + 1e-9


def test_gen_config_is_checked_and_reaches_the_synth_verb():
    with pytest.raises(ConfigError, match="gen.style"):
        FlowGenConfig(style="fancy")
    with pytest.raises(ConfigError, match="gen.textures"):
        FlowGenConfig(textures="photos")
    with pytest.raises(ConfigError, match="min_layers"):
        FlowGenConfig(min_layers=3, max_layers=2)
    cfg = load_config(FlowSynthConfig, None, ["gen.style=legacy", "gen.jpeg=false"])
    assert cfg.gen.style == "legacy" and not cfg.gen.jpeg
    assert FlowGenConfig().photometric and not FlowGenConfig().without_photometric().photometric


def test_builtin_set_cache_folder_depends_on_generator(tmp_path, monkeypatch):
    monkeypatch.setenv("VISIONTRAIN_CACHE", str(tmp_path))
    specs = {synthetic_chairs_spec("", 1, 0, (32, 48), 0, gen) for gen in
             (FlowGenConfig(), FlowGenConfig(jpeg=False), FlowGenConfig(style="legacy"))}
    assert len(specs) == 3
    assert f"chairs:{tmp_path}/flow_synth/chairs_t1_v0_32x48_s0" in specs  # legacy: the folder it always had
