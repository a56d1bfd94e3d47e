"""The DOTA layout reader (oriented boxes).

::

    root/<split>/images/<id>.png
    root/<split>/labelTxt/<id>.txt     ("x1 y1 x2 y2 x3 y3 x4 y4 class difficult" per line, pixels)

(``root/images`` + ``root/labelTxt`` without split folders is read for every split.) Class names default to
DOTA v1.0's fifteen (:data:`~visiontrain.detect.data.obb.DOTA_NAMES`); an image without a label file is a
background image, counted. Labels are polygons (see :mod:`.obb`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from visiontrain.detect.data.labels import (
    DatasetError,
    FixCounter,
    ImageLabels,
    LabelSet,
    image_size,
    list_images,
    split_aliases,
)
from visiontrain.detect.data.obb import DOTA_NAMES, finish_polygons, parse_dota_lines


def dota_split_dir(root: Path, split: str) -> Path | None:
    """The folder holding ``images/`` and ``labelTxt/`` for ``split`` (``None`` if there is none)."""
    for a in split_aliases(split):
        if (root / a / "labelTxt").is_dir():
            return root / a
    return root if (root / "labelTxt").is_dir() else None


class DotaReader:
    """One split of a DOTA folder."""

    layout = "dota"

    def __init__(self, root: Path, split: str, class_names: Sequence[str] | None, obb: bool = True):
        self.root, self.split, self.cache_dir = root, split, root
        self.class_names = list(class_names) if class_names else list(DOTA_NAMES)
        folder = dota_split_dir(root, split)
        if folder is None:
            raise DatasetError(f"{root}: no DOTA split {split!r} (looked for {split_aliases(split)} folders with "
                               f"images/ and labelTxt/)")
        self.images = list(list_images(folder / "images").values())
        if not self.images:
            raise DatasetError(f"{folder / 'images'}: no images")
        self.labels = [folder / "labelTxt" / f"{p.stem}.txt" for p in self.images]
        self.label_bytes = [lp.read_bytes() if lp.is_file() else None for lp in self.labels]
        self.key_parts = [b"\x00missing" if b is None else b for b in self.label_bytes]

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
            polys, classes, diff, where = parse_dota_lines(label_path, data or b"", self.class_names)
            boxes, classes, polys, diff = finish_polygons(polys, classes, diff, w, h, counter, where)
            records.append(ImageLabels(str(img_path), img_path.stem, h, w, boxes, classes, polys, diff))
        return LabelSet(records, self.class_names, self.layout, self.split, str(self.root), counter.as_dict())


def has_dota_layout(p: Path) -> bool:
    return (p / "labelTxt").is_dir() or any((p / s / "labelTxt").is_dir() for s in ("train", "val", "test"))

