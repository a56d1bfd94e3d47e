"""Natural-image textures and camera effects of the layered generator."""

from __future__ import annotations

import numpy as np

from visiontrain.flow.synth.photometric import jpeg, lighting, motion_blur, sensor_noise
from visiontrain.flow.synth.textures import dead_leaves, natural_texture, pink_noise, spectral_texture


def spectral_slope(image: np.ndarray) -> float:
    """Slope of log radial power vs log frequency (natural images: about -2)."""
    grey = image.mean(-1) if image.ndim == 3 else image
    grey = (grey - grey.mean()) * np.hanning(grey.shape[0])[:, None] * np.hanning(grey.shape[1])[None]
    power = np.abs(np.fft.fft2(grey)) ** 2
    fy, fx = np.meshgrid(np.fft.fftfreq(grey.shape[0]), np.fft.fftfreq(grey.shape[1]), indexing="ij")
    f = np.hypot(fx, fy)
    bins = np.geomspace(0.02, 0.25, 10)
    idx = np.digitize(f, bins)
    centres = [np.sqrt(bins[k - 1] * bins[k]) for k in range(1, len(bins))]
    means = [power[idx == k].mean() for k in range(1, len(bins))]
    return float(np.polyfit(np.log(centres), np.log(means), 1)[0])


def test_pink_noise_has_the_requested_spectrum():
    noise = pink_noise(np.random.default_rng(0), 128, 128, 1.0)[..., 0]
    assert abs(noise.mean()) < 1e-5 and abs(noise.std() - 1) < 1e-4
    assert -2.4 < spectral_slope(noise) < -1.6


def test_natural_textures_have_natural_statistics():
    rng = np.random.default_rng(1)
    for make in (spectral_texture, dead_leaves, natural_texture):
        slopes = []
        for _ in range(4):
            tex = make(rng, 128, 160)
            assert tex.shape == (128, 160, 3) and tex.dtype == np.float32
            assert 0 <= tex.min() and tex.max() <= 1 and tex.std() > 0.03
            slopes.append(spectral_slope(tex))
        assert -3.5 < np.median(slopes) < -1.3, (make.__name__, slopes)


def test_camera_effects():
    rng = np.random.default_rng(2)
    image = natural_texture(rng, 64, 80)
    flow = np.zeros((64, 80, 2), np.float32)
    flow[..., 0] = 6.0
    blurred = motion_blur(image, flow, 0.5)
    assert np.abs(np.diff(blurred, axis=1)).mean() < np.abs(np.diff(image, axis=1)).mean()  # blurred along x
    assert np.abs(np.diff(blurred, axis=0)).mean() > 0.8 * np.abs(np.diff(image, axis=0)).mean()  # not along y
    np.testing.assert_allclose(motion_blur(image, flow * 0, 0.5), image, atol=1e-6)
    lit = lighting(rng, image)
    assert lit.shape == image.shape and 0 <= lit.min() and lit.max() <= 1
    noisy = sensor_noise(rng, image, 0.02, 0.0)
    assert 0.015 < (noisy - image)[(image > 0.1) & (image < 0.9)].std() < 0.025
    q30, q95 = jpeg(image, 30), jpeg(image, 95)
    assert np.abs(q95 - image).mean() < np.abs(q30 - image).mean() < 0.05
