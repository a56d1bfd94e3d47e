"""The MAR20 / Pascal VOC layout reader.

::

    root/JPEGImages/<id>.jpg
    root/Annotations/Horizontal Bounding Boxes/<id>.xml      (MAR20; or root/Annotations/<id>.xml)
    root/ImageSets/Main/{train,val,test}.txt                  (one image id per line)

Boxes are read as continuous pixel coordinates as written (no 1-based shift). Class names default to
MAR20's ``A1``…``A20``; other VOC datasets give theirs (``names=[...]``). With ``obb=True`` the reader takes
MAR20's ``Annotations/Oriented Bounding Boxes/<id>.xml`` instead (``<robndbox>`` four corners, see
:mod:`.obb`), giving polygons too.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
import xml.parsers.expat
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from visiontrain.detect.data.labels import (
    DatasetError,
    FixCounter,
    ImageLabels,
    LabelSet,
    image_size,
    list_images,
    sanitize_boxes,
    split_aliases,
    unknown_class,
)
from visiontrain.detect.data.obb import check_polygon, finish_polygons, parse_robndbox
from visiontrain.detect.synthetic import MAR20_NAMES


class VocReader:
    """One split of a MAR20/VOC folder: checks the split list and files at construction, parses on :meth:`parse`."""

    layout = "voc"

    def __init__(self, root: Path, split: str, class_names: Sequence[str] | None, obb: bool = False):
        self.root, self.split, self.cache_dir, self.obb = root, split, root, obb
        self.class_names = list(class_names) if class_names else list(MAR20_NAMES)
        sets = root / "ImageSets" / "Main"
        aliases = split_aliases(split)
        split_file = next((sets / f"{a}.txt" for a in aliases if (sets / f"{a}.txt").is_file()), None)
        if split_file is None:
            have = sorted(p.name for p in sets.glob("*.txt")) if sets.is_dir() else []
            raise DatasetError(f"{sets}: no split list for {split!r} (looked for {[a + '.txt' for a in aliases]}; "
                               f"found {have}). Write the image ids of the split there, one per line.")
        self.split_file = split_file
        ann = root / "Annotations" / "Horizontal Bounding Boxes"
        self.ann_dir = ann if ann.is_dir() else root / "Annotations"
        if obb:
            self.ann_dir = root / "Annotations" / "Oriented Bounding Boxes"
            if not self.ann_dir.is_dir():
                raise DatasetError(f"{self.ann_dir}: missing; oriented-box models need MAR20's oriented annotations "
                                   f"(<robndbox> XML files) there")
        images = list_images(root / "JPEGImages")
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
        counter, records = FixCounter(), []
        for (image_id, img_path, xml_path), data in zip(self.items, self.xml_bytes):
            if img_path in skip:
                continue
            h, w = image_size(img_path)
            if self.obb:
                polys, classes, difficult, where, size = parse_obb_xml(xml_path, data, self.class_names)
            else:
                boxes, classes, where, size = parse_voc_xml(xml_path, data, self.class_names)
            if size is not None and size != (h, w) and size != (0, 0):
                counter.add("size_mismatch", 1, f"{xml_path} says {size[1]}x{size[0]}, image is {w}x{h}")
            if self.obb:
                boxes, classes, polys, difficult = finish_polygons(polys, classes, difficult, w, h, counter, where)
                records.append(ImageLabels(str(img_path), image_id, h, w, boxes, classes, polys, difficult))
                continue
            boxes, classes = sanitize_boxes(boxes, classes, w, h, counter, where)
            records.append(ImageLabels(str(img_path), image_id, h, w, boxes, classes))
        return LabelSet(records, self.class_names, self.layout, self.split, str(self.root), counter.as_dict())


def parse_xml(path: Path, data: bytes) -> tuple[ET.Element, dict[int, int]]:
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


def _stated_size(path: Path, root: ET.Element, lines: dict[int, int]) -> tuple[int, int] | None:
    size_el = root.find("size")
    if size_el is None:
        return None
    try:
        return int(float(size_el.findtext("height", "0"))), int(float(size_el.findtext("width", "0")))
    except ValueError:
        raise DatasetError(f"{path} line {lines[id(size_el)]}: <size> width/height are not numbers") from None


def parse_obb_xml(path: Path, data: bytes, class_names: list[str]
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str], tuple[int, int] | None]:
    """MAR20 oriented XML: ``polygons [n, 4, 2]``, ``classes [n]``, ``difficult [n]``, ``where`` and the stated size."""
    root, lines = parse_xml(path, data)
    index = {n: i for i, n in enumerate(class_names)}
    polys, classes, diff, where = [], [], [], []
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        if not name:
            raise DatasetError(f"{path} line {lines[id(obj)]}: <object> without a <name>")
        if name not in index:
            raise unknown_class(f"{path} line {lines[id(obj.find('name'))]}", name, class_names)
        values, at = parse_robndbox(path, obj, lines, name)
        polys.append(check_polygon(values, at))
        classes.append(index[name])
        diff.append((obj.findtext("difficult") or "0").strip() == "1")
        where.append(at)
    return (np.array(polys, np.float64).reshape(-1, 4, 2), np.array(classes, np.int64), np.array(diff, bool), where,
            _stated_size(path, root, lines))


def parse_voc_xml(path: Path, data: bytes, class_names: list[str]
                  ) -> tuple[np.ndarray, np.ndarray, list[str], tuple[int, int] | None]:
    """``boxes [n, 4]``, ``classes [n]``, ``where`` per box and the stated ``(h, w)`` of one VOC file."""
    root, lines = parse_xml(path, data)
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
            raise unknown_class(f"{path} line {lines[id(obj.find('name'))]}", name, class_names)
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
