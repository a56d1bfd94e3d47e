"""Detection datasets: MAR20/VOC, YOLO and COCO readers, validation, label cache, the torch Dataset.

Readers turn a dataset on disk into one validated :class:`LabelSet` (one :class:`ImageLabels` per
image, boxes ``[n, 4]`` xyxy in original pixels, classes ``[n]``). Layouts:

* **MAR20 / VOC**: ``JPEGImages/<id>.jpg``, ``Annotations/Horizontal Bounding Boxes/<id>.xml`` (or
  ``Annotations/<id>.xml``), ``ImageSets/Main/{train,val,test}.txt``. Boxes are read as continuous
  pixel coordinates as written (no 1-based shift). Class names default to MAR20's ``A1``…``A20``.
* **YOLO**: ``data.yaml`` (``path``, ``train``/``val``/``test`` = image folders or ``.txt`` lists,
  ``names``) with ``images/…`` and ``labels/….txt`` (``cls cx cy w h`` normalised per line).
* **COCO**: ``annotations/instances_<split>.json`` (or a ``.json`` file given directly), images under
  ``images/<split>/``, ``<split>/``, ``images/`` or next to the json. ``iscrowd`` objects are skipped.

Validation happens once at load: a listed image that is missing or not an image, a malformed
annotation (file and line), an unknown class (file, line and the known classes) raise
:class:`DatasetError`; boxes crossing the border are clipped, zero-area boxes dropped, and both are
counted in one summary logged per load. An empty label file is a background image. Every image is also
checked for damage (truncated, empty, undecodable) at every load, and all damaged ones are named in one
error or skipped (``bad_images``, see :mod:`visiontrain.detect.image_check`).

Parsed labels are cached in ``<root>/.visiontrain_cache/<layout>_<split>.npz``, keyed by a hash of
the dataset's absolute path, the annotation bytes, the image names and sizes, the class list and
:data:`READER_VERSION`.

:class:`DetectionDataset` serves ``(image uint8 [3, S, S] RGB, labels [n, 5] (cls, x1, y1, x2, y2)
in letterboxed pixels, meta)``; :func:`collate` batches them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import xml.etree.ElementTree as ET
import xml.parsers.expat
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import yaml
from PIL import Image

from visiontrain.detect.augment import (
    AugmentConfig,
    augment_train,
    letterbox,
    pad_to_square,
    resize_long_side,
    scale_labels,
)
from visiontrain.detect.image_check import screen_images
from visiontrain.detect.synthetic import MAR20_NAMES
from visiontrain.engine.task import sample_rng

READER_VERSION = 1
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
CACHE_DIR = ".visiontrain_cache"
log = logging.getLogger(__name__)


class DatasetError(ValueError):
    """A dataset on disk is wrong; the message names the file, the line and the fix."""


@dataclass
class ImageLabels:
    """One image: ``boxes [n, 4]`` float32 xyxy and ``classes [n]`` int64, in original pixels."""

    path: str
    image_id: str  # the file stem; unique in a LabelSet
    height: int
    width: int
    boxes: np.ndarray
    classes: np.ndarray


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
            records.append(replace(r, boxes=r.boxes[m], classes=r.classes[m]))
        stats = dict(self.stats, kept_classes=list(names))
        return replace(self, records=records, stats=stats)

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


class _Counter:
    """Counts of what validation fixed, with the first example of each."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.examples: dict[str, str] = {}

    def add(self, key: str, n: int, where: str) -> None:
        if n:
            self.counts[key] = self.counts.get(key, 0) + n
            self.examples.setdefault(key, where)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.counts, examples=dict(self.examples))


def sanitize_boxes(boxes: np.ndarray, classes: np.ndarray, width: int, height: int, counter: _Counter,
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


def _unknown_class(where: str, name: str, known: Sequence[str]) -> DatasetError:
    shown = ", ".join(known[:40]) + (" …" if len(known) > 40 else "")
    return DatasetError(f"{where}: unknown class {name!r}; known classes are [{shown}]. "
                        f"Fix the label or pass the dataset's class names (class_names=[...]).")


def _hash(parts: list[bytes]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        h.update(len(p).to_bytes(8, "little"))
        h.update(p)
    return h.hexdigest()


def _list_images(folder: Path) -> dict[str, Path]:
    """``stem -> path`` of the image files directly in ``folder``."""
    if not folder.is_dir():
        return {}
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}


def _check_unique_ids(paths: list[Path], source: str) -> None:
    seen: dict[str, Path] = {}
    for p in paths:
        if p.stem in seen:
            raise DatasetError(f"{source}: images {seen[p.stem]} and {p} share the id {p.stem!r}; image ids are "
                               f"file stems and must be unique within a split. Rename one of them.")
        seen[p.stem] = p


# --------------------------------------------------------------------------------------------
# readers: each has root, a content key, and parse() -> LabelSet


class _VocReader:
    layout = "voc"

    def __init__(self, root: Path, split: str, class_names: Sequence[str] | None):
        self.root, self.split = root, split
        self.class_names = list(class_names) if class_names else list(MAR20_NAMES)
        sets = root / "ImageSets" / "Main"
        aliases = {"val": ["val", "test"], "test": ["test", "val"]}.get(split, [split])
        split_file = next((sets / f"{a}.txt" for a in aliases if (sets / f"{a}.txt").is_file()), None)
        if split_file is None:
            have = sorted(p.name for p in sets.glob("*.txt")) if sets.is_dir() else []
            raise DatasetError(f"{sets}: no split list for {split!r} (looked for {[a + '.txt' for a in aliases]}; "
                               f"found {have}). Write the image ids of the split there, one per line.")
        self.split_file = split_file
        ann = root / "Annotations" / "Horizontal Bounding Boxes"
        self.ann_dir = ann if ann.is_dir() else root / "Annotations"
        images = _list_images(root / "JPEGImages")
        self.items: list[tuple[str, Path, Path]] = []  # (id, image, xml)
        split_text = split_file.read_text()
        for lineno, line in enumerate(split_text.splitlines(), 1):
            image_id = line.strip()
            if not image_id:
                continue
            if image_id not in images:
                raise DatasetError(f"{split_file} line {lineno}: image {image_id!r} is listed but "
                                   f"{root / 'JPEGImages'}/{image_id}.* does not exist. Add it or remove the line.")
            xml_path = self.ann_dir / f"{image_id}.xml"
            if not xml_path.is_file():
                raise DatasetError(f"{split_file} line {lineno}: annotation {xml_path} does not exist "
                                   f"(write an XML with no <object> for a background image).")
            self.items.append((image_id, images[image_id], xml_path))
        self.xml_bytes = [x.read_bytes() for _, _, x in self.items]
        self.key_parts = [split_text.encode(), *self.xml_bytes,
                          *(f"{p.name}:{p.stat().st_size}".encode() for _, p, _ in self.items)]

    def image_paths(self) -> list[Path]:
        return [p for _, p, _ in self.items]

    def parse(self, skip: frozenset[Path] = frozenset()) -> LabelSet:
        counter, records = _Counter(), []
        for (image_id, img_path, xml_path), data in zip(self.items, self.xml_bytes):
            if img_path in skip:
                continue
            h, w = image_size(img_path)
            boxes, classes, where, size = _parse_voc_xml(xml_path, data, self.class_names)
            if size is not None and size != (h, w) and size != (0, 0):
                counter.add("size_mismatch", 1, f"{xml_path} says {size[1]}x{size[0]}, image is {w}x{h}")
            boxes, classes = sanitize_boxes(boxes, classes, w, h, counter, where)
            records.append(ImageLabels(str(img_path), image_id, h, w, boxes, classes))
        return LabelSet(records, self.class_names, self.layout, self.split, str(self.root), counter.as_dict())


def _parse_xml(path: Path, data: bytes) -> tuple[ET.Element, dict[int, int]]:
    """An ElementTree plus ``id(element) -> line``; malformed XML raises naming file and line."""
    builder = ET.TreeBuilder()
    parser = xml.parsers.expat.ParserCreate()
    lines: dict[int, int] = {}

    def start(tag: str, attrs: dict) -> None:
        lines[id(builder.start(tag, attrs))] = parser.CurrentLineNumber

    parser.StartElementHandler = start
    parser.EndElementHandler = builder.end
    parser.CharacterDataHandler = builder.data
    try:
        parser.Parse(data, True)
    except xml.parsers.expat.ExpatError as e:
        raise DatasetError(f"{path} line {e.lineno}: malformed XML ({xml.parsers.expat.ErrorString(e.code)}). "
                           f"Fix the file.") from None
    return builder.close(), lines


def _parse_voc_xml(path: Path, data: bytes, class_names: list[str]
                   ) -> tuple[np.ndarray, np.ndarray, list[str], tuple[int, int] | None]:
    """``boxes [n, 4]``, ``classes [n]``, ``where`` per box and the stated ``(h, w)`` of one VOC file."""
    root, lines = _parse_xml(path, data)
    size = None
    size_el = root.find("size")
    if size_el is not None:
        try:
            size = (int(float(size_el.findtext("height", "0"))), int(float(size_el.findtext("width", "0"))))
        except ValueError:
            raise DatasetError(f"{path} line {lines[id(size_el)]}: <size> width/height are not numbers") from None
    boxes, classes, where = [], [], []
    index = {n: i for i, n in enumerate(class_names)}
    for obj in root.iter("object"):
        line = lines[id(obj)]
        name = (obj.findtext("name") or "").strip()
        if not name:
            raise DatasetError(f"{path} line {line}: <object> without a <name>")
        if name not in index:
            raise _unknown_class(f"{path} line {lines[id(obj.find('name'))]}", name, class_names)
        bb = obj.find("bndbox")
        if bb is None:
            raise DatasetError(f"{path} line {line}: <object> {name!r} has no <bndbox>")
        coords = []
        for k in ("xmin", "ymin", "xmax", "ymax"):
            el = bb.find(k)
            try:
                coords.append(float(el.text))  # type: ignore[union-attr, arg-type]
            except (AttributeError, TypeError, ValueError):
                at = lines[id(el)] if el is not None else lines[id(bb)]
                got = "missing" if el is None else repr(el.text)
                raise DatasetError(f"{path} line {at}: <bndbox> needs numbers xmin, ymin, xmax, ymax; "
                                   f"<{k}> is {got}") from None
        if not all(math.isfinite(c) for c in coords):
            raise DatasetError(f"{path} line {lines[id(bb)]}: <bndbox> has a non-finite value {coords}")
        if coords[2] < coords[0] or coords[3] < coords[1]:
            raise DatasetError(f"{path} line {lines[id(bb)]}: <bndbox> has xmax < xmin or ymax < ymin {coords}; "
                               f"corners are swapped")
        boxes.append(coords)
        classes.append(index[name])
        where.append(f"{path} line {lines[id(bb)]}")
    return (np.array(boxes, np.float64).reshape(-1, 4), np.array(classes, np.int64), where, size)


class _YoloReader:
    layout = "yolo"

    def __init__(self, spec: Path, split: str, class_names: Sequence[str] | None):
        yaml_path = spec if spec.is_file() else next(
            (spec / n for n in ("data.yaml", "data.yml", "dataset.yaml") if (spec / n).is_file()), spec / "data.yaml")
        self.yaml_path, self.split = yaml_path, split
        try:
            cfg = yaml.safe_load(yaml_path.read_text()) or {}
        except yaml.YAMLError as e:
            raise DatasetError(f"{yaml_path}: not valid YAML ({e})") from None
        if not isinstance(cfg, dict) or "names" not in cfg:
            raise DatasetError(f"{yaml_path}: needs a 'names' list (or {{index: name}} map) of class names")
        names = cfg["names"]
        if isinstance(names, dict):
            if sorted(int(k) for k in names) != list(range(len(names))):
                raise DatasetError(f"{yaml_path}: 'names' keys must be 0..{len(names) - 1}, got {sorted(names)}")
            names = [names[k] for k in sorted(names, key=int)]
        self.class_names = [str(n) for n in names]
        if class_names is not None and list(class_names) != self.class_names:
            raise DatasetError(f"{yaml_path}: declares classes {self.class_names}, but {list(class_names)} "
                               f"were asked for; drop class_names or fix data.yaml")
        if "nc" in cfg and int(cfg["nc"]) != len(self.class_names):
            raise DatasetError(f"{yaml_path}: nc={cfg['nc']} but 'names' has {len(self.class_names)} entries")
        base = Path(cfg.get("path") or yaml_path.parent)
        self.root = base if base.is_absolute() else (yaml_path.parent / base).resolve()
        aliases = {"val": ["val", "test"], "test": ["test", "val"]}.get(split, [split])
        key = next((a for a in aliases if cfg.get(a)), None)
        if key is None:
            raise DatasetError(f"{yaml_path}: no entry for split {split!r} (looked for {aliases})")
        entries = cfg[key] if isinstance(cfg[key], list) else [cfg[key]]
        images: list[Path] = []
        for entry in entries:
            p = self.root / str(entry)
            if p.is_dir():
                images += sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES)
            elif p.is_file() and p.suffix == ".txt":
                for lineno, line in enumerate(p.read_text().splitlines(), 1):
                    if line.strip():
                        q = self.root / line.strip()
                        if not q.is_file():
                            raise DatasetError(f"{p} line {lineno}: image {q} does not exist")
                        images.append(q)
            else:
                raise DatasetError(f"{yaml_path}: {key}: {p} is neither an image folder nor a .txt list of images")
        _check_unique_ids(images, str(yaml_path))
        self.images = images
        self.labels = [_yolo_label_path(p) for p in images]
        self.label_bytes = [lp.read_bytes() if lp.is_file() else None for lp in self.labels]
        self.key_parts = [yaml_path.read_bytes(), *(b"\x00missing" if b is None else b for b in self.label_bytes),
                          *(f"{p.relative_to(self.root)}:{p.stat().st_size}".encode() for p in images)]

    def image_paths(self) -> list[Path]:
        return list(self.images)

    def parse(self, skip: frozenset[Path] = frozenset()) -> LabelSet:
        counter, records = _Counter(), []
        nc = len(self.class_names)
        for img_path, label_path, data in zip(self.images, self.labels, self.label_bytes):
            if img_path in skip:
                continue
            h, w = image_size(img_path)
            rows, where = [], []
            if data is None:
                counter.add("missing_label_file", 1, str(label_path))
            for lineno, line in enumerate((data or b"").decode(errors="replace").splitlines(), 1):
                fields = line.split()
                if not fields:
                    continue
                at = f"{label_path} line {lineno}"
                if len(fields) != 5:
                    raise DatasetError(f"{at}: expected 5 values 'class cx cy w h', got {len(fields)}: {line.strip()!r}")
                try:
                    values = [float(v) for v in fields]
                except ValueError:
                    raise DatasetError(f"{at}: values must be numbers, got {line.strip()!r}") from None
                if not all(math.isfinite(v) for v in values):
                    raise DatasetError(f"{at}: non-finite value in {line.strip()!r}")
                cls = values[0]
                if cls != int(cls) or not 0 <= cls < nc:
                    raise _unknown_class(at, fields[0], [f"{i}={n}" for i, n in enumerate(self.class_names)])
                if values[3] < 0 or values[4] < 0:
                    raise DatasetError(f"{at}: negative width or height in {line.strip()!r}")
                rows.append(values)
                where.append(at)
            arr = np.array(rows, np.float64).reshape(-1, 5)
            cx, cy, bw, bh = arr[:, 1] * w, arr[:, 2] * h, arr[:, 3] * w, arr[:, 4] * h
            boxes = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], 1)
            boxes, classes = sanitize_boxes(boxes, arr[:, 0].astype(np.int64), w, h, counter, where)
            records.append(ImageLabels(str(img_path), img_path.stem, h, w, boxes, classes))
        return LabelSet(records, self.class_names, self.layout, self.split, str(self.yaml_path), counter.as_dict())


def _yolo_label_path(image: Path) -> Path:
    """``…/images/…/x.jpg`` -> ``…/labels/…/x.txt`` (the last ``images`` component)."""
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


class _CocoReader:
    layout = "coco"

    def __init__(self, spec: Path, split: str, class_names: Sequence[str] | None):
        self.split = split
        aliases = {"val": ["val", "val2017", "test"], "train": ["train", "train2017"],
                   "test": ["test", "val"]}.get(split, [split])
        if spec.is_file():
            json_path, root = spec, spec.parent.parent if spec.parent.name == "annotations" else spec.parent
            stem = spec.stem.removeprefix("instances_")
            aliases = [stem] + [a for a in aliases if a != stem]
        else:
            root = spec
            cands = [spec / "annotations" / f"instances_{a}.json" for a in aliases]
            cands += [spec / "annotations" / f"{a}.json" for a in aliases] + [spec / f"{a}.json" for a in aliases]
            json_path = next((c for c in cands if c.is_file()), None)
            if json_path is None:
                raise DatasetError(f"{spec}: no COCO json for split {split!r} (looked for {[str(c) for c in cands]})")
        self.json_path, self.root = json_path, root
        self.json_bytes = json_path.read_bytes()
        try:
            data = json.loads(self.json_bytes)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{json_path} line {e.lineno}: malformed JSON ({e.msg})") from None
        for k in ("images", "annotations", "categories"):
            if not isinstance(data.get(k) if isinstance(data, dict) else None, list):
                raise DatasetError(f"{json_path}: needs a list under {k!r}")
        self.data = data
        cats = sorted(data["categories"], key=lambda c: c["id"])
        self.class_names = list(class_names) if class_names else [str(c["name"]) for c in cats]
        dirs = [root / "images" / a for a in aliases] + [root / a for a in aliases] + [root / "images", root,
                                                                                     json_path.parent]
        self.images: list[tuple[dict, Path]] = []
        for i, im in enumerate(data["images"]):
            if not isinstance(im, dict) or "id" not in im or "file_name" not in im:
                raise DatasetError(f"{json_path}: images[{i}] needs 'id' and 'file_name'")
            path = next((d / im["file_name"] for d in dirs if (d / im["file_name"]).is_file()), None)
            if path is None:
                raise DatasetError(f"{json_path}: images[{i}] file {im['file_name']!r} not found under any of "
                                   f"{[str(d) for d in dirs]}")
            self.images.append((im, path))
        _check_unique_ids([p for _, p in self.images], str(json_path))
        self.key_parts = [self.json_bytes, *(f"{p}:{p.stat().st_size}".encode() for _, p in self.images)]

    def image_paths(self) -> list[Path]:
        return [p for _, p in self.images]

    def parse(self, skip: frozenset[Path] = frozenset()) -> LabelSet:
        counter, jp = _Counter(), self.json_path
        index = {n: i for i, n in enumerate(self.class_names)}
        cat_to_cls: dict[Any, int] = {}
        cat_names = {c["id"]: str(c.get("name", c["id"])) for c in self.data["categories"]}
        per_image: dict[Any, list[tuple[list[float], int, str]]] = {im["id"]: [] for im, _ in self.images}
        for i, ann in enumerate(self.data["annotations"]):
            at = f"{jp} annotations[{i}] (id {ann.get('id')})"
            if ann.get("image_id") not in per_image:
                raise DatasetError(f"{at}: image_id {ann.get('image_id')!r} is not in 'images'")
            cat = ann.get("category_id")
            if cat not in cat_to_cls:
                if cat not in cat_names or cat_names[cat] not in index:
                    raise _unknown_class(at, f"category_id {cat!r}" + (f" ({cat_names[cat]})" if cat in cat_names
                                                                       else ""), self.class_names)
                cat_to_cls[cat] = index[cat_names[cat]]
            bb = ann.get("bbox")
            if not (isinstance(bb, list) and len(bb) == 4 and all(isinstance(v, (int, float)) for v in bb)):
                raise DatasetError(f"{at}: bbox must be 4 numbers [x, y, w, h], got {bb!r}")
            if not all(math.isfinite(v) for v in bb) or bb[2] < 0 or bb[3] < 0:
                raise DatasetError(f"{at}: bbox {bb} is non-finite or has a negative size")
            if ann.get("iscrowd", 0):
                counter.add("crowd", 1, at)
                continue
            per_image[ann["image_id"]].append(([bb[0], bb[1], bb[0] + bb[2], bb[1] + bb[3]], cat_to_cls[cat], at))
        records = []
        for im, path in self.images:
            if path in skip:
                continue
            h, w = image_size(path)
            if (im.get("height"), im.get("width")) not in ((h, w), (None, None)):
                counter.add("size_mismatch", 1, f"{jp} image {im['file_name']}")
            anns = per_image[im["id"]]
            boxes = np.array([a[0] for a in anns], np.float64).reshape(-1, 4)
            classes = np.array([a[1] for a in anns], np.int64)
            boxes, classes = sanitize_boxes(boxes, classes, w, h, counter, [a[2] for a in anns])
            records.append(ImageLabels(str(path), path.stem, h, w, boxes, classes))
        return LabelSet(records, self.class_names, self.layout, self.split, str(jp), counter.as_dict())


def detect_layout(source: str | Path) -> str:
    """``"voc"``, ``"yolo"`` or ``"coco"`` for a dataset folder, a ``data.yaml`` or a COCO ``.json``."""
    p = Path(source)
    if p.is_file():
        if p.suffix in (".yaml", ".yml"):
            return "yolo"
        if p.suffix == ".json":
            return "coco"
    elif p.is_dir():
        if (p / "JPEGImages").is_dir() and (p / "Annotations").is_dir():
            return "voc"
        if any((p / n).is_file() for n in ("data.yaml", "data.yml", "dataset.yaml")):
            return "yolo"
        if (p / "annotations").is_dir() and any((p / "annotations").glob("*.json")):
            return "coco"
    elif not p.exists():
        raise DatasetError(f"dataset {p} does not exist")
    raise DatasetError(f"{p}: not a known dataset layout. Expected a MAR20/VOC folder (JPEGImages/, Annotations/, "
                       f"ImageSets/Main/), a YOLO data.yaml (or a folder holding one), or a COCO .json "
                       f"(or a folder with annotations/*.json).")


# --------------------------------------------------------------------------------------------
# cache


def _cache_path(reader: Any) -> Path:
    base = reader.root if reader.layout != "yolo" else reader.yaml_path.parent
    return Path(base) / CACHE_DIR / f"{reader.layout}_{reader.split}.npz"


def _write_cache(path: Path, key: str, ls: LabelSet) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        recs = ls.records
        tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
        np.savez(tmp, key=np.array(key), paths=np.array([r.path for r in recs], dtype=str),
                 ids=np.array([r.image_id for r in recs], dtype=str),
                 sizes=np.array([(r.height, r.width) for r in recs], np.int64).reshape(-1, 2),
                 counts=np.array([len(r.classes) for r in recs], np.int64),
                 boxes=np.concatenate([r.boxes for r in recs] or [np.zeros((0, 4))]).astype(np.float32),
                 classes=np.concatenate([r.classes for r in recs] or [np.zeros(0)]).astype(np.int64),
                 class_names=np.array(ls.class_names, dtype=str), stats=np.array(json.dumps(ls.stats)))
        os.replace(tmp, path)
    except OSError as e:  # read-only dataset: work without a cache
        log.debug("could not write label cache %s: %s", path, e)


def _read_cache(path: Path, key: str, layout: str, split: str, source: str) -> LabelSet | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"]) != key:
                return None
            bounds = np.concatenate([[0], np.cumsum(z["counts"])])
            boxes, classes = z["boxes"], z["classes"]
            records = [ImageLabels(str(p), str(i), int(s[0]), int(s[1]), boxes[a:b], classes[a:b])
                       for p, i, s, a, b in zip(z["paths"], z["ids"], z["sizes"], bounds[:-1], bounds[1:])]
            return LabelSet(records, [str(n) for n in z["class_names"]], layout, split, source,
                            json.loads(str(z["stats"])), from_cache=True)
    except Exception as e:  # a damaged cache is rebuilt
        log.debug("ignoring unreadable label cache %s: %s", path, e)
        return None


def load_labels(source: str | Path, split: str = "train", class_names: Sequence[str] | None = None,
                keep_classes: Sequence[str] | None = None, cache: bool = True, bad_images: str = "raise") -> LabelSet:
    """Read, validate (and cache) the labels of one split of a dataset in any supported layout.

    ``class_names``: VOC class list (default MAR20's A1..A20), a COCO name order, or for YOLO a check
    against data.yaml. ``keep_classes``: drop the labels of every other class (images emptied become
    background), e.g. the base classes of a class-incremental run. ``bad_images``: what to do with
    damaged image files, ``raise`` | ``skip`` | ``drop`` (:mod:`visiontrain.detect.image_check`).
    Logs one summary line."""
    layout = detect_layout(source)
    source = Path(source).resolve()  # absolute image paths, valid from any working directory
    reader = {"voc": _VocReader, "yolo": _YoloReader, "coco": _CocoReader}[layout](source, split, class_names)
    bad = screen_images(reader.image_paths(), bad_images, f"{layout} {split} ({source})", DatasetError)
    # the key names the dataset's absolute root: cached records hold absolute image paths, and a copied or
    # moved dataset must read its own images, not those of the place its cache was written in
    key = _hash([f"v{READER_VERSION}|{layout}|{split}|{reader.class_names}|{source}".encode(), *reader.key_parts,
                 *(f"damaged:{p}".encode() for p, _ in bad)])
    cache_file = _cache_path(reader)
    labels = _read_cache(cache_file, key, layout, split, str(source)) if cache else None
    if labels is None:
        labels = reader.parse(skip=frozenset(Path(p) for p, _ in bad))
        if cache:
            _write_cache(cache_file, key, labels)
    labels.bad_images = list(bad)
    if keep_classes is not None:
        labels = labels.keep_classes(keep_classes)
    fixed = any(labels.stats.get(k) for k in ("clipped", "zero_area", "outside", "size_mismatch"))
    log.log(logging.WARNING if fixed else logging.INFO, "%s", labels.summary())
    return labels


# --------------------------------------------------------------------------------------------
# torch dataset


def read_image(path: str) -> np.ndarray:
    """``[H, W, 3]`` uint8 BGR; a file that does not decode raises :class:`DatasetError` naming it."""
    img = cv2.imread(path, cv2.IMREAD_COLOR)
    if img is None:
        raise DatasetError(f"{path}: could not decode the image; replace or remove it")
    return img


def boxes_to_original(boxes: np.ndarray | torch.Tensor, ratio: tuple[float, float], pad: tuple[float, float],
                      orig_size: tuple[int, int] | None = None) -> np.ndarray | torch.Tensor:
    """Map ``[n, >=4]`` xyxy boxes from letterboxed to original pixels: ``x = (x' - pad_x) / rx``.

    Columns past 4 (score, class) are kept; with ``orig_size = (h, w)`` boxes are clipped to it."""
    out = boxes.clone() if isinstance(boxes, torch.Tensor) else np.array(boxes, dtype=np.float32, copy=True)
    out[:, [0, 2]] = (out[:, [0, 2]] - pad[0]) / ratio[0]
    out[:, [1, 3]] = (out[:, [1, 3]] - pad[1]) / ratio[1]
    if orig_size is not None:
        h, w = orig_size
        out[:, [0, 2]] = out[:, [0, 2]].clip(0, w)
        out[:, [1, 3]] = out[:, [1, 3]].clip(0, h)
    return out


def preprocess_image(image_bgr: np.ndarray, imgsz: int) -> tuple[torch.Tensor, dict[str, Any]]:
    """One BGR ``[H, W, 3]`` image as the model sees it: ``[3, S, S]`` float in [0, 1] (RGB) and its meta."""
    img, ratio, pad = letterbox(image_bgr, imgsz)
    t = torch.from_numpy(np.ascontiguousarray(img[:, :, ::-1].transpose(2, 0, 1))).float().div_(255)
    return t, {"orig_size": image_bgr.shape[:2], "ratio": ratio, "pad": pad}


class DetectionDataset(torch.utils.data.Dataset):
    """Images and labels of one split, letterboxed to ``imgsz`` (and augmented when ``augment``).

    ``__getitem__`` returns ``(image [3, S, S] uint8 RGB, labels [n, 5] float32 (cls, x1, y1, x2, y2)
    in the S x S frame, meta)`` with meta ``image_id, path, orig_size (h, w), ratio (rx, ry),
    pad (px, py), mosaic``. For a mosaic sample, ratio/pad describe no single image (``mosaic=True``).
    Set ``dataset.mosaic = False`` to switch mosaic off (last epochs); the engine calls
    :meth:`set_epoch` so augmentation depends only on ``(seed, epoch, index)``."""

    def __init__(self, source: str | Path | LabelSet, split: str = "train", imgsz: int = 640, augment: bool = False,
                 hyp: AugmentConfig | None = None, seed: int = 0, class_names: Sequence[str] | None = None,
                 keep_classes: Sequence[str] | None = None, cache: bool = True, cache_images: bool = False):
        if isinstance(source, LabelSet):
            self.labels = source.keep_classes(keep_classes) if keep_classes is not None else source
        else:
            self.labels = load_labels(source, split, class_names, keep_classes, cache)
        if len(self.labels) == 0:
            raise DatasetError(f"{self.labels.source}: split {split!r} has no images")
        if imgsz % 32:
            raise DatasetError(f"imgsz={imgsz} must be a multiple of 32 (the largest stride)")
        self.imgsz, self.augment, self.seed = int(imgsz), bool(augment), int(seed)
        self.hyp = hyp or AugmentConfig()
        self.mosaic = self.augment and self.hyp.mosaic > 0
        self.epoch = 0
        self._images: list[np.ndarray | None] | None = [None] * len(self.labels) if cache_images else None

    @property
    def class_names(self) -> list[str]:
        return self.labels.class_names

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.labels)

    def load_resized(self, index: int) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
        """Image ``index`` (BGR) with its longer side ``imgsz``, its ``[n, 5]`` labels scaled alike, ``(rx, ry)``."""
        rec = self.labels.records[index]
        img = self._images[index] if self._images is not None else None
        if img is None:
            raw = read_image(rec.path)
            if raw.shape[:2] != (rec.height, rec.width):
                raise DatasetError(f"{rec.path}: image is {raw.shape[1]}x{raw.shape[0]} but was indexed as "
                                   f"{rec.width}x{rec.height}; delete the {CACHE_DIR} folder to re-read labels")
            img, _ = resize_long_side(raw, self.imgsz, augment=self.augment)
            if self._images is not None:
                self._images[index] = img
        ratio = (img.shape[1] / rec.width, img.shape[0] / rec.height)
        labels = np.concatenate([rec.classes[:, None].astype(np.float32), rec.boxes], 1)
        return img, scale_labels(labels, ratio), ratio

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        rec = self.labels.records[index]
        img, labels, ratio = self.load_resized(index)
        meta: dict[str, Any] = {"image_id": rec.image_id, "path": rec.path, "orig_size": (rec.height, rec.width),
                                "ratio": ratio, "pad": (0.0, 0.0), "mosaic": False}
        if self.augment:
            rng = sample_rng(self.seed, self.epoch, index)
            use_mosaic = self.mosaic and rng.random() < self.hyp.mosaic
            images, labs = [img], [labels]
            if use_mosaic:
                for j in rng.integers(0, len(self), 3):
                    im_j, lab_j, _ = self.load_resized(int(j))
                    images.append(im_j)
                    labs.append(lab_j)
            else:
                meta["pad"] = ((self.imgsz - img.shape[1]) // 2, (self.imgsz - img.shape[0]) // 2)
            img, labels = augment_train(images, labs, self.imgsz, rng, self.hyp, use_mosaic)
            meta["mosaic"] = use_mosaic
        else:
            img, pad = pad_to_square(img, self.imgsz)
            labels = scale_labels(labels, (1.0, 1.0), pad)
            meta["pad"] = pad
        chw = np.ascontiguousarray(img[:, :, ::-1].transpose(2, 0, 1))  # BGR -> RGB, HWC -> CHW
        return torch.from_numpy(chw), torch.from_numpy(labels.reshape(-1, 5).astype(np.float32)), meta


def collate(samples: list[tuple[torch.Tensor, torch.Tensor, dict]]) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """``(images [B, 3, S, S] float in [0, 1], targets [N, 6] (batch_idx, cls, x1, y1, x2, y2), metas)``."""
    images = torch.stack([s[0] for s in samples]).float().div_(255)
    targets = [torch.cat([torch.full((len(s[1]), 1), float(i)), s[1]], 1) for i, s in enumerate(samples)]
    return images, torch.cat(targets) if targets else torch.zeros(0, 6), [s[2] for s in samples]
