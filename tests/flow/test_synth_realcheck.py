"""The real-texture check: photographs under known layered motion, exact flow, FlyingChairs layout."""

from __future__ import annotations

import numpy as np
import pytest

from visiontrain.flow.data import open_flow_dataset

pytest.importorskip("skimage")

from visiontrain.flow.synth.realcheck import (  # noqa: E402 - after the skip
    photograph,
    real_texture_pair,
    real_texture_scene,
    write_real_texture_check,
)

from .test_synthetic import backward_warp, interpolation_safe  # noqa: E402

SIZE = (96, 128)


def test_photographs_are_real_images():
    for name in ("astronaut", "camera"):
        photo = photograph(name)
        assert photo.ndim == 3 and photo.shape[2] == 3 and photo.dtype == np.float32
        assert 0 <= photo.min() and photo.max() <= 1 and photo.std() > 0.1


def test_check_pairs_have_exact_flow_and_real_motion():
    y, x = np.mgrid[0:SIZE[0], 0:SIZE[1]].astype(np.float64)
    mags = []
    for i in range(1, 4):
        scene = real_texture_scene(np.random.default_rng([18018, i, 0x4EA1]), SIZE)
        pair = scene.pair()
        color2, top2, _ = scene.render(2, x + pair.flow[..., 0].astype(np.float64), y + pair.flow[..., 1])
        v = pair.visible
        assert v.mean() > 0.5 and len(scene.layers) >= 2
        np.testing.assert_array_equal(top2[v], pair.layer[v])
        assert np.abs(color2[v] - pair.image1[v]).max() < 1e-4
        safe = interpolation_safe(pair)
        assert np.abs(backward_warp(pair.image2, pair.flow) - pair.image1).mean(-1)[safe].mean() < 0.01
        mags.append(np.linalg.norm(pair.flow, axis=-1).mean())
        np.testing.assert_array_equal(pair.flow, real_texture_pair(i, SIZE).flow)  # the same pair, by index
    assert max(mags) > 0.04 * SIZE[1]  # not a few-pixel toy motion


def test_check_is_written_in_the_chairs_layout(tmp_path):
    root = write_real_texture_check(tmp_path / "real", pairs=2, size=SIZE)
    val = open_flow_dataset(f"chairs:{root}", "val")
    assert len(val) == 2
    sample = val.load(1)
    np.testing.assert_array_equal(sample["flow"], real_texture_pair(2, SIZE).flow)
