"""Layered scenes with exact flow: a background plane and depth-ordered textured shapes, some non-rigid.

Like the legacy generator (:mod:`visiontrain.flow.synthetic`), every layer owns a texture in local
coordinates, a placement ``M1`` (local -> image 1) and a motion ``A`` (image 1 -> image 2), so
``M2 = A o M1``; both frames are rendered by backward mapping and the top-most layer wins (layer order is
depth order, so layers occlude each other). New here: a layer may carry a smooth warp ``d`` (see
:mod:`visiontrain.flow.synth.motion`); frame 1 then shows at pixel ``x`` the local point
``u' = u + d(u)``, ``u = M1^-1 x``, and frame 2 shows local point ``u'`` at ``M2 u'``. Hence the flow of
``x`` is ``M2_top(u'_top(x)) - x``, exact up to float64 rounding, for any warp, rotation or zoom.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from visiontrain.flow.synth.config import FlowGenConfig
from visiontrain.flow.synth.legacy import (
    SyntheticPair,
    _affine,
    _apply,
    _bounding_radius,
    _compose,
    _inside,
    _invert,
    bilinear_sample,
    make_texture,
)
from visiontrain.flow.synth.motion import Warp, layer_motion, random_warp
from visiontrain.flow.synth.textures import natural_texture

TextureFn = Callable[[np.random.Generator, int, int], np.ndarray]


@dataclass
class Layer:
    texture: np.ndarray  # [th, tw, 3] float32, texel (i, j) at local (j - tw/2, i - th/2)
    place1: np.ndarray  # [2, 3] local -> image 1
    motion: np.ndarray  # [2, 3] image 1 -> image 2
    shape: str  # "plane" | "blob" | "ellipse" | "rect" (see visiontrain.flow.synth.legacy._inside)
    params: np.ndarray  # shape parameters in local coordinates
    warp: Warp | None = None  # frame-1 warp of local coordinates


@dataclass
class LayeredScene:
    """Layers (index 0 = background, then back to front) renderable at any points of either frame."""

    layers: list[Layer]
    size: tuple[int, int]

    def place(self, layer: Layer, frame: int) -> np.ndarray:
        return layer.place1 if frame == 1 else _compose(layer.motion, layer.place1)

    def hits(self, layer: Layer, frame: int, x: np.ndarray, y: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Flat indices of points ``(x, y)`` of ``frame`` covered by ``layer``, and the local point each shows."""
        place = self.place(layer, frame)
        warp = layer.warp if frame == 1 else None
        xf, yf = x.ravel(), y.ravel()
        if layer.shape == "plane":
            cand = np.arange(xf.size)
        else:
            radius = _bounding_radius(layer) + (warp.reach if warp is not None else 0.0)
            reach = radius * np.linalg.norm(place[:, :2], 2) + 1.0
            cx, cy = place[:, 2]
            cand = np.flatnonzero((np.abs(xf - cx) <= reach) & (np.abs(yf - cy) <= reach))
        u, v = _apply(_invert(place), xf[cand], yf[cand])
        if warp is not None:
            du, dv = warp(u, v)
            u, v = u + du, v + dv
        if layer.shape == "plane":
            return cand, u, v
        inside = _inside(layer, u, v)
        return cand[inside], u[inside], v[inside]

    def render(self, frame: int, x: np.ndarray, y: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Colour ``[..., 3]``, top-most layer ``[...]`` and the local point it shows ``[..., 2]`` of
        ``frame`` at points ``(x, y)`` (any float coordinates)."""
        top = np.zeros(x.size, np.int32)
        color = np.zeros((x.size, 3), np.float32)
        local = np.zeros((x.size, 2), np.float64)
        for k, layer in enumerate(self.layers):
            idx, u, v = self.hits(layer, frame, x, y)
            th, tw = layer.texture.shape[:2]
            color[idx] = bilinear_sample(layer.texture, u + tw / 2, v + th / 2)
            top[idx] = k
            local[idx, 0], local[idx, 1] = u, v
        return color.reshape(*x.shape, 3), top.reshape(x.shape), local.reshape(*x.shape, 2)

    def top_layer(self, frame: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        top = np.zeros(x.size, np.int32)
        for k, layer in enumerate(self.layers):
            top[self.hits(layer, frame, x, y)[0]] = k
        return top.reshape(x.shape)

    def pair(self) -> SyntheticPair:
        """Both frames at pixel centres, the exact flow of image 1 and its visibility in image 2."""
        height, width = self.size
        y, x = np.mgrid[0:height, 0:width].astype(np.float64)
        image1, top1, local = self.render(1, x, y)
        image2, top2, _ = self.render(2, x, y)
        places2 = np.stack([self.place(layer, 2) for layer in self.layers])[top1]  # [H, W, 2, 3]
        u, v = local[..., 0], local[..., 1]
        x2 = places2[..., 0, 0] * u + places2[..., 0, 1] * v + places2[..., 0, 2]
        y2 = places2[..., 1, 0] * u + places2[..., 1, 1] * v + places2[..., 1, 2]
        flow = np.stack([x2 - x, y2 - y], axis=-1).astype(np.float32)
        in_frame = (x2 >= 0) & (x2 <= width - 1) & (y2 >= 0) & (y2 <= height - 1)
        visible = in_frame & (self.top_layer(2, x2, y2) == top1)
        return SyntheticPair(image1, image2, flow, top1, top2, visible)


def random_shape(rng: np.random.Generator, radius: float) -> tuple[str, np.ndarray]:
    """A blob (2/4), ellipse (1/4) or rectangle (1/4) of about ``radius`` px, in local coordinates."""
    kind = str(rng.choice(["blob", "blob", "ellipse", "rect"]))
    if kind == "blob":
        amps = rng.uniform(0, 0.18, 3)
        return kind, np.array([radius, amps[0], rng.uniform(0, 2 * np.pi), amps[1], rng.uniform(0, 2 * np.pi),
                               amps[2], rng.uniform(0, 2 * np.pi)])
    if kind == "ellipse":
        return kind, np.array([radius, radius * rng.uniform(0.4, 1.0)])
    return kind, np.array([radius * 0.85, radius * rng.uniform(0.3, 0.85)])


def random_layered_scene(rng: np.random.Generator, size: tuple[int, int], cfg: FlowGenConfig,
                         texture: TextureFn | None = None) -> LayeredScene:
    """A background plane with camera-like motion (rotation <= ~4 deg, zoom <= ~8 %) and
    ``[cfg.min_layers, cfg.max_layers]`` shapes (radius log-uniform in 6-35 % of the shorter side) that
    move on their own (rotation <= ~14 deg, zoom <= ~20 %), half of them also with the camera."""
    if texture is None:
        texture = natural_texture if cfg.textures == "natural" else make_texture
    height, width = size
    small = min(height, width)
    centre = np.array([(width - 1) / 2, (height - 1) / 2])
    margin = int(0.15 * max(height, width)) + 16
    bg_motion = layer_motion(rng, cfg, centre, width, rot_std=0.03, zoom_std=0.03)
    bg_warp = random_warp(rng, small) if cfg.nonrigid and rng.random() < 0.3 else None
    layers = [Layer(texture(rng, height + 2 * margin, width + 2 * margin),
                    np.array([[1.0, 0, centre[0]], [0, 1.0, centre[1]]]), bg_motion, "plane", np.zeros(0), bg_warp)]
    for _ in range(int(rng.integers(cfg.min_layers, cfg.max_layers + 1))):
        radius = float(np.exp(rng.uniform(np.log(0.06), np.log(0.35)))) * small
        shape, params = random_shape(rng, radius)
        pos = np.array([rng.uniform(-0.1, 1.1) * width, rng.uniform(-0.1, 1.1) * height])
        place1 = _affine(rng.uniform(-np.pi, np.pi), 1.0, np.zeros(2), pos)
        motion = layer_motion(rng, cfg, pos, width, rot_std=0.1, zoom_std=0.08, base=_shift(bg_motion, centre))
        warp = random_warp(rng, 2 * radius) if cfg.nonrigid and rng.random() < 0.5 else None
        tsize = int(2 * radius * 1.6) + 16
        layers.append(Layer(texture(rng, tsize, tsize), place1, motion, shape, params, warp))
    return LayeredScene(layers, (height, width))


def _shift(motion: np.ndarray, point: np.ndarray) -> np.ndarray:
    """Displacement of ``point`` under the 2x3 affine ``motion``."""
    return motion[:, :2] @ point + motion[:, 2] - point
