"""``load_labels``: one split of a dataset in any supported layout, validated and cached.

The layout is recognised from what is on disk (:func:`detect_layout`) and read by its reader
(:data:`READERS`: layout -> class with ``layout``, ``split``, ``class_names``, ``cache_dir``, ``key_parts``,
``image_paths()`` and ``parse(skip) -> LabelSet``). Validation happens once at load: a listed image that is
missing or not an image, a malformed annotation (file and line), an unknown class (file, line and the
known classes) raise :class:`DatasetError`; boxes crossing the border are clipped, zero-area boxes dropped,
and both are counted in one summary logged per load. An empty label file is a background image. Every
image is also checked for damage (truncated, empty, undecodable) at every load, and all damaged ones are
named in one error or skipped (``bad_images``, see :mod:`visiontrain.detect.image_check`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from visiontrain.detect.data.cache import READER_VERSION, cache_path, content_key, read_cache, write_cache
from visiontrain.detect.data.coco import CocoReader, coco_json_candidates
from visiontrain.detect.data.dota import DotaReader, has_dota_layout
from visiontrain.detect.data.labels import DatasetError, LabelSet
from visiontrain.detect.data.voc import VocReader
from visiontrain.detect.data.yolo import YAML_NAMES, YoloReader
from visiontrain.detect.image_check import screen_images

READERS = {"voc": VocReader, "yolo": YoloReader, "coco": CocoReader, "dota": DotaReader}
OBB_LAYOUTS = ("voc", "yolo", "dota")  # the layouts with oriented annotations (MAR20 robndbox, YOLO-OBB, DOTA)
log = logging.getLogger(__name__)


def detect_layout(source: str | Path) -> str:
    """``"voc"``, ``"yolo"``, ``"coco"`` or ``"dota"`` for a dataset folder, a ``data.yaml`` or a COCO ``.json``."""
    p = Path(source)
    if p.is_file():
        if p.suffix in (".yaml", ".yml"):
            return "yolo"
        if p.suffix == ".json":
            return "coco"
    elif p.is_dir():
        if (p / "JPEGImages").is_dir() and (p / "Annotations").is_dir():
            return "voc"
        if any((p / n).is_file() for n in YAML_NAMES):
            return "yolo"
        if has_dota_layout(p):
            return "dota"
        if ((p / "annotations").is_dir() and any((p / "annotations").glob("*.json"))) or any(
                c.is_file() for s in ("train", "val") for c in coco_json_candidates(p, s)):
            return "coco"
    elif not p.exists():
        raise DatasetError(f"dataset {p} does not exist")
    raise DatasetError(f"{p}: not a known dataset layout. Expected a MAR20/VOC folder (JPEGImages/, Annotations/, "
                       f"ImageSets/Main/), a YOLO data.yaml (or a folder holding one), or a COCO .json "
                       f"(or a folder with train.json/val.json or annotations/*.json).")


def load_labels(source: str | Path, split: str = "train", class_names: Sequence[str] | None = None,
                keep_classes: Sequence[str] | None = None, cache: bool = True, bad_images: str = "raise",
                obb: bool = False) -> LabelSet:
    """Read, validate (and cache) the labels of one split of a dataset in any supported layout.

    ``class_names``: VOC class list (default MAR20's A1..A20), a COCO name order, or for YOLO a check
    against data.yaml (the ``names=`` setting of the verbs). ``keep_classes``: drop the labels of every
    other class (images emptied become background), e.g. the base classes of a class-incremental run.
    ``bad_images``: what to do with damaged image files, ``raise`` | ``skip`` | ``drop``
    (:mod:`visiontrain.detect.image_check`). ``obb``: read the oriented annotations (records get ``polygons``;
    MAR20 robndbox XML, YOLO-OBB txt, DOTA labelTxt; not cached: they are quick to parse). A DOTA folder is
    always read as oriented. Logs one summary line."""
    layout = detect_layout(source)
    source = Path(source).resolve()  # absolute image paths, valid from any working directory
    obb = obb or layout == "dota"
    if obb and layout not in OBB_LAYOUTS:
        raise DatasetError(f"{source}: a {layout} dataset has no oriented boxes; oriented-box models read MAR20 "
                           f"(Annotations/Oriented Bounding Boxes), DOTA (labelTxt) or YOLO-OBB data")
    cache = cache and not obb
    reader = READERS[layout](source, split, class_names, obb=True) if obb else READERS[layout](source, split,
                                                                                             class_names)
    bad = screen_images(reader.image_paths(), bad_images, f"{layout} {split} ({source})", DatasetError)
    # the key names the dataset's absolute root: cached records hold absolute image paths, and a copied or
    # moved dataset must read its own images, not those of the place its cache was written in
    key = content_key([f"v{READER_VERSION}|{layout}|{split}|{reader.class_names}|{source}".encode(),
                       *reader.key_parts, *(f"damaged:{p}".encode() for p, _ in bad)])
    cache_file = cache_path(reader.cache_dir, layout, split)
    labels = read_cache(cache_file, key, layout, split, str(source)) if cache else None
    if labels is None:
        labels = reader.parse(skip=frozenset(Path(p) for p, _ in bad))
        if cache:
            write_cache(cache_file, key, labels)
    labels.bad_images = list(bad)
    if keep_classes is not None:
        labels = labels.keep_classes(keep_classes)
    fixed = any(labels.stats.get(k) for k in ("clipped", "zero_area", "outside", "size_mismatch"))
    log.log(logging.WARNING if fixed else logging.INFO, "%s", labels.summary())
    return labels
