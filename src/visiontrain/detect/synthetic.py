"""A synthetic stand-in for MAR20 (military aircraft recognition, 20 classes ``A1``…``A20``).

:func:`write_synthetic_mar20` writes the real MAR20 layout::

    out_dir/JPEGImages/<id>.jpg
    out_dir/Annotations/Horizontal Bounding Boxes/<id>.xml     (Pascal VOC XML)
    out_dir/Annotations/Oriented Bounding Boxes/<id>.xml       (MAR20's <robndbox> four corners)
    out_dir/ImageSets/Main/train.txt, test.txt                 (one id per line)

Each image is textured ground (low-frequency noise, concrete slabs, painted lines, stains, a few
light rectangles as distractors) with 2-6 top-down aircraft silhouettes, rotated and scaled, that
never overlap. The 20 designs differ in wing sweep, span, fuselage length and width, engine count and
placement, and tail layout (see :data:`AIRCRAFT`), so a small detector learns them in minutes.

Boxes are the tight bounds of the drawn pixels in continuous pixel coordinates: an object whose
pixels fill columns ``c0..c1`` gets ``xmin = c0``, ``xmax = c1 + 1``. Oriented boxes come from the
silhouette's pose, not from pixels: the rectangle, in the aircraft's own frame, around its polygons' vertices,
turned by its heading and placed at its position, half a pixel larger on each side (the pixel-area
convention of the horizontal boxes; corners in the same continuous coordinates). Everything is deterministic:
image ``k`` depends only on ``(seed, k)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from xml.sax.saxutils import escape

import cv2
import numpy as np

if TYPE_CHECKING:
    from visiontrain.detect.config import SyntheticSet

MAR20_NAMES: tuple[str, ...] = tuple(f"A{i}" for i in range(1, 21))


@dataclass(frozen=True)
class AircraftDesign:
    """A top-down aircraft in a unit frame: nose at y = -0.5, tail at y = +0.5 (length 1).

    All lengths are fractions of the fuselage length. ``size`` scales the whole aircraft relative to
    the others (a bomber is drawn bigger than a fighter)."""

    size: float
    fus_width: float
    span: float  # wing tip to wing tip
    sweep: float  # leading-edge sweep in degrees (negative = forward swept)
    root_chord: float
    tip_chord: float
    wing_y: float  # y of the wing root leading edge
    tail_span: float = 0.35  # horizontal tail tip to tip (0 = none)
    tail_sweep: float = 30.0
    engines: int = 0  # pods under the wings: 0, 2 or 4
    engine_at: tuple[float, ...] = ()  # spanwise position of each pod pair (fraction of half span)
    rear_engines: int = 0  # pods on the rear fuselage: 0, 2 or 3 (3 = one on the tail)
    delta: bool = False  # triangular wing from wing_y to the tail, no separate tail plane
    canard: float = 0.0  # canard span (0 = none)
    twin_boom: bool = False
    tip_tanks: bool = False
    sawtooth: bool = False  # flying wing: no fuselage tail, zig-zag trailing edge


# Twenty designs that differ in silhouette, not only in size.
AIRCRAFT: tuple[AircraftDesign, ...] = (
    AircraftDesign(1.00, 0.10, 0.95, 30, 0.22, 0.07, -0.08, engines=2, engine_at=(0.35,)),  # A1 twin airliner
    AircraftDesign(
        1.15, 0.11, 1.00, 36, 0.24, 0.07, -0.10, engines=4, engine_at=(0.33, 0.62)
    ),  # A2 quad airliner
    AircraftDesign(
        1.00, 0.08, 0.78, 25, 0.18, 0.06, -0.05, tail_span=0.30, rear_engines=2
    ),  # A3 rear-engine jet
    AircraftDesign(0.85, 0.09, 1.30, 0, 0.14, 0.09, -0.18, engines=2, engine_at=(0.32,)),  # A4 twin turboprop
    AircraftDesign(
        1.05, 0.13, 1.25, 3, 0.16, 0.10, -0.15, tail_span=0.45, engines=4, engine_at=(0.28, 0.55)
    ),  # A5
    AircraftDesign(
        0.70, 0.10, 0.62, 55, 0.60, 0.02, -0.15, tail_span=0, delta=True, canard=0.30
    ),  # A6 canard delta
    AircraftDesign(
        0.70, 0.11, 0.62, 40, 0.26, 0.08, -0.02, tail_span=0.42, tail_sweep=40
    ),  # A7 swept fighter
    AircraftDesign(0.65, 0.07, 0.55, 60, 0.68, 0.02, -0.22, tail_span=0, delta=True),  # A8 slim delta
    AircraftDesign(1.25, 0.06, 1.40, 35, 0.16, 0.05, -0.08, engines=4, engine_at=(0.25, 0.55)),  # A9 bomber
    AircraftDesign(1.00, 0.10, 2.10, 33, 0.70, 0.12, -0.50, tail_span=0, sawtooth=True),  # A10 flying wing
    AircraftDesign(
        0.70, 0.09, 0.75, -25, 0.20, 0.10, 0.05, tail_span=0.35, tail_sweep=20, canard=0.30
    ),  # A11
    AircraftDesign(
        0.55, 0.09, 1.10, 0, 0.18, 0.12, -0.14, tail_span=0.50, tail_sweep=5
    ),  # A12 straight trainer
    AircraftDesign(0.80, 0.12, 1.20, 0, 0.16, 0.12, -0.15, tail_span=0.55, twin_boom=True),  # A13 twin boom
    AircraftDesign(0.95, 0.07, 0.50, 62, 0.30, 0.05, -0.10, tail_span=0.30, tail_sweep=50),  # A14 high sweep
    AircraftDesign(
        1.10, 0.16, 1.05, 18, 0.17, 0.08, -0.12, tail_span=0.50, engines=4, engine_at=(0.2, 0.42)
    ),  # A15
    AircraftDesign(
        0.75, 0.09, 0.80, 30, 0.24, 0.10, 0.15, tail_span=0, canard=0.40, rear_engines=2
    ),  # A16 pusher
    AircraftDesign(
        0.60, 0.09, 0.95, 5, 0.15, 0.10, -0.05, tail_span=0.40, rear_engines=2, tip_tanks=True
    ),  # A17
    AircraftDesign(
        1.10, 0.07, 0.68, 45, 0.20, 0.06, -0.12, tail_span=0.28, engines=2, engine_at=(0.22,)
    ),  # A18
    AircraftDesign(0.65, 0.08, 0.55, 57, 0.42, 0.02, -0.05, tail_span=0.30, tail_sweep=45, delta=True),  # A19
    AircraftDesign(
        1.05, 0.11, 1.05, 30, 0.21, 0.07, -0.10, tail_span=0.40, engines=2, engine_at=(0.38,), rear_engines=3
    ),  # A20 trijet
)


def _extent_factors() -> np.ndarray:
    """Per-class factor in [0.75, 1] on the drawn size: big aircraft stay bigger than fighters."""
    rel = np.array([d.size * max(1.0, d.span) for d in AIRCRAFT])
    return 0.75 + 0.25 * (rel - rel.min()) / (rel.max() - rel.min())


_EXTENT_FACTOR = _extent_factors()


def _quad(x0: float, y0: float, x1: float, y1: float, half_w: float) -> np.ndarray:
    """A rectangle of half width ``half_w`` around the segment (x0, y0)-(x1, y1)."""
    d = np.array([x1 - x0, y1 - y0], dtype=np.float64)
    n = np.array([-d[1], d[0]]) / (np.linalg.norm(d) + 1e-12) * half_w
    return np.array([[x0, y0] + n, [x1, y1] + n, [x1, y1] - n, [x0, y0] - n])


def _ellipse(cx: float, cy: float, rx: float, ry: float, n: int = 16) -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], 1)


def _wing(
    d: AircraftDesign,
    half_span: float,
    root_y: float,
    sweep: float,
    root: float,
    tip: float,
    sawtooth: bool = False,
) -> list[np.ndarray]:
    """Left and right wing polygons (mirror images) starting at the fuselage side."""
    x_in = d.fus_width / 2
    tip_le = root_y + math.tan(math.radians(sweep)) * (half_span - x_in)
    pts = [[x_in, root_y], [half_span, tip_le], [half_span, tip_le + tip]]
    if sawtooth:  # zig-zag trailing edge back to the root
        pts += [[half_span * 0.62, root_y + root * 0.62], [half_span * 0.38, root_y + root * 0.82]]
    pts += [[x_in, root_y + root]]
    right = np.array(pts, dtype=np.float64)
    left = right * [-1, 1]
    return [right, left]


def aircraft_polygons(d: AircraftDesign) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``(body, engines)`` polygons of one design in the unit frame (each ``[k, 2]``)."""
    body: list[np.ndarray] = []
    engines: list[np.ndarray] = []
    w = d.fus_width / 2
    if d.sawtooth:  # flying wing: a short centre body only
        body.append(np.array([[0, -0.5], [w, -0.35], [w, 0.15], [-w, 0.15], [-w, -0.35]]))
    else:
        body.append(
            np.array(
                [
                    [0, -0.5],
                    [w * 0.7, -0.42],
                    [w, -0.3],
                    [w, 0.3],
                    [w * 0.5, 0.5],
                    [-w * 0.5, 0.5],
                    [-w, 0.3],
                    [-w, -0.3],
                    [-w * 0.7, -0.42],
                ]
            )
        )
    half = d.span / 2
    if d.delta:
        root = 0.5 - d.wing_y - 0.02
        body += _wing(d, half, d.wing_y, d.sweep, root, d.tip_chord)
    else:
        body += _wing(d, half, d.wing_y, d.sweep, d.root_chord, d.tip_chord, d.sawtooth)
    if d.tail_span > 0:
        ts = d.tail_span / 2
        tail_y = 0.5 - 0.16
        if d.twin_boom:  # booms from the wing to a tail plane joining them
            bx = half * 0.35
            for s in (-1, 1):
                body.append(_quad(s * bx, d.wing_y - 0.1, s * bx, 0.5, 0.025))
            body.append(np.array([[-bx, 0.40], [bx, 0.40], [bx, 0.5], [-bx, 0.5]]))
        else:
            body += _wing(d, ts, tail_y, d.tail_sweep, 0.13, 0.06)
    if d.canard > 0:
        body += _wing(d, d.canard / 2, -0.32, 35, 0.08, 0.03)
    if d.tip_tanks:
        for s in (-1, 1):
            body.append(_ellipse(s * half, d.wing_y + 0.06, 0.03, 0.12))
    tan = math.tan(math.radians(d.sweep))
    for frac in d.engine_at[: d.engines // 2]:
        x = frac * half
        le = d.wing_y + tan * (x - d.fus_width / 2)
        for s in (-1, 1):
            engines.append(_ellipse(s * x, le - 0.02, 0.035, 0.08))
    if d.rear_engines:
        for s in (-1, 1):
            engines.append(_ellipse(s * (w + 0.04), 0.26, 0.04, 0.09))
        if d.rear_engines == 3:
            engines.append(_ellipse(0, 0.40, 0.035, 0.08))
    return body, engines


def _ground(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Textured ground ``[h, w, 3]`` uint8 (BGR): noise, concrete slabs, painted lines, stains."""
    palettes = [(95, 100, 105), (70, 95, 85), (110, 125, 140), (60, 70, 80), (120, 120, 115)]
    base = np.array(palettes[rng.integers(len(palettes))], np.float32) + rng.normal(0, 10, 3)
    g = int(rng.integers(3, 9))
    low = cv2.resize(rng.normal(0, 18, (g, g)).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    img = base[None, None, :] + low[..., None] + rng.normal(0, 6, (h, w, 1)).astype(np.float32)
    if rng.random() < 0.7:  # concrete slab joints
        step = int(rng.integers(24, 64))
        off = rng.integers(0, step, 2)
        dark = float(rng.uniform(10, 25))
        img[(np.arange(h) + off[0]) % step == 0] -= dark
        img[:, (np.arange(w) + off[1]) % step == 0] -= dark
    for _ in range(int(rng.integers(0, 4))):  # stains
        c = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        axes = (int(rng.integers(5, w // 5 + 6)), int(rng.integers(5, h // 5 + 6)))
        overlay = img.copy()
        cv2.ellipse(overlay, c, axes, float(rng.uniform(0, 180)), 0, 360, (base * 0.7).tolist(), -1)
        img = cv2.addWeighted(overlay, 0.5, img, 0.5, 0)
    for _ in range(int(rng.integers(0, 4))):  # painted taxi lines (yellow or white)
        color = (40, 200, 220) if rng.random() < 0.6 else (225, 225, 225)
        p0 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        ang = rng.uniform(0, math.pi)
        p1 = (int(p0[0] + math.cos(ang) * 2 * w), int(p0[1] + math.sin(ang) * 2 * h))
        p2 = (int(p0[0] - math.cos(ang) * 2 * w), int(p0[1] - math.sin(ang) * 2 * h))
        cv2.line(img, p1, p2, color, int(rng.integers(1, 3)))
    for _ in range(int(rng.integers(0, 4))):  # light rectangles: vehicles, small buildings
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        rw, rh = rng.uniform(0.01, 0.05) * w, rng.uniform(0.01, 0.05) * h
        box = cv2.boxPoints(((cx, cy), (rw, rh), float(rng.uniform(0, 90))))
        cv2.fillPoly(img, [np.round(box).astype(np.int32)], [float(v) for v in rng.uniform(150, 230, 3)])
    return np.clip(img, 0, 255).astype(np.uint8)


def oriented_box(body: list[np.ndarray], engines: list[np.ndarray], length: float, angle: float, cx: float,
                 cy: float) -> np.ndarray:
    """Corners ``[4, 2]`` (continuous pixels) of the oriented box of an aircraft drawn at this pose: the
    unit-frame rectangle around all its vertices, scaled by ``length``, turned by ``angle``, moved to
    ``(cx, cy)`` (a drawn vertex ``v`` is the pixel centre ``v + 0.5``), half a pixel larger on every side."""
    pts = np.concatenate(body + engines)
    (x0, y0), (x1, y1) = pts.min(0) * length - 0.5, pts.max(0) * length + 0.5
    rect = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    return rect @ rot.T + [cx + 0.5, cy + 0.5]


def render_image(
    rng: np.random.Generator, imgsz: int, objects: tuple[int, int], oriented: list[np.ndarray] | None = None
) -> tuple[np.ndarray, list[tuple[int, int, int, int, int]]]:
    """One image ``[imgsz, imgsz, 3]`` uint8 BGR and its objects ``(class, xmin, ymin, xmax, ymax)``; with a list
    ``oriented``, each object's oriented box corners ``[4, 2]`` are appended to it (same order)."""
    img = _ground(rng, imgsz, imgsz)
    n_target = int(rng.integers(objects[0], objects[1] + 1))
    placed: list[tuple[float, float, float]] = []  # (cx, cy, radius)
    labels: list[tuple[int, int, int, int, int]] = []
    for _ in range(n_target * 20):
        if len(labels) == n_target:
            break
        cls = int(rng.integers(len(AIRCRAFT)))
        design = AIRCRAFT[cls]
        extent = _EXTENT_FACTOR[cls] * rng.uniform(0.13, 0.28) * imgsz  # largest side, ~30-90 px at 320
        length = extent / max(1.0, design.span)
        body, engines = aircraft_polygons(design)
        radius = 0.5 * length * math.hypot(max(1.0, design.span), 1.0) + 2
        if 2 * radius >= imgsz:
            continue
        cx, cy = rng.uniform(radius, imgsz - radius, 2)
        if any(math.hypot(cx - px, cy - py) < radius + pr for px, py, pr in placed):
            continue
        ang = rng.uniform(0, 2 * math.pi)
        rot = np.array([[math.cos(ang), -math.sin(ang)], [math.sin(ang), math.cos(ang)]]) * length
        to_img = [np.round(p @ rot.T + [cx, cy]).astype(np.int32) for p in body]
        eng_img = [np.round(p @ rot.T + [cx, cy]).astype(np.int32) for p in engines]
        allpts = np.concatenate(to_img + eng_img)
        x0, y0 = allpts.min(0)
        x1, y1 = allpts.max(0) + 1
        mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
        cv2.fillPoly(mask, [p - [x0, y0] for p in to_img], 1)
        if eng_img:
            cv2.fillPoly(mask, [p - [x0, y0] for p in eng_img], 2)
        ys, xs = np.nonzero(mask)
        if len(xs) == 0:
            continue
        tone = rng.uniform(185, 245)
        body_color = np.clip(tone + rng.normal(0, 6, 3), 0, 255)
        roi = img[y0:y1, x0:x1]
        roi[mask == 1] = body_color.astype(np.uint8)
        roi[mask == 2] = (body_color * rng.uniform(0.35, 0.55)).astype(np.uint8)
        placed.append((cx, cy, radius))
        if oriented is not None:
            oriented.append(oriented_box(body, engines, length, ang, cx, cy))
        labels.append(
            (cls, int(x0 + xs.min()), int(y0 + ys.min()), int(x0 + xs.max() + 1), int(y0 + ys.max() + 1))
        )
    return img, labels


def voc_xml(
    filename: str,
    width: int,
    height: int,
    labels: list[tuple[int, int, int, int, int]],
    names: tuple[str, ...] = MAR20_NAMES,
) -> str:
    """A Pascal VOC annotation as MAR20 writes it."""
    objs = "".join(
        f"  <object>\n    <name>{escape(names[c])}</name>\n    <pose>Unspecified</pose>\n"
        f"    <truncated>0</truncated>\n    <difficult>0</difficult>\n    <bndbox>\n"
        f"      <xmin>{x0}</xmin>\n      <ymin>{y0}</ymin>\n      <xmax>{x1}</xmax>\n      <ymax>{y1}</ymax>\n"
        f"    </bndbox>\n  </object>\n"
        for c, x0, y0, x1, y1 in labels
    )
    return (
        f"<annotation>\n  <filename>{escape(filename)}</filename>\n"
        f"  <source>\n    <database>visiontrain synthetic MAR20</database>\n  </source>\n"
        f"  <size>\n    <width>{width}</width>\n    <height>{height}</height>\n    <depth>3</depth>\n  </size>\n"
        f"  <segmented>0</segmented>\n{objs}</annotation>\n"
    )


def obb_xml(filename: str, width: int, height: int, labels: list[tuple[int, int, int, int, int]],
            corners: list[np.ndarray], names: tuple[str, ...] = MAR20_NAMES) -> str:
    """MAR20's oriented annotation: ``<robndbox>`` with ``x_left_top, y_left_top, x_right_top, …, y_left_bottom``
    (the corners in the aircraft's frame: nose side first)."""
    keys = ("left_top", "right_top", "right_bottom", "left_bottom")
    objs = "".join(
        f"  <object>\n    <name>{escape(names[lab[0]])}</name>\n    <difficult>0</difficult>\n    <robndbox>\n"
        + "".join(f"      <x_{k}>{x:.2f}</x_{k}>\n      <y_{k}>{y:.2f}</y_{k}>\n" for k, (x, y) in zip(keys, c))
        + "    </robndbox>\n  </object>\n"
        for lab, c in zip(labels, corners)
    )
    return (f"<annotation>\n  <filename>{escape(filename)}</filename>\n"
            f"  <size>\n    <width>{width}</width>\n    <height>{height}</height>\n    <depth>3</depth>\n  </size>\n"
            f"{objs}</annotation>\n")


def write_synthetic_mar20(
    out_dir: str | Path,
    train: int = 400,
    val: int = 100,
    imgsz: int = 320,
    seed: int = 0,
    objects: tuple[int, int] = (2, 6),
    jpeg_quality: int = 92,
) -> Path:
    """Write ``train + val`` images in the MAR20 layout under ``out_dir``; returns ``out_dir``.

    Image ids are ``1 … train + val``; ``ImageSets/Main/train.txt`` lists the first ``train``,
    ``test.txt`` the rest (MAR20 calls its validation split "test"). Image ``k`` depends only on
    ``(seed, k)``, so the same arguments always give the same bytes."""
    lo, hi = int(objects[0]), int(objects[1])
    if not (0 <= lo <= hi):
        raise ValueError(f"objects=({lo}, {hi}) must satisfy 0 <= min <= max")
    if imgsz < 64:
        raise ValueError(f"imgsz={imgsz} is too small for legible aircraft; use 64 or more")
    if train < 0 or val < 0:
        raise ValueError(f"train={train} and val={val} must be >= 0")
    out = Path(out_dir)
    img_dir, ann_dir, set_dir = (
        out / "JPEGImages",
        out / "Annotations" / "Horizontal Bounding Boxes",
        out / "ImageSets" / "Main",
    )
    obb_dir = out / "Annotations" / "Oriented Bounding Boxes"
    for d in (img_dir, ann_dir, set_dir, obb_dir):
        d.mkdir(parents=True, exist_ok=True)
    ids = [str(k) for k in range(1, train + val + 1)]
    for k, image_id in enumerate(ids, start=1):
        rng = np.random.default_rng([seed & 0xFFFFFFFF, k])
        corners: list[np.ndarray] = []
        img, labels = render_image(rng, imgsz, (lo, hi), corners)
        cv2.imwrite(str(img_dir / f"{image_id}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])
        (ann_dir / f"{image_id}.xml").write_text(voc_xml(f"{image_id}.jpg", imgsz, imgsz, labels))
        (obb_dir / f"{image_id}.xml").write_text(obb_xml(f"{image_id}.jpg", imgsz, imgsz, labels, corners))
    (set_dir / "train.txt").write_text("".join(i + "\n" for i in ids[:train]))
    (set_dir / "test.txt").write_text("".join(i + "\n" for i in ids[train:]))
    return out


def synthetic_set_dir(s: SyntheticSet) -> Path:
    """The synthetic MAR20 set ``s`` describes (``synth.*`` of a training run), written once: into ``s.out``
    when given, else into the cache (see :mod:`visiontrain.synthcache`)."""
    from visiontrain.synthcache import cache_root, synthesize_once

    params = {"kind": "mar20", "oriented": True, "train": s.train, "val": s.val, "imgsz": s.imgsz, "seed": s.seed}
    out = Path(s.out) if s.out else cache_root() / f"mar20-synth-{s.train}-{s.val}-{s.imgsz}-{s.seed}"
    return synthesize_once(out, params, lambda tmp: write_synthetic_mar20(tmp, train=s.train, val=s.val,
                                                                          imgsz=s.imgsz, seed=s.seed),
                           what=f"synthetic MAR20 data ({s.train} train, {s.val} val, {s.imgsz}×{s.imgsz} px)")
