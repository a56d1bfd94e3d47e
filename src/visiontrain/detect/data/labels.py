"""Labels of one split and the checks every reader shares.

A reader turns a dataset on disk into one validated :class:`LabelSet`: one :class:`ImageLabels` per
image, boxes ``[n, 4]`` xyxy in original pixels and classes ``[n]``. The helpers here are what the
readers (:mod:`.voc`, :mod:`.yolo`, :mod:`.coco`) validate with: image sizes from file headers, box
clipping with counts (:class:`FixCounter`), unknown-class errors, unique image ids. A reader of another
box kind (oriented boxes) would add its own geometry next to ``boxes`` and reuse the rest.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class DatasetError(ValueError):
    """A dataset on disk is wrong; the message names the file, the line and the fix."""


@dataclass
class ImageLabels:
    """One image: ``boxes [n, 4]`` float32 xyxy and ``classes [n]`` int64, in original pixels; oriented labels
    (:mod:`.obb`) also have ``polygons [n, 4, 2]`` float32 corners and ``difficult [n]`` bool (``boxes`` then
    holds their bounding boxes clipped to the image)."""

    path: str
    image_id: str  # the file stem; unique in a LabelSet
    height: int
    width: int
    boxes: np.ndarray
    classes: np.ndarray
    polygons: np.ndarray | None = None
    difficult: np.ndarray | None = None


@dataclass
class LabelSet:
    """All images of one split with their validated labels, and what validation changed."""

    records: list[ImageLabels]
    class_names: list[str]
    layout: str  # "voc" | "yolo" | "coco"
    split: str
    source: str
    stats: dict[str, Any] = field(default_factory=dict)
    from_cache: bool = False
    bad_images: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) left out as damaged

    def __len__(self) -> int:
        return len(self.records)

    def keep_classes(self, names: Sequence[str]) -> LabelSet:
        """Drop labels of classes not in ``names`` (indices are kept); emptied images become background."""
        unknown = [n for n in names if n not in self.class_names]
        if unknown:
            raise DatasetError(f"keep_classes: {unknown} not among the dataset's classes {self.class_names}")
        keep = np.array([self.class_names.index(n) for n in names], dtype=np.int64)
        records = []
        for r in self.records:
            m = np.isin(r.classes, keep)
            records.append(replace(r, boxes=r.boxes[m], classes=r.classes[m],
                                   polygons=None if r.polygons is None else r.polygons[m],
                                   difficult=None if r.difficult is None else r.difficult[m]))
        stats = dict(self.stats, kept_classes=list(names))
        return replace(self, records=records, stats=stats)

    def only_classes(self, names: Sequence[str]) -> LabelSet:
        """Keep only ``names`` and renumber them ``0..len(names)-1`` in that order (others' labels removed)."""
        kept = self.keep_classes(names)
        lut = np.full(len(self.class_names), -1, dtype=np.int64)
        for new, n in enumerate(names):
            lut[self.class_names.index(n)] = new
        records = [replace(r, classes=lut[r.classes]) for r in kept.records]
        return replace(kept, records=records, class_names=list(names))

    def same_images(self, other: LabelSet) -> bool:
        """True when both sets hold exactly the same image files (e.g. validation read from the training data)."""
        return sorted(r.path for r in self.records) == sorted(r.path for r in other.records)

    def summary(self) -> str:
        s = self.stats
        n_box = sum(len(r.classes) for r in self.records)
        n_bg = sum(len(r.classes) == 0 for r in self.records)
        parts = [f"{self.layout} {self.split} ({self.source}): {len(self.records)} images ({n_bg} background), "
                 f"{n_box} boxes, {len(self.class_names)} classes"]
        if s.get("kept_classes"):
            parts.append(f"labels restricted to {s['kept_classes']}")
        for key, what in (("clipped", "boxes clipped to the image border"),
                          ("zero_area", "zero-area boxes dropped"),
                          ("outside", "boxes fully outside the image dropped"),
                          ("crowd", "iscrowd objects skipped"),
                          ("missing_label_file", "images without a label file (background)"),
                          ("size_mismatch", "annotations whose stated image size differs from the file (file used)")):
            if s.get(key):
                parts.append(f"{s[key]} {what} (first: {s['examples'][key]})")
        if self.bad_images:
            parts.append(f"{len(self.bad_images)} damaged images left out (first: {self.bad_images[0][0]})")
        if self.from_cache:
            parts.append("labels from cache")
        return "; ".join(parts)


# --------------------------------------------------------------------------------------------
# shared validation helpers


def read_image(path: str) -> np.ndarray:
    """``[H, W, 3]`` uint8 BGR; a file that does not decode raises :class:`DatasetError` naming it."""
    img = cv2.imread(path, cv2.IMREAD_COLOR)
    if img is None:
        raise DatasetError(f"{path}: could not decode the image; replace or remove it")
    return img


def image_size(path: Path) -> tuple[int, int]:
    """``(height, width)`` from the file header; raises :class:`DatasetError` if it is not an image."""
    try:
        with Image.open(path) as im:
            w, h = im.size
    except FileNotFoundError:
        raise DatasetError(f"{path}: image does not exist") from None
    except Exception as e:
        raise DatasetError(f"{path}: not a readable image ({type(e).__name__}: {e}); replace or remove it") from None
    if w <= 0 or h <= 0:
        raise DatasetError(f"{path}: image has size {w}x{h}")
    return h, w


class FixCounter:
    """Counts of what validation fixed (clipped boxes, dropped boxes …), with the first example of each."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.examples: dict[str, str] = {}

    def add(self, key: str, n: int, where: str) -> None:
        if n:
            self.counts[key] = self.counts.get(key, 0) + n
            self.examples.setdefault(key, where)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.counts, examples=dict(self.examples))


def sanitize_boxes(boxes: np.ndarray, classes: np.ndarray, width: int, height: int, counter: FixCounter,
                   where: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Clip ``[n, 4]`` boxes to the image and drop those left with zero area, counting both.

    ``where[i]`` names box ``i`` (``file line k``) for the summary."""
    if len(boxes) == 0:
        return boxes.reshape(0, 4).astype(np.float32), classes.reshape(0).astype(np.int64)
    limits = np.array([width, height, width, height], dtype=np.float64)
    clipped = boxes.clip(0, limits)
    changed = np.any(np.abs(clipped - boxes) > 1e-6, 1)
    empty = (clipped[:, 2] <= clipped[:, 0]) | (clipped[:, 3] <= clipped[:, 1])
    was_empty = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
    outside = empty & ~was_empty
    for key, mask in (("clipped", changed & ~empty), ("zero_area", was_empty), ("outside", outside)):
        if mask.any():
            counter.add(key, int(mask.sum()), where[int(np.argmax(mask))])
    return clipped[~empty].astype(np.float32), classes[~empty].astype(np.int64)


NAMES_FIX = "Fix the label or give the dataset's class names with names=[...]"


def unknown_class(where: str, name: str, known: Sequence[str], fix: str = NAMES_FIX) -> DatasetError:
    """The error for a label whose class is not among ``known`` (shows them, and ``fix``: how to declare others;
    ``names=`` is the key of train, eval and split that declares a dataset's classes)."""
    shown = ", ".join(known[:40]) + (" …" if len(known) > 40 else "")
    return DatasetError(f"{where}: unknown class {name!r}; known classes are [{shown}]. {fix}.")


def list_images(folder: Path) -> dict[str, Path]:
    """``stem -> path`` of the image files directly in ``folder``."""
    if not folder.is_dir():
        return {}
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}


def check_unique_ids(paths: list[Path], source: str) -> None:
    """Image ids are file stems: two images of one split with the same stem are an error naming both."""
    seen: dict[str, Path] = {}
    for p in paths:
        if p.stem in seen:
            raise DatasetError(f"{source}: images {seen[p.stem]} and {p} share the id {p.stem!r}; image ids are "
                               f"file stems and must be unique within a split. Rename one of them.")
        seen[p.stem] = p


def split_aliases(split: str) -> list[str]:
    """Names a split may have on disk, in order: MAR20 calls its validation split ``test``."""
    return {"val": ["val", "test"], "test": ["test", "val"]}.get(split, [split])


def label_lines(path: Path | str, data: bytes) -> Iterator[tuple[str, str, list[str]]]:
    """``(where, line, fields)`` of every non-blank line of a text label file; ``where`` is ``"<path> line N"``."""
    for lineno, line in enumerate(data.decode(errors="replace").splitlines(), 1):
        fields = line.split()
        if fields:
            yield f"{path} line {lineno}", line, fields


def yolo_values(at: str, line: str, fields: list[str], layout: str, class_names: Sequence[str], fix: str,
                kind: str = "") -> list[float]:
    """The numbers of one YOLO label line whose fields ``layout`` names (``"class cx cy w h"``): as many as it
    has words, all finite, the first a class index into ``class_names`` (``fix``: what to do when it is not)."""
    if len(fields) != len(layout.split()):
        raise DatasetError(f"{at}: expected {len(layout.split())} values '{layout}'{kind and f' ({kind})'}, got "
                           f"{len(fields)}: {line.strip()!r}")
    try:
        values = [float(v) for v in fields]
    except ValueError:
        raise DatasetError(f"{at}: values must be numbers, got {line.strip()!r}") from None
    if not all(math.isfinite(v) for v in values):
        raise DatasetError(f"{at}: non-finite value in {line.strip()!r}")
    cls = values[0]
    if cls != int(cls) or not 0 <= cls < len(class_names):
        raise unknown_class(at, fields[0], [f"{i}={n}" for i, n in enumerate(class_names)], fix)
    return values
