"""Layer motions of the layered generator: long-tailed translations, rotation, zoom, smooth non-rigid warps.

A layer moves between the frames by a 2x3 affine ``A`` (image 1 -> image 2) about its centre. Its
translation magnitude is long-tailed: ``max_motion * W * U^3`` (U uniform), so half of the magnitudes
are below 1/8 of the largest and a few reach it, as in real footage where most things move a little and
some move a lot. A non-rigid layer also owns a smooth displacement field ``d`` of its *local* coordinates
(a sum of a few sinusoids, Jacobian norm below 0.3 so the warp stays one-to-one), applied in frame 1 only:
frame 1 shows local point ``u + d(u)`` where frame 2 shows ``u``, so the flow stays exact without
inverting any warp.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from visiontrain.flow.synth.config import LEGACY_MOTION, FlowGenConfig
from visiontrain.flow.synth.legacy import _affine


@dataclass
class Warp:
    """``d(u, v) = sum_k amp_k * dir_k * sin(freq_k . (u, v) + phase_k)``; arrays ``[K, 2]``, ``[K]``."""

    amp: np.ndarray  # [K]
    direction: np.ndarray  # [K, 2] unit vectors
    freq: np.ndarray  # [K, 2] radians per pixel
    phase: np.ndarray  # [K]

    def __call__(self, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        du, dv = np.zeros_like(u), np.zeros_like(v)
        for a, d, f, p in zip(self.amp, self.direction, self.freq, self.phase):
            s = a * np.sin(f[0] * u + f[1] * v + p)
            du += d[0] * s
            dv += d[1] * s
        return du, dv

    @property
    def reach(self) -> float:
        """Largest displacement |d|."""
        return float(np.abs(self.amp).sum())


def random_warp(rng: np.random.Generator, scale: float, max_gradient: float = 0.3) -> Warp:
    """2-4 sinusoids of wavelength ``[0.3, 1.2] * scale`` px; the sum of ``amp * |freq|`` stays below
    ``max_gradient`` (so ``u -> u + d(u)`` is a diffeomorphism)."""
    k = int(rng.integers(2, 5))
    wavelength = rng.uniform(0.3, 1.2, k) * scale
    angle = rng.uniform(0, 2 * np.pi, k)
    freq = (2 * np.pi / wavelength)[:, None] * np.stack([np.cos(angle), np.sin(angle)], 1)
    share = rng.dirichlet(np.ones(k)) * rng.uniform(0.3, 1.0) * max_gradient
    amp = share / np.linalg.norm(freq, axis=1)
    d = rng.uniform(0, 2 * np.pi, k)
    return Warp(amp, np.stack([np.cos(d), np.sin(d)], 1), freq, rng.uniform(0, 2 * np.pi, k))


def translation(rng: np.random.Generator, cfg: FlowGenConfig, width: int) -> np.ndarray:
    """A random translation ``[2]`` (px): long-tailed magnitude, uniform direction."""
    if cfg.long_tail:
        magnitude = cfg.max_motion * width * rng.random() ** 3
    else:
        magnitude = LEGACY_MOTION * width * rng.uniform(0.15, 1.0)
    angle = rng.uniform(-np.pi, np.pi)
    return magnitude * np.array([np.cos(angle), np.sin(angle)])


def layer_motion(rng: np.random.Generator, cfg: FlowGenConfig, centre: np.ndarray, width: int,
                 rot_std: float, zoom_std: float, base: np.ndarray | None = None) -> np.ndarray:
    """2x3 affine image 1 -> image 2 about ``centre``: a translation (plus ``base``, the camera's, with
    probability 1/2), rotation ~ N(0, rot_std) rad and zoom exp(N(0, zoom_std)), both clipped at 2.5 std."""
    shift = translation(rng, cfg, width)
    if base is not None and rng.random() < 0.5:
        shift = shift + base
    angle, zoom = 0.0, 1.0
    if cfg.rotation_zoom:
        angle = float(np.clip(rng.normal(0, rot_std), -2.5 * rot_std, 2.5 * rot_std))
        zoom = float(np.exp(np.clip(rng.normal(0, zoom_std), -2.5 * zoom_std, 2.5 * zoom_std)))
    return _affine(angle, zoom, centre, shift)
