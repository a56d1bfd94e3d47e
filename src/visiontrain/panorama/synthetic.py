"""Synthetic equirectangular panoramas: textured box rooms and outdoor scenes, ray-cast per pixel.

Each panorama is rendered exactly: every equirectangular pixel's ray (conventions of
:mod:`visiontrain.panorama.camera`) is intersected with the scene in NumPy, all pixels at once, so the
images are geometrically consistent (straight edges curve as they should, the floor meets every wall).
Scene parameters are drawn from ``numpy.random.default_rng([seed, split, index])``: the same seed writes
the same files.

* **Room**: a box around the camera (random size and camera position) with walls in related colours
  (one palette per room), wallpaper stripes, a skirting board, doors, windows and pictures, a plank or tile
  floor, a light ceiling tinted by the wall colour with a lamp, and distance shading. What the four views
  miss (ceiling, floor under the camera, corners between views) follows from what they see.
* **Outdoor**: a sky gradient with a sun, a ground plane (grass, sand or asphalt) with a grid texture
  fading into haze, and a ring of building facades with window grids.
"""

from __future__ import annotations

import colorsys
import math
from pathlib import Path
from typing import Any

import cv2
import numpy as np

_SPLITS = {"train": 0, "val": 1}
SYNTH_VERSION = 1  # part of the cache identity: bump when the scenes change


def _rays(height: int) -> np.ndarray:
    """World rays ``[H, 2H, 3]`` (float64) of the equirectangular pixel centres (camera.py conventions)."""
    w = 2 * height
    lon = (np.arange(w) + 0.5) / w * 2 * math.pi - math.pi
    lat = math.pi / 2 - (np.arange(height) + 0.5) / height * math.pi
    lon, lat = np.meshgrid(lon, lat)
    return np.stack((np.cos(lat) * np.sin(lon), -np.sin(lat), np.cos(lat) * np.cos(lon)), axis=-1)


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, float(np.clip(s, 0, 1)), float(np.clip(v, 0, 1))))


def _rect(a: np.ndarray, b: np.ndarray, a0: float, a1: float, b0: float, b1: float) -> np.ndarray:
    return (a >= a0) & (a <= a1) & (b >= b0) & (b <= b1)


def render_room(rng: np.random.Generator, height: int) -> np.ndarray:
    """A box room around the camera → float RGB ``[H, 2H, 3]`` in [0, 1]."""
    d = _rays(height)
    dx, dy, dz = d[..., 0], d[..., 1], d[..., 2]
    x_lo, x_hi = -rng.uniform(1.5, 4.0), rng.uniform(1.5, 4.0)
    z_lo, z_hi = -rng.uniform(1.5, 4.0), rng.uniform(1.5, 4.0)
    cam_h = rng.uniform(1.2, 1.7)
    room_h = rng.uniform(2.4, 3.2)
    y_floor, y_ceil = cam_h, cam_h - room_h  # +Y is down
    with np.errstate(divide="ignore", invalid="ignore"):
        tx = np.where(dx > 0, x_hi / dx, np.where(dx < 0, x_lo / dx, np.inf))
        tz = np.where(dz > 0, z_hi / dz, np.where(dz < 0, z_lo / dz, np.inf))
        ty = np.where(dy > 0, y_floor / dy, np.where(dy < 0, y_ceil / dy, np.inf))
    t_all = np.stack((tx, ty, tz), axis=-1)
    axis = np.argmin(t_all, axis=-1)
    t = np.min(t_all, axis=-1)
    p = d * t[..., None]
    px, py, pz = p[..., 0], p[..., 1], p[..., 2]
    img = np.zeros(d.shape)

    hue = rng.uniform()
    sat = rng.uniform(0.15, 0.7)
    val = rng.uniform(0.45, 0.9)
    # walls: +X, -X, +Z, -Z; (horizontal coordinate along the wall, wall width)
    walls = [
        ((axis == 0) & (dx > 0), pz, (z_lo, z_hi)),
        ((axis == 0) & (dx < 0), -pz, (-z_hi, -z_lo)),
        ((axis == 2) & (dz > 0), -px, (-x_hi, -x_lo)),
        ((axis == 2) & (dz < 0), px, (x_lo, x_hi)),
    ]
    up = y_floor - py  # height above the floor
    door_wall = rng.integers(4)
    for k, (mask, s, (s_lo, s_hi)) in enumerate(walls):
        base = _hsv(hue + rng.normal(0, 0.04), sat * rng.uniform(0.7, 1.2), val * rng.uniform(0.85, 1.1))
        col = np.broadcast_to(base, d.shape).copy()
        if rng.uniform() < 0.5:  # wallpaper stripes
            period = rng.uniform(0.15, 0.5)
            stripe = (np.floor(s / period) % 2)[..., None]
            col = col * (1 - 0.12 * stripe)
        skirting = up < rng.uniform(0.08, 0.15)
        col[skirting] = _hsv(hue + 0.5, 0.2, rng.uniform(0.2, 0.95))
        width = s_hi - s_lo
        if k == door_wall and width > 1.2:
            c = rng.uniform(s_lo + 0.6, s_hi - 0.6)
            door = _rect(s, up, c - 0.45, c + 0.45, 0, 2.05)
            col[door] = _hsv(rng.uniform(0.05, 0.12), rng.uniform(0.3, 0.7), rng.uniform(0.25, 0.6))
        elif rng.uniform() < 0.6 and width > 1.0:  # window
            c = rng.uniform(s_lo + 0.5, s_hi - 0.5)
            half = min(rng.uniform(0.3, 0.8), (width / 2) - 0.1)
            window = _rect(s, up, c - half, c + half, 0.9, min(2.2, room_h - 0.2))
            sky = _hsv(rng.uniform(0.55, 0.62), 0.35, 0.95)
            col[window] = sky * (0.9 + 0.1 * (up[window, None] - 0.9))
            frame = window & ((np.abs(s - c) < 0.03) | (np.abs(up - 1.5) < 0.03))
            col[frame] = 0.95
        if rng.uniform() < 0.5:  # a picture
            c = rng.uniform(s_lo + 0.4, s_hi - 0.4)
            pic = _rect(s, up, c - 0.3, c + 0.3, 1.3, 1.8)
            col[pic] = _hsv(rng.uniform(), rng.uniform(0.4, 0.9), rng.uniform(0.3, 0.9))
        img[mask] = col[mask]

    floor = (axis == 1) & (dy > 0)
    f_hue = rng.uniform(0.05, 0.12) if rng.uniform() < 0.6 else rng.uniform()
    f_col = _hsv(f_hue, rng.uniform(0.2, 0.6), rng.uniform(0.3, 0.7))
    if rng.uniform() < 0.5:  # planks
        plank = rng.uniform(0.12, 0.25)
        idx = np.floor(px / plank)
        shade = 0.85 + 0.3 * ((idx * 0.6180339) % 1.0)
        fcol = f_col * shade[..., None]
    else:  # tiles
        tile = rng.uniform(0.3, 0.7)
        check = ((np.floor(px / tile) + np.floor(pz / tile)) % 2)[..., None]
        fcol = f_col * (1 - 0.35 * check)
    img[floor] = fcol[floor]

    ceil = (axis == 1) & (dy < 0)
    c_col = 0.75 * np.ones(3) + 0.25 * _hsv(hue, sat * 0.5, 1.0)
    ccol = np.broadcast_to(c_col * rng.uniform(0.85, 1.0), d.shape).copy()
    lamp = (px - rng.uniform(-0.5, 0.5)) ** 2 + (pz - rng.uniform(-0.5, 0.5)) ** 2 < rng.uniform(0.05, 0.1)
    ccol[lamp] = 1.0
    img[ceil] = ccol[ceil]

    shade = 1.0 / (1.0 + 0.015 * t * t)
    face = np.where(axis == 1, np.where(dy > 0, 0.9, 1.0), np.where(axis == 0, 0.92, 0.85))
    return np.clip(img * (shade * face)[..., None] * rng.uniform(0.85, 1.1), 0, 1)


def render_outdoor(rng: np.random.Generator, height: int) -> np.ndarray:
    """Sky, sun, ground plane and a ring of buildings → float RGB ``[H, 2H, 3]`` in [0, 1]."""
    d = _rays(height)
    dx, dy, dz = d[..., 0], d[..., 1], d[..., 2]
    elev = np.arcsin(np.clip(-dy, -1, 1))
    azim = np.arctan2(dx, dz)
    horiz = np.sqrt(dx * dx + dz * dz)

    zenith = _hsv(rng.uniform(0.55, 0.66), rng.uniform(0.5, 0.9), rng.uniform(0.5, 0.95))
    horizon = _hsv(rng.uniform(0.0, 0.65), rng.uniform(0.05, 0.4), rng.uniform(0.8, 1.0))
    a = np.clip(elev / (math.pi / 2), 0, 1)[..., None] ** 0.6
    img = horizon * (1 - a) + zenith * a
    sun_az, sun_el = rng.uniform(-math.pi, math.pi), rng.uniform(0.15, 1.2)
    sun = lonlat_dir(sun_az, sun_el)
    cosang = d @ sun
    img = img + (np.clip((cosang - 0.97) / 0.03, 0, 1) ** 2)[..., None] * 0.8

    cam_h = rng.uniform(1.5, 3.0)
    ground = dy > 0
    with np.errstate(divide="ignore"):
        tg = np.where(ground, cam_h / np.where(ground, dy, 1), np.inf)
    gx, gz = np.where(ground, dx * tg, 0.0), np.where(ground, dz * tg, 0.0)
    g_col = [_hsv(rng.uniform(0.22, 0.33), 0.6, 0.45), _hsv(0.11, 0.35, 0.7), _hsv(0.0, 0.0, 0.35)][rng.integers(3)]
    cell = rng.uniform(1.0, 3.0)
    check = ((np.floor(gx / cell) + np.floor(gz / cell)) % 2)[..., None]
    ground_img = g_col * (1 - 0.2 * check)
    haze = np.clip(tg / 60.0, 0, 1)[..., None]
    ground_img = ground_img * (1 - haze) + horizon * haze
    img = np.where(ground[..., None], ground_img, img)

    # ring of buildings: azimuth segments, each a facade at distance r with height bh
    n = int(rng.integers(4, 12))
    edges = np.sort(rng.uniform(-math.pi, math.pi, n))
    seg = np.searchsorted(edges, azim) % n
    dist = rng.uniform(8, 30, n)
    b_h = rng.uniform(3, 25, n)
    present = rng.uniform(size=n) < 0.75
    b_hue = rng.uniform(0, 1)
    colors = np.stack([_hsv(b_hue + rng.normal(0, 0.08), rng.uniform(0.05, 0.4), rng.uniform(0.35, 0.85))
                       for _ in range(n)])
    r = dist[seg]
    t_wall = r / np.maximum(horiz, 1e-9)
    hit_h = cam_h - dy * t_wall  # height of the hit above the ground
    hit = present[seg] & (t_wall < tg) & (hit_h <= b_h[seg]) & (hit_h >= 0)
    s = azim * r
    win = (((s % 2.0) > 0.6) & ((hit_h % 3.0) > 1.0) & ((hit_h % 3.0) < 2.2))[..., None]
    facade = colors[seg] * (1 - 0.45 * win) * (0.8 + 0.2 * np.cos(azim - sun_az))[..., None]
    f_haze = np.clip(t_wall / 80.0, 0, 1)[..., None]
    facade = facade * (1 - f_haze) + horizon * f_haze
    img = np.where(hit[..., None], facade, img)
    return np.clip(img, 0, 1)


def lonlat_dir(lon: float, lat: float) -> np.ndarray:
    return np.array([math.cos(lat) * math.sin(lon), -math.sin(lat), math.cos(lat) * math.cos(lon)])


def render_scene(rng: np.random.Generator, height: int, room_fraction: float = 0.6) -> np.ndarray:
    """A room (probability ``room_fraction``) or an outdoor scene → uint8 RGB ``[H, 2H, 3]``."""
    img = render_room(rng, height) if rng.uniform() < room_fraction else render_outdoor(rng, height)
    return np.round(img * 255).astype(np.uint8)


def write_synthetic_panoramas(out: str | Path, train: int, val: int, size: int = 128, seed: int = 0,
                              quality: int = 95) -> dict[str, list[Path]]:
    """Write ``out/train/NNNNN.jpg`` and ``out/val/NNNNN.jpg`` equirectangular JPEGs of ``size × 2·size``.

    Deterministic: the same ``seed`` writes the same pixels. Returns the paths per split.
    """
    if size < 8 or size % 2:
        raise ValueError(f"size={size}: use an even panorama height of at least 8 pixels")
    if train < 0 or val < 0:
        raise ValueError(f"train={train}, val={val}: counts must be non-negative")
    out = Path(out)
    written: dict[str, list[Path]] = {}
    for split, count in (("train", train), ("val", val)):
        folder = out / split
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for i in range(count):
            rng = np.random.default_rng([seed & 0xFFFFFFFF, _SPLITS[split], i])
            rgb = render_scene(rng, size)
            path = folder / f"{i:05d}.jpg"
            if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality]):
                raise OSError(f"{path}: could not write the JPEG (is the folder writable?)")
            paths.append(path)
        written[split] = paths
    return written


def ensure_synthetic(cfg: Any) -> Path:
    """The synthetic panoramas ``cfg.synth_*`` describe (``synth_dir``, or a folder of the cache named by the
    settings), written once (see :mod:`visiontrain.synthcache`). Returns the folder (``train/``, ``val/``)."""
    from visiontrain.synthcache import cache_root, synthesize_once

    params = {"kind": "panorama", "version": SYNTH_VERSION, "train": cfg.synth_train, "val": cfg.synth_val,
              "size": cfg.synth_size, "seed": cfg.synth_seed}
    root = Path(cfg.synth_dir) if cfg.synth_dir else cache_root() / (
        f"panorama-synth-{cfg.synth_train}-{cfg.synth_val}-{cfg.synth_size}-{cfg.synth_seed}")
    return synthesize_once(root, params, lambda tmp: write_synthetic_panoramas(
        tmp, cfg.synth_train, cfg.synth_val, cfg.synth_size, cfg.synth_seed),
        what=f"synthetic panoramas ({cfg.synth_train} train, {cfg.synth_val} val)")
