"""The COCO layout reader.

One ``.json`` per split (``images``, ``annotations``, ``categories``), found as

* the file itself (``data=train.json``; the split name is then not used: that file is the split),
* ``<root>/annotations/instances_<split>.json``, ``<root>/annotations/<split>.json`` or
  ``<root>/<split>.json`` for a folder (``train2017``/``val2017`` names too; a ``val`` split falls back
  to ``test`` and back).

Images are looked up under ``images/<split>/``, ``<split>/``, ``images/``, the root or next to the json.
``iscrowd`` objects are skipped (and counted). Classes are the categories ordered by id, unless
``names=[...]`` gives the order.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from visiontrain.detect.data.labels import (
    DatasetError,
    FixCounter,
    ImageLabels,
    LabelSet,
    check_unique_ids,
    image_size,
    sanitize_boxes,
    unknown_class,
)


def coco_aliases(split: str) -> list[str]:
    return {"val": ["val", "val2017", "test"], "train": ["train", "train2017"],
            "test": ["test", "val"]}.get(split, [split])


def coco_json_candidates(folder: Path, split: str) -> list[Path]:
    """Where a folder may keep the json of ``split``, in the order they are tried."""
    aliases = coco_aliases(split)
    return ([folder / "annotations" / f"instances_{a}.json" for a in aliases]
            + [folder / "annotations" / f"{a}.json" for a in aliases] + [folder / f"{a}.json" for a in aliases])


class CocoReader:
    """One split of a COCO dataset (``spec``: a ``.json`` file or a folder holding them)."""

    layout = "coco"

    def __init__(self, spec: Path, split: str, class_names: Sequence[str] | None):
        self.split = split
        aliases = coco_aliases(split)
        if spec.is_file():
            json_path, root = spec, spec.parent.parent if spec.parent.name == "annotations" else spec.parent
            stem = spec.stem.removeprefix("instances_")
            aliases = [stem] + [a for a in aliases if a != stem]
        else:
            root = spec
            cands = coco_json_candidates(spec, split)
            json_path = next((c for c in cands if c.is_file()), None)
            if json_path is None:
                raise DatasetError(f"{spec}: no COCO json for split {split!r} (looked for {[str(c) for c in cands]})")
        self.json_path, self.root, self.cache_dir = json_path, root, root
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
        check_unique_ids([p for _, p in self.images], str(json_path))
        self.key_parts = [self.json_bytes, *(f"{p}:{p.stat().st_size}".encode() for _, p in self.images)]

    def image_paths(self) -> list[Path]:
        return [p for _, p in self.images]

    def parse(self, skip: frozenset[Path] = frozenset()) -> LabelSet:
        counter, jp = FixCounter(), self.json_path
        per_image = self._boxes_per_image(counter)
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

    def _boxes_per_image(self, counter: FixCounter) -> dict[Any, list[tuple[list[float], int, str]]]:
        """``image id -> [(xyxy, class index, where)]`` from the checked annotations."""
        jp = self.json_path
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
                    raise unknown_class(at, f"category_id {cat!r}" + (f" ({cat_names[cat]})" if cat in cat_names
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
        return per_image
