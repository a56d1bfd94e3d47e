"""The legacy synthetic optical-flow generator: pairs with exact ground truth.

This module holds the *legacy* generator (``gen.style=legacy``; colour-noise textures, translations up to
``max_translation`` px) and the scene primitives the layered generator of :mod:`visiontrain.flow.synth`
reuses; :mod:`visiontrain.flow.synthetic` writes either in the FlyingChairs layout.

A scene is a stack of layers: a textured background plane and several textured foreground shapes
(blobs, ellipses, rectangles). Each layer owns a texture in its own *local* coordinates and a placement
``M1`` (local -> image 1, 2x3 affine). Between the frames every layer moves by its own affine motion
``A`` (translation, rotation and scale about the shape centre), so its placement in image 2 is
``M2 = A o M1``. Both images are rendered by *backward* mapping: for every pixel ``x`` and every layer,
``u = M^-1 x`` is tested against the shape and the texture is sampled at ``u`` (bilinear on a fixed
texel grid, i.e. one continuous function per layer); the top-most layer containing ``x`` wins.

Ground truth: the flow of pixel ``x`` of image 1 is ``A_top(x) - x`` for the top-most layer at ``x``,
exact for every pixel (pixel centres at integer coordinates). ``visible`` marks pixels whose target
lies inside image 2 and is not covered there by another layer; on those pixels
``image2(x + flow(x)) == image1(x)`` holds up to the interpolation of image 2 between pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass
class SyntheticPair:
    image1: np.ndarray  # [H, W, 3] float32 in [0, 1]
    image2: np.ndarray  # [H, W, 3] float32 in [0, 1]
    flow: np.ndarray  # [H, W, 2] float32, image 1 -> image 2
    layer: np.ndarray  # [H, W] int32, top-most layer of image 1 (0 = background)
    layer2: np.ndarray  # [H, W] int32, top-most layer of image 2
    visible: np.ndarray  # [H, W] bool, pixel of image 1 still visible in image 2


@dataclass
class _Layer:
    texture: np.ndarray  # [th, tw, 3] float32, texel (i, j) at local (j - tw/2, i - th/2)
    place1: np.ndarray  # [2, 3] local -> image 1
    motion: np.ndarray  # [2, 3] image 1 -> image 2
    shape: str  # "plane" | "blob" | "ellipse" | "rect"
    params: np.ndarray  # shape parameters in local coordinates


# ------------------------------------------------------------------------------------- helpers
def _affine(angle: float, scale: float, center: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """2x3 affine ``x -> center + shift + scale * R(angle) (x - center)``."""
    c, s = np.cos(angle) * scale, np.sin(angle) * scale
    rot = np.array([[c, -s], [s, c]])
    return np.hstack([rot, (center + shift - rot @ center)[:, None]])


def _compose(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """2x3 affine ``a o b``."""
    return np.hstack([a[:, :2] @ b[:, :2], (a[:, :2] @ b[:, 2] + a[:, 2])[:, None]])


def _invert(a: np.ndarray) -> np.ndarray:
    inv = np.linalg.inv(a[:, :2])
    return np.hstack([inv, (-inv @ a[:, 2])[:, None]])


def _apply(a: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return a[0, 0] * x + a[0, 1] * y + a[0, 2], a[1, 0] * x + a[1, 1] * y + a[1, 2]


def _reflect(x: np.ndarray, n: int) -> np.ndarray:
    """Continuous mirror of coordinates into ``[0, n - 1]``."""
    period = 2.0 * (n - 1)
    m = np.mod(x, period)
    return np.where(m > n - 1, period - m, m)


def bilinear_sample(texture: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Sample ``texture [h, w, C]`` at float pixel coordinates ``x, y [...]`` -> ``[..., C]``
    (mirror outside, bilinear inside; a continuous function of ``(x, y)``)."""
    h, w = texture.shape[:2]
    x = _reflect(x, w)
    y = _reflect(y, h)
    x0 = np.minimum(np.floor(x).astype(np.int64), w - 2)
    y0 = np.minimum(np.floor(y).astype(np.int64), h - 2)
    fx = (x - x0)[..., None].astype(np.float32)
    fy = (y - y0)[..., None].astype(np.float32)
    top = texture[y0, x0] * (1 - fx) + texture[y0, x0 + 1] * fx
    bottom = texture[y0 + 1, x0] * (1 - fx) + texture[y0 + 1, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def make_texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A colourful multi-scale texture ``[height, width, 3]`` float32 in ``[0, 1]``: noise at cell sizes
    48, 24, 12, 6 and 3 px summed pyramid-style (upsample by 2, add the next octave), a random colour
    mixing, and a few anti-aliased strokes, slightly blurred."""
    cells = (48, 24, 12, 6, 3)
    gh, gw = -(-height // cells[0]) + 2, -(-width // cells[0]) + 2
    acc = rng.standard_normal((gh, gw, 3)).astype(np.float32)
    for _ in cells[1:]:
        gh, gw = gh * 2, gw * 2
        acc = cv2.resize(acc, (gw, gh), interpolation=cv2.INTER_CUBIC)
        acc += rng.standard_normal((gh, gw, 3)).astype(np.float32) * 0.8
    acc = cv2.resize(acc, (gw * 3, gh * 3), interpolation=cv2.INTER_CUBIC)[:height, :width]
    mix = rng.normal(0, 1, (3, 3)).astype(np.float32) + np.eye(3, dtype=np.float32) * 1.5
    acc = cv2.transform(acc, mix)
    mean, std = acc.mean(axis=(0, 1)), acc.std(axis=(0, 1)) + 1e-6
    tex = np.clip((acc - mean) / (4.4 * std) + 0.5, 0.0, 1.0) * 0.8 + 0.1
    tex8 = np.ascontiguousarray((tex * 255).astype(np.uint8))
    for _ in range(int(rng.integers(3, 9))):
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        p1 = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        if rng.random() < 0.5:
            p2 = (int(rng.integers(0, width)), int(rng.integers(0, height)))
            cv2.line(tex8, p1, p2, color, int(rng.integers(1, 5)), cv2.LINE_AA)
        else:
            cv2.circle(tex8, p1, int(rng.integers(3, 20)), color, -1 if rng.random() < 0.5 else 2, cv2.LINE_AA)
    return cv2.GaussianBlur(tex8.astype(np.float32) / 255.0, (0, 0), 0.7)


def _inside(layer: _Layer, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Membership of local coordinates ``(u, v)`` in the layer's shape."""
    if layer.shape == "plane":
        return np.ones(u.shape, bool)
    p = layer.params
    if layer.shape == "ellipse":
        return (u / p[0]) ** 2 + (v / p[1]) ** 2 <= 1.0
    if layer.shape == "rect":
        return (np.abs(u) <= p[0]) & (np.abs(v) <= p[1])
    # blob: radius r0 * (1 + sum_k a_k cos(k phi + phase_k)), k = 2..4
    phi = np.arctan2(v, u)
    radius = p[0] * (1 + p[1] * np.cos(2 * phi + p[2]) + p[3] * np.cos(3 * phi + p[4]) + p[5] * np.cos(4 * phi + p[6]))
    return u * u + v * v <= radius * radius


# ------------------------------------------------------------------------------------- scenes
def _random_layers(rng: np.random.Generator, height: int, width: int, max_translation: float,
                   num_shapes: tuple[int, int]) -> list[_Layer]:
    center = np.array([(width - 1) / 2, (height - 1) / 2])
    # background: a plane, mild motion (camera-like)
    margin = int(0.25 * max(height, width)) + 32
    bg = _Layer(
        texture=make_texture(rng, height + 2 * margin, width + 2 * margin),
        place1=np.array([[1.0, 0, center[0]], [0, 1.0, center[1]]]),
        motion=_affine(rng.uniform(-0.03, 0.03), np.exp(rng.uniform(-0.03, 0.03)), center,
                       rng.uniform(-0.4, 0.4, 2) * max_translation),
        shape="plane", params=np.zeros(0))
    layers = [bg]
    small = min(height, width)
    for _ in range(int(rng.integers(num_shapes[0], num_shapes[1] + 1))):
        r = rng.uniform(0.10, 0.28) * small
        kind = rng.choice(["blob", "blob", "ellipse", "rect"])
        if kind == "blob":
            amps = rng.uniform(0, 0.18, 3)
            params = np.array([r, amps[0], rng.uniform(0, 2 * np.pi), amps[1], rng.uniform(0, 2 * np.pi),
                               amps[2], rng.uniform(0, 2 * np.pi)])
        elif kind == "ellipse":
            params = np.array([r, r * rng.uniform(0.5, 1.0)])
        else:
            params = np.array([r * 0.85, r * rng.uniform(0.4, 0.85)])
        pos = np.array([rng.uniform(-0.05, 1.05) * width, rng.uniform(-0.05, 1.05) * height])
        place1 = _affine(rng.uniform(-np.pi, np.pi), 1.0, np.zeros(2), pos)
        step = rng.uniform(0.15, 1.0) * max_translation
        direction = rng.uniform(-np.pi, np.pi)
        motion = _affine(rng.uniform(-0.1, 0.1), np.exp(rng.uniform(-0.08, 0.08)), pos,
                         step * np.array([np.cos(direction), np.sin(direction)]))
        tsize = int(2 * r * 1.6) + 16
        layers.append(_Layer(make_texture(rng, tsize, tsize), place1, motion, str(kind), params))
    return layers


def _bounding_radius(layer: _Layer) -> float:
    p = layer.params
    if layer.shape == "blob":
        return float(p[0] * (1 + p[1] + p[3] + p[5]))
    if layer.shape == "ellipse":
        return float(max(p[0], p[1]))
    return float(np.hypot(p[0], p[1]))


def _hits(layer: _Layer, place: np.ndarray, x: np.ndarray, y: np.ndarray
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flat indices of the points ``(x, y)`` covered by ``layer`` placed by ``place``, with their local
    coordinates. Points outside the shape's bounding box are skipped before the exact test."""
    xf, yf = x.ravel(), y.ravel()
    inv = _invert(place)
    if layer.shape == "plane":
        u, v = _apply(inv, xf, yf)
        return np.arange(xf.size), u, v
    reach = _bounding_radius(layer) * np.linalg.norm(place[:, :2], 2) + 1.0
    cx, cy = place[:, 2]
    cand = np.flatnonzero((np.abs(xf - cx) <= reach) & (np.abs(yf - cy) <= reach))
    u, v = _apply(inv, xf[cand], yf[cand])
    inside = _inside(layer, u, v)
    return cand[inside], u[inside], v[inside]


@dataclass
class SyntheticScene:
    """A stack of layers (index 0 = background) that can be rendered at any points of either frame."""

    layers: list[_Layer]
    size: tuple[int, int]

    def places(self, frame: int) -> list[np.ndarray]:
        """Each layer's local -> image placement in ``frame`` 1 or 2."""
        if frame == 1:
            return [layer.place1 for layer in self.layers]
        return [_compose(layer.motion, layer.place1) for layer in self.layers]

    def render(self, frame: int, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Colour ``[..., 3]`` and top-most layer index ``[...]`` of ``frame`` at points ``(x, y)``
        (any float coordinates, not only pixel centres)."""
        top = np.zeros(x.size, np.int32)
        color = np.zeros((x.size, 3), np.float32)
        for k, (layer, place) in enumerate(zip(self.layers, self.places(frame))):
            idx, u, v = _hits(layer, place, x, y)
            th, tw = layer.texture.shape[:2]
            color[idx] = bilinear_sample(layer.texture, u + tw / 2, v + th / 2)
            top[idx] = k
        return color.reshape(*x.shape, 3), top.reshape(x.shape)

    def top_layer(self, frame: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        top = np.zeros(x.size, np.int32)
        for k, (layer, place) in enumerate(zip(self.layers, self.places(frame))):
            top[_hits(layer, place, x, y)[0]] = k
        return top.reshape(x.shape)

    def pair(self) -> SyntheticPair:
        """Both frames at pixel centres, the exact flow of image 1 and its visibility in image 2."""
        height, width = self.size
        y, x = np.mgrid[0:height, 0:width].astype(np.float64)
        image1, top1 = self.render(1, x, y)
        image2, top2 = self.render(2, x, y)
        motions = np.stack([layer.motion for layer in self.layers])[top1]  # [H, W, 2, 3]
        x2 = motions[..., 0, 0] * x + motions[..., 0, 1] * y + motions[..., 0, 2]
        y2 = motions[..., 1, 0] * x + motions[..., 1, 1] * y + motions[..., 1, 2]
        flow = np.stack([x2 - x, y2 - y], axis=-1).astype(np.float32)
        in_frame = (x2 >= 0) & (x2 <= width - 1) & (y2 >= 0) & (y2 <= height - 1)
        visible = in_frame & (self.top_layer(2, x2, y2) == top1)
        return SyntheticPair(image1, image2, flow, top1, top2, visible)


def random_scene(rng: np.random.Generator, size: tuple[int, int] = (256, 320), max_translation: float = 14.0,
                 num_shapes: tuple[int, int] = (3, 6)) -> SyntheticScene:
    """A random scene: a background plane and ``num_shapes`` textured shapes with their motions.

    ``max_translation`` bounds the shapes' translation (px); rotation (<= ~6 deg) and scale (<= 8 %) add
    a few pixels more at shape rims, the background moves by at most 0.4 of it."""
    height, width = size
    return SyntheticScene(_random_layers(rng, height, width, max_translation, num_shapes), (height, width))


def render_pair(rng: np.random.Generator, size: tuple[int, int] = (256, 320), max_translation: float = 14.0,
                num_shapes: tuple[int, int] = (3, 6)) -> SyntheticPair:
    """One random scene rendered at ``size = (H, W)`` in both frames, with exact flow."""
    return random_scene(rng, size, max_translation, num_shapes).pair()


def pair_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of pair ``index`` (1-based) of a set made with ``seed``: independent of the set size."""
    return np.random.default_rng([seed & 0xFFFFFFFF, index, 0x5F10])
