"""Oriented-box annotations: MAR20 ``<robndbox>`` XML, DOTA ``labelTxt``, Ultralytics YOLO-OBB lines.

Every reader gives per image ``polygons [n, 4, 2]`` (corners in original pixels, in the file's order),
``classes [n]`` and ``difficult [n]``; :func:`finish_polygons` adds the horizontal ``boxes [n, 4]`` (the
polygons' bounding boxes clipped to the image, so the same labels also score horizontal detectors) and
applies the shared checks: a polygon with a non-finite corner or whose corners are not in order around it
(its edges cross: a "bow tie") is an error naming the file and line; a zero-area polygon is dropped and one
fully outside the image too, each counted in the load summary. Polygons are not clipped (a clipped rotated
box is no longer a rectangle); the part outside the image is simply never seen.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from visiontrain.detect.data.labels import DatasetError, FixCounter, label_lines, unknown_class, yolo_values

#: DOTA v1.0 classes in the order of Ultralytics' DOTAv1.yaml
DOTA_NAMES: tuple[str, ...] = (
    "plane", "ship", "storage-tank", "baseball-diamond", "tennis-court", "basketball-court", "ground-track-field",
    "harbor", "bridge", "large-vehicle", "small-vehicle", "helicopter", "roundabout", "soccer-ball-field",
    "swimming-pool",
)
ROBNDBOX_KEYS = ("x_left_top", "y_left_top", "x_right_top", "y_right_top", "x_right_bottom", "y_right_bottom",
                 "x_left_bottom", "y_left_bottom")


def check_polygon(values: list[float], at: str) -> np.ndarray:
    """Eight numbers -> ``[4, 2]`` corners; raises :class:`DatasetError` naming ``at`` when not finite or when the
    corners are not in order around the polygon (two of its edges cross)."""
    if len(values) != 8 or not all(math.isfinite(v) for v in values):
        raise DatasetError(f"{at}: an oriented box needs 8 finite corner coordinates x1 y1 … x4 y4, got {values}")
    p = np.array(values, np.float64).reshape(4, 2)
    e = np.roll(p, -1, 0) - p
    turn = e[:, 0] * np.roll(e, -1, 0)[:, 1] - e[:, 1] * np.roll(e, -1, 0)[:, 0]
    scale = max(float(np.abs(e).max()), 1e-12) ** 2
    signs = np.sign(np.where(np.abs(turn) > 1e-9 * scale, turn, 0))
    if (signs > 0).sum() == 2 and (signs < 0).sum() == 2:
        raise DatasetError(f"{at}: the corners {values} are not in order around the box (its edges cross); "
                           f"list them clockwise or counter-clockwise")
    return p


def polygon_area(p: np.ndarray) -> np.ndarray:
    """Unsigned area of ``[..., 4, 2]`` polygons."""
    x, y = p[..., 0], p[..., 1]
    return 0.5 * np.abs((x * np.roll(y, -1, -1) - np.roll(x, -1, -1) * y).sum(-1))


def finish_polygons(polys: np.ndarray, classes: np.ndarray, difficult: np.ndarray, width: int, height: int,
                    counter: FixCounter, where: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Drop zero-area polygons and those fully outside the image (counted); returns ``(boxes [n, 4] float32 xyxy
    clipped, classes [n] int64, polygons [n, 4, 2] float32, difficult [n] bool)``."""
    polys = polys.reshape(-1, 4, 2)
    lo = polys.min(1) if len(polys) else np.zeros((0, 2))
    hi = polys.max(1) if len(polys) else np.zeros((0, 2))
    boxes = np.concatenate([lo, hi], 1)
    clipped = boxes.clip(0, [width, height, width, height])
    zero = polygon_area(polys) <= 1e-9
    outside = ~zero & ((clipped[:, 2] <= clipped[:, 0]) | (clipped[:, 3] <= clipped[:, 1]))
    for key, mask in (("zero_area", zero), ("outside", outside)):
        if mask.any():
            counter.add(key, int(mask.sum()), where[int(np.argmax(mask))])
    keep = ~zero & ~outside
    return (clipped[keep].astype(np.float32), classes[keep].astype(np.int64), polys[keep].astype(np.float32),
            difficult[keep].astype(bool))


def parse_robndbox(path: Path, obj, lines: dict[int, int], name: str) -> tuple[list[float], str]:
    """The eight corner values of a MAR20 ``<robndbox>`` and where it is."""
    rb = obj.find("robndbox")
    if rb is None:
        raise DatasetError(f"{path} line {lines[id(obj)]}: <object> {name!r} has no <robndbox> (an oriented "
                           f"annotation needs {', '.join(ROBNDBOX_KEYS)})")
    values = []
    for k in ROBNDBOX_KEYS:
        el = rb.find(k)
        try:
            values.append(float(el.text))  # type: ignore[union-attr, arg-type]
        except (AttributeError, TypeError, ValueError):
            at = lines[id(el)] if el is not None else lines[id(rb)]
            got = "missing" if el is None else repr(el.text)
            raise DatasetError(f"{path} line {at}: <robndbox> needs the numbers {', '.join(ROBNDBOX_KEYS)}; "
                               f"<{k}> is {got}") from None
    return values, f"{path} line {lines[id(rb)]}"


def parse_dota_lines(path: Path, data: bytes, class_names: list[str]
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """A DOTA ``labelTxt`` file: ``x1 y1 x2 y2 x3 y3 x4 y4 class difficult`` lines (``imagesource:`` / ``gsd:``
    header lines skipped). Returns ``polygons [n, 4, 2]``, ``classes [n]``, ``difficult [n]``, ``where``."""
    index = {n: i for i, n in enumerate(class_names)}
    polys, classes, diff, where = [], [], [], []
    for at, line, fields in label_lines(path, data):
        if len(fields) == 1 and ":" in fields[0]:  # imagesource: / gsd: header
            continue
        if len(fields) not in (9, 10):
            raise DatasetError(f"{at}: expected 'x1 y1 x2 y2 x3 y3 x4 y4 class difficult', got {line.strip()!r}")
        try:
            values = [float(v) for v in fields[:8]]
        except ValueError:
            raise DatasetError(f"{at}: corner coordinates must be numbers, got {line.strip()!r}") from None
        if fields[8] not in index:
            raise unknown_class(at, fields[8], class_names)
        if len(fields) == 10 and fields[9] not in ("0", "1"):
            raise DatasetError(f"{at}: difficult must be 0 or 1, got {fields[9]!r}")
        polys.append(check_polygon(values, at))
        classes.append(index[fields[8]])
        diff.append(len(fields) == 10 and fields[9] == "1")
        where.append(at)
    return (np.array(polys, np.float64).reshape(-1, 4, 2), np.array(classes, np.int64), np.array(diff, bool), where)


def parse_yolo_obb_lines(path: Path, data: bytes, class_names: list[str], width: int, height: int,
                         names_fix: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Ultralytics YOLO-OBB lines ``cls x1 y1 x2 y2 x3 y3 x4 y4`` (normalised) -> ``polygons [n, 4, 2]`` in pixels,
    ``classes [n]``, ``where``."""
    polys, classes, where = [], [], []
    for at, line, fields in label_lines(path, data):
        values = yolo_values(at, line, fields, "class x1 y1 x2 y2 x3 y3 x4 y4", class_names, names_fix, "YOLO-OBB")
        p = check_polygon(values[1:], at) * [width, height]
        polys.append(p)
        classes.append(int(values[0]))
        where.append(at)
    return np.array(polys, np.float64).reshape(-1, 4, 2), np.array(classes, np.int64), where
