"""The few-shot split tool of the class-incremental workflow: ``visiontrain split detect``.

::

    visiontrain split detect data=DIR base=A1..A10 shots=10 seed=0 keep_base=false out=DIR2

reads a dataset (any layout :func:`visiontrain.detect.data.load_labels` reads) and writes (with
:func:`write_few_shot_split`; the verb is :func:`visiontrain.detect.cli.split`) a new one in
the MAR20/VOC layout (``JPEGImages/``, ``Annotations/Horizontal Bounding Boxes/*.xml``,
``ImageSets/Main/{train,<val_split>}.txt``) plus ``split.json`` (classes, settings, the chosen images).

Protocol (the usual K-shot detection protocol, Kang et al. 2019 / Wang et al. 2020, on images):

* **Novel classes** are every class not in ``base``. For each novel class in class order, training
  images that contain it are visited in a random order drawn from ``(seed, class index)`` and taken until
  ``shots`` chosen images contain that class. An image is annotated with **all** the novel objects it has,
  so it counts as a shot for every novel class in it; an image that would push another novel class past
  ``shots`` is skipped (when enough others exist), so every novel class ends with exactly ``shots``
  annotated images when the data allow it. Shortfalls (a class in fewer images) and unavoidable excesses
  are reported, never hidden. Same data + same seed → the same split, byte for byte.
* ``keep_base=true`` (joint setting): every training image is kept with its **base** labels; novel labels
  are kept only in the chosen few-shot images (other novel objects stay unlabelled, as in the data the
  teacher was trained on).
* ``keep_base=false`` (class-incremental setting): only the chosen images, with **novel labels only**:
  base objects that happen to be in them are left unlabelled, because a learner that may not see base
  data may not see base annotations either. (This is what makes plain fine-tuning forget: those base
  objects act as background.)
* The validation split is copied whole, every class labelled, so base / novel / all mAP can be measured.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import numpy as np

from visiontrain.config import ConfigError
from visiontrain.detect.data import ImageLabels, LabelSet


@dataclass
class FewShotSelection:
    """Record indices of the chosen training images and, per novel class, the chosen images containing it."""

    chosen: list[int]
    per_class: dict[str, list[str]]  # novel class -> image ids of the chosen images that contain it
    shortfall: dict[str, int]  # novel class -> images available (< shots)
    excess: dict[str, int]  # novel class -> images containing it (> shots)


def select_few_shot(labels: LabelSet, novel: list[str], shots: int, seed: int) -> FewShotSelection:
    """Choose the K-shot images (see the module docstring for the protocol). Deterministic in ``seed``."""
    names = labels.class_names
    novel_idx = [names.index(n) for n in novel]
    contains = [set(np.unique(r.classes).tolist()) & set(novel_idx) for r in labels.records]
    count = dict.fromkeys(novel_idx, 0)
    chosen: list[int] = []
    taken: set[int] = set()

    def take(i: int) -> None:
        chosen.append(i)
        taken.add(i)
        for d in contains[i]:
            count[d] += 1

    shortfall: dict[str, int] = {}
    for c in novel_idx:
        candidates = [i for i, s in enumerate(contains) if c in s and i not in taken]
        order = [candidates[j] for j in np.random.default_rng([seed & 0xFFFFFFFF, c]).permutation(len(candidates))]
        for strict in (True, False):  # first avoid pushing another class past K; then accept it
            for i in order:
                if count[c] >= shots:
                    break
                if i in taken or (strict and any(count[d] >= shots for d in contains[i] if d != c)):
                    continue
                take(i)
        available = sum(c in s for s in contains)
        if available < shots:
            shortfall[names[c]] = available
    chosen.sort()
    per_class = {names[c]: [labels.records[i].image_id for i in chosen if c in contains[i]] for c in novel_idx}
    excess = {n: len(ids) for n, ids in per_class.items() if len(ids) > shots}
    return FewShotSelection(chosen, per_class, shortfall, excess)


def _fmt(v: float) -> str:
    return f"{float(v):.6g}"


def voc_annotation(rec: ImageLabels, boxes: np.ndarray, classes: np.ndarray, names: list[str]) -> str:
    """A Pascal VOC XML for one image (boxes in original pixels, as the VOC reader reads them)."""
    objs = "".join(
        f"  <object>\n    <name>{escape(names[int(c)])}</name>\n    <difficult>0</difficult>\n    <bndbox>\n"
        f"      <xmin>{_fmt(b[0])}</xmin>\n      <ymin>{_fmt(b[1])}</ymin>\n"
        f"      <xmax>{_fmt(b[2])}</xmax>\n      <ymax>{_fmt(b[3])}</ymax>\n    </bndbox>\n  </object>\n"
        for b, c in zip(boxes, classes))
    return (f"<annotation>\n  <filename>{escape(Path(rec.path).name)}</filename>\n"
            f"  <size>\n    <width>{rec.width}</width>\n    <height>{rec.height}</height>\n    <depth>3</depth>\n"
            f"  </size>\n{objs}</annotation>\n")


def _write_split(out: Path, split: str, items: list[tuple[ImageLabels, np.ndarray]], names: list[str],
                 seen: dict[str, str]) -> None:
    """Copy the images of ``items`` (record, kept-label mask) and write their XML and the split list."""
    img_dir, ann_dir = out / "JPEGImages", out / "Annotations" / "Horizontal Bounding Boxes"
    for rec, keep in items:
        if rec.image_id in seen and seen[rec.image_id] != rec.path:
            raise ConfigError(f"image id {rec.image_id!r} is used by both {seen[rec.image_id]} and {rec.path}; the "
                              "VOC layout needs unique file stems across splits. Rename one of them.")
        seen[rec.image_id] = rec.path
        shutil.copyfile(rec.path, img_dir / f"{rec.image_id}{Path(rec.path).suffix.lower()}")
        xml = voc_annotation(rec, rec.boxes[keep], rec.classes[keep], names)
        (ann_dir / f"{rec.image_id}.xml").write_text(xml)
        if rec.polygons is not None:  # oriented labels: MAR20's <robndbox> XML beside the horizontal one
            from visiontrain.detect.synthetic import obb_xml

            obb_dir = out / "Annotations" / "Oriented Bounding Boxes"
            obb_dir.mkdir(parents=True, exist_ok=True)
            labels = [(int(c), 0, 0, 0, 0) for c in rec.classes[keep]]
            (obb_dir / f"{rec.image_id}.xml").write_text(
                obb_xml(Path(rec.path).name, rec.width, rec.height, labels, list(rec.polygons[keep]), tuple(names)))
    (out / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(r.image_id + "\n" for r, _ in items))


def write_few_shot_split(train: LabelSet, val: LabelSet, base: list[str], shots: int, seed: int, keep_base: bool,
                         out: Path, source: str) -> dict[str, Any]:
    """Write the few-shot dataset (see the module docstring) into the empty folder ``out``; returns the
    manifest also written to ``out/split.json``. ``base``: the base class names (the others are novel)."""
    names = list(train.class_names)
    novel = [n for n in names if n not in base]
    sel = select_few_shot(train, novel, shots, seed)
    base_idx = np.array([names.index(n) for n in base], np.int64)
    novel_idx = np.array([names.index(n) for n in novel], np.int64)
    chosen = set(sel.chosen)
    items: list[tuple[ImageLabels, np.ndarray]] = []
    for i, rec in enumerate(train.records):
        is_base, is_novel = np.isin(rec.classes, base_idx), np.isin(rec.classes, novel_idx)
        if i in chosen:
            items.append((rec, (is_base | is_novel) if keep_base else is_novel))
        elif keep_base:
            items.append((rec, is_base))
    for d in ("JPEGImages", "Annotations/Horizontal Bounding Boxes", "ImageSets/Main"):
        (out / d).mkdir(parents=True, exist_ok=True)
    seen: dict[str, str] = {}
    _write_split(out, "train", items, names, seen)
    _write_split(out, val.split, [(r, np.ones(len(r.classes), bool)) for r in val.records], names, seen)

    counts = {n: 0 for n in names}
    for rec, keep in items:
        for c in np.unique(rec.classes[keep]):
            counts[names[int(c)]] += 1
    manifest = {"source": source, "class_names": names, "base": base, "novel": novel, "shots": shots,
                "seed": seed, "keep_base": keep_base, "train_images": len(items), "val_images": len(val.records),
                "few_shot_images": len(sel.chosen), "images_per_class": counts, "novel_shots": sel.per_class,
                "shortfall": sel.shortfall, "excess": sel.excess}
    (out / "split.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest
