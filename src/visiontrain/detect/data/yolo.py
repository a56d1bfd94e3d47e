"""The YOLO layout reader.

``data.yaml`` (``path``, ``train``/``val``/``test`` = image folders or ``.txt`` lists of images, ``names``)
with ``images/…`` and ``labels/….txt``: one ``cls cx cy w h`` line per box, normalised to the image size.
With ``obb=True`` the lines are Ultralytics YOLO-OBB's ``cls x1 y1 … x4 y4`` (corners normalised to the image
size), read into polygons (:mod:`.obb`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import yaml

from visiontrain.detect.data.labels import (
    IMAGE_SUFFIXES,
    DatasetError,
    FixCounter,
    ImageLabels,
    LabelSet,
    check_unique_ids,
    image_size,
    label_lines,
    sanitize_boxes,
    split_aliases,
    yolo_values,
)
from visiontrain.detect.data.obb import finish_polygons, parse_yolo_obb_lines

YAML_NAMES = ("data.yaml", "data.yml", "dataset.yaml")


class YoloReader:
    """One split of a YOLO dataset (``spec``: its ``data.yaml`` or the folder holding it)."""

    layout = "yolo"

    def __init__(self, spec: Path, split: str, class_names: Sequence[str] | None, obb: bool = False):
        self.obb = obb
        yaml_path = spec if spec.is_file() else next(
            (spec / n for n in YAML_NAMES if (spec / n).is_file()), spec / "data.yaml")
        self.yaml_path, self.split, self.cache_dir = yaml_path, split, yaml_path.parent
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
            raise DatasetError(f"{yaml_path}: declares classes {self.class_names}, but names={list(class_names)} "
                               f"was given; drop names= (data.yaml's are used) or fix data.yaml")
        if "nc" in cfg and int(cfg["nc"]) != len(self.class_names):
            raise DatasetError(f"{yaml_path}: nc={cfg['nc']} but 'names' has {len(self.class_names)} entries")
        base = Path(cfg.get("path") or yaml_path.parent)
        self.root = base if base.is_absolute() else (yaml_path.parent / base).resolve()
        aliases = split_aliases(split)
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
        check_unique_ids(images, str(yaml_path))
        self.images = images
        self.labels = [yolo_label_path(p) for p in images]
        self.label_bytes = [lp.read_bytes() if lp.is_file() else None for lp in self.labels]
        self.key_parts = [yaml_path.read_bytes(), *(b"\x00missing" if b is None else b for b in self.label_bytes),
                          *(f"{p.relative_to(self.root)}:{p.stat().st_size}".encode() for p in images)]

    def image_paths(self) -> list[Path]:
        return list(self.images)

    def parse(self, skip: frozenset[Path] = frozenset()) -> LabelSet:
        counter, records = FixCounter(), []
        for img_path, label_path, data in zip(self.images, self.labels, self.label_bytes):
            if img_path in skip:
                continue
            h, w = image_size(img_path)
            if data is None:
                counter.add("missing_label_file", 1, str(label_path))
            if self.obb:
                polys, classes, where = parse_yolo_obb_lines(
                    label_path, data or b"", self.class_names, w, h,
                    f"Fix the label or add the class to 'names' in {self.yaml_path}")
                boxes, classes, polys, diff = finish_polygons(polys, classes, np.zeros(len(classes), bool), w, h,
                                                              counter, where)
                records.append(ImageLabels(str(img_path), img_path.stem, h, w, boxes, classes, polys, diff))
                continue
            rows, where = self._rows(label_path, data or b"")
            arr = np.array(rows, np.float64).reshape(-1, 5)
            cx, cy, bw, bh = arr[:, 1] * w, arr[:, 2] * h, arr[:, 3] * w, arr[:, 4] * h
            boxes = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], 1)
            boxes, classes = sanitize_boxes(boxes, arr[:, 0].astype(np.int64), w, h, counter, where)
            records.append(ImageLabels(str(img_path), img_path.stem, h, w, boxes, classes))
        return LabelSet(records, self.class_names, self.layout, self.split, str(self.yaml_path), counter.as_dict())

    def _rows(self, label_path: Path, data: bytes) -> tuple[list[list[float]], list[str]]:
        """The checked ``[cls, cx, cy, w, h]`` rows of one label file and where each comes from."""
        rows, where = [], []
        for at, line, fields in label_lines(label_path, data):
            values = yolo_values(at, line, fields, "class cx cy w h", self.class_names,
                                 f"Fix the label or add the class to 'names' in {self.yaml_path}")
            if values[3] < 0 or values[4] < 0:
                raise DatasetError(f"{at}: negative width or height in {line.strip()!r}")
            rows.append(values)
            where.append(at)
        return rows, where


def yolo_label_path(image: Path) -> Path:
    """``…/images/…/x.jpg`` -> ``…/labels/…/x.txt`` (the last ``images`` component)."""
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return Path(*parts).with_suffix(".txt")
