"""Textures with the statistics of natural images, ``[H, W, 3] float32`` in ``[0, 1]``.

* :func:`spectral_texture`: Gaussian noise with a ``1/f^alpha`` amplitude spectrum (natural images: alpha
  about 1, i.e. a ``1/f^2`` power spectrum), luminance-dominated colour, optionally passed through a
  random contrast curve so it gains edges;
* :func:`dead_leaves`: occluding disks and rectangles with power-law sizes (``p(r) ~ r^-3``: scale
  invariant, like the sizes of objects in photographs), each with its own colour and a faint inner texture;
* :func:`procedural_texture`: marble-like bands (sinusoids warped by 1/f noise), checks and stripes under
  turbulence, or the legacy colour noise (:func:`visiontrain.flow.synthetic.make_texture`).

:func:`natural_texture` draws one of them at random. All randomness comes from the generator passed in.
"""

from __future__ import annotations

import cv2
import numpy as np

from visiontrain.flow.synth.legacy import make_texture


def pink_noise(rng: np.random.Generator, height: int, width: int, alpha: float, channels: int = 1) -> np.ndarray:
    """Zero-mean, unit-std noise ``[H, W, channels]`` with amplitude spectrum ``~ 1/f^alpha``."""
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    f = np.maximum(np.hypot(fx, fy), 1.0 / max(height, width))
    amp = f ** -alpha
    amp[0, 0] = 0.0
    out = np.empty((height, width, channels), np.float32)
    for c in range(channels):
        spec = (rng.standard_normal(amp.shape) + 1j * rng.standard_normal(amp.shape)) * amp
        x = np.fft.irfft2(spec, s=(height, width))
        out[..., c] = (x - x.mean()) / (x.std() + 1e-12)
    return out


def _colourise(rng: np.random.Generator, lum: np.ndarray, chroma: np.ndarray) -> np.ndarray:
    """Luminance ``[H, W]`` and weaker chroma ``[H, W, 2]`` (both ~unit std) -> RGB around a random mean colour."""
    base = rng.uniform(0.2, 0.8, 3)
    contrast = rng.uniform(0.08, 0.22)
    tint = rng.normal(0, 1, (2, 3))
    tint -= tint.mean(axis=1, keepdims=True)  # chroma directions carry no luminance
    rgb = base + contrast * (lum[..., None] + rng.uniform(0.1, 0.5) * (chroma @ tint))
    return np.clip(rgb, 0.0, 1.0).astype(np.float32)


def spectral_texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """1/f noise (alpha in [0.8, 1.5]); half of the time through a random sigmoid (edges, blotches)."""
    noise = pink_noise(rng, height, width, rng.uniform(0.8, 1.5), 3)
    lum = noise[..., 0]
    if rng.random() < 0.5:
        lum = np.tanh(rng.uniform(1.0, 4.0) * (lum - rng.uniform(-0.5, 0.5))) * 1.5
    return _colourise(rng, lum, noise[..., 1:])


def dead_leaves(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Occluding disks / rectangles, radii from ``p(r) ~ r^-3`` on ``[2, 0.3 min(H, W)]`` px."""
    rmin, rmax = 2.0, max(3.0, 0.3 * min(height, width))
    canvas = np.empty((height, width, 3), np.uint8)
    canvas[:] = rng.integers(0, 256, 3)
    n = int(min(4000, 3 * height * width / (np.pi * rmin * rmax)))
    u = rng.random(n)
    radii = (rmin ** -2 - u * (rmin ** -2 - rmax ** -2)) ** -0.5
    centres = rng.uniform(-rmax, 1, (n, 2)) * [width + rmax, height + rmax]
    base = rng.uniform(0.1, 0.9, 3)
    colours = np.clip(base + rng.normal(0, 0.25, (n, 3)) * rng.uniform(0.5, 1.0), 0, 1) * 255
    rects = rng.random(n) < rng.uniform(0, 0.5)
    for r, (cx, cy), col, rect in zip(radii, centres, colours, rects):
        colour = tuple(float(c) for c in col)
        if rect:
            half = np.array([r, r * rng.uniform(0.3, 1.0)])
            box = cv2.boxPoints(((float(cx), float(cy)), tuple(2 * half), float(rng.uniform(0, 180))))
            cv2.fillConvexPoly(canvas, np.round(box * 16).astype(np.int32), colour, cv2.LINE_AA, 4)
        else:
            cv2.circle(canvas, (int(cx * 16), int(cy * 16)), int(r * 16), colour, -1, cv2.LINE_AA, 4)
    tex = canvas.astype(np.float32) / 255.0
    tex *= 1.0 + rng.uniform(0.02, 0.12) * pink_noise(rng, height, width, rng.uniform(0.8, 1.4))
    return np.clip(tex, 0.0, 1.0)


def procedural_texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Marble bands, turbulent checks / stripes, or the legacy colour noise with strokes."""
    kind = rng.integers(0, 3)
    if kind == 2:
        return make_texture(rng, height, width)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    turb = pink_noise(rng, height, width, rng.uniform(1.2, 1.8))[..., 0] * rng.uniform(2.0, 8.0)
    theta = rng.uniform(0, np.pi)
    period = rng.uniform(6.0, 40.0)
    t = (np.cos(theta) * x + np.sin(theta) * y + turb) * (2 * np.pi / period)
    if kind == 0:  # marble
        lum = np.sin(t + np.sin(0.5 * t) * rng.uniform(0, 2))
    else:  # checks / stripes, softened
        s = np.sin(t)
        if rng.random() < 0.5:
            s = s * np.sin((-np.sin(theta) * x + np.cos(theta) * y + turb) * (2 * np.pi / period))
        lum = np.tanh(4 * s)
    chroma = pink_noise(rng, height, width, 1.5, 2)
    return _colourise(rng, lum * 1.5, chroma)


def natural_texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """One of the three families at random (spectral 40 %, dead leaves 35 %, procedural 25 %), slightly
    blurred (optics) so it has no aliasing."""
    p = rng.random()
    if p < 0.4:
        tex = spectral_texture(rng, height, width)
    elif p < 0.75:
        tex = dead_leaves(rng, height, width)
    else:
        tex = procedural_texture(rng, height, width)
    return cv2.GaussianBlur(tex, (0, 0), rng.uniform(0.4, 0.9))
