from __future__ import annotations

import xml.etree.ElementTree as ET

import cv2
import numpy as np
import pytest

from visiontrain.detect import synthetic
from visiontrain.detect.synthetic import (
    AIRCRAFT,
    MAR20_NAMES,
    aircraft_polygons,
    render_image,
    write_synthetic_mar20,
)


def read_boxes(xml_path):
    root = ET.parse(xml_path).getroot()
    out = []
    for obj in root.iter("object"):
        bb = obj.find("bndbox")
        out.append((obj.findtext("name"), *(int(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))))
    size = root.find("size")
    return out, (int(size.findtext("height")), int(size.findtext("width")))


def test_layout_and_determinism(tmp_path):
    a = write_synthetic_mar20(tmp_path / "a", train=6, val=3, imgsz=128, seed=3)
    b = write_synthetic_mar20(tmp_path / "b", train=6, val=3, imgsz=128, seed=3)
    c = write_synthetic_mar20(tmp_path / "c", train=6, val=3, imgsz=128, seed=4)
    assert (a / "ImageSets/Main/train.txt").read_text().split() == [str(i) for i in range(1, 7)]
    assert (a / "ImageSets/Main/test.txt").read_text().split() == ["7", "8", "9"]
    ann = a / "Annotations" / "Horizontal Bounding Boxes"
    for i in range(1, 10):
        jpg = (a / "JPEGImages" / f"{i}.jpg").read_bytes()
        assert jpg == (b / "JPEGImages" / f"{i}.jpg").read_bytes()
        assert (ann / f"{i}.xml").read_bytes() == (
            b / "Annotations/Horizontal Bounding Boxes" / f"{i}.xml"
        ).read_bytes()
        boxes, size = read_boxes(ann / f"{i}.xml")
        assert size == (128, 128) and cv2.imread(str(a / "JPEGImages" / f"{i}.jpg")).shape == (128, 128, 3)
        assert 1 <= len(boxes) <= 6
        for name, x0, y0, x1, y1 in boxes:
            assert name in MAR20_NAMES and 0 <= x0 < x1 <= 128 and 0 <= y0 < y1 <= 128
    assert (a / "JPEGImages/1.jpg").read_bytes() != (c / "JPEGImages/1.jpg").read_bytes()
    # image k depends on (seed, k) only: a longer set starts with the same images
    d = write_synthetic_mar20(tmp_path / "d", train=2, val=0, imgsz=128, seed=3)
    assert (d / "JPEGImages/2.jpg").read_bytes() == (a / "JPEGImages/2.jpg").read_bytes()


def test_boxes_are_tight_around_drawn_pixels(monkeypatch):
    """On a black ground every drawn pixel lies in some box and every box edge touches drawn pixels."""
    monkeypatch.setattr(synthetic, "_ground", lambda rng, h, w: np.zeros((h, w, 3), np.uint8))
    for k in range(8):
        img, labels = render_image(np.random.default_rng([5, k]), 256, (2, 6))
        drawn = img.max(2) > 0
        covered = np.zeros_like(drawn)
        for _, x0, y0, x1, y1 in labels:
            covered[y0:y1, x0:x1] = True
            box = drawn[y0:y1, x0:x1]
            assert box[0].any() and box[-1].any() and box[:, 0].any() and box[:, -1].any()
        assert not (drawn & ~covered).any()


def test_sizes_counts_and_all_classes():
    sizes, classes, counts = [], set(), []
    for k in range(60):
        _, labels = render_image(np.random.default_rng([1, k]), 320, (2, 6))
        counts.append(len(labels))
        for c, x0, y0, x1, y1 in labels:
            classes.add(c)
            sizes.append(max(x1 - x0, y1 - y0))
    assert classes == set(range(20))
    assert min(counts) >= 2 and max(counts) <= 6 and np.mean(counts) > 3
    assert 22 <= min(sizes) and max(sizes) <= 100 and 40 <= np.median(sizes) <= 70


def test_silhouettes_differ():
    """Any two designs, drawn upright at the same scale, overlap with IoU < 0.8."""
    masks = []
    for d in AIRCRAFT:
        m = np.zeros((160, 160), np.uint8)
        body, engines = aircraft_polygons(d)
        cv2.fillPoly(m, [np.round(p * 60 * d.size + 80).astype(np.int32) for p in body + engines], 1)
        masks.append(m.astype(bool))
    for i in range(20):
        for j in range(i + 1, 20):
            iou = (masks[i] & masks[j]).sum() / (masks[i] | masks[j]).sum()
            assert iou < 0.8, (MAR20_NAMES[i], MAR20_NAMES[j], iou)


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        (dict(objects=(3, 2)), "objects"),
        (dict(imgsz=32), "imgsz"),
        (dict(train=-1), "train"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        write_synthetic_mar20(tmp_path, **{"train": 1, "val": 1, **kwargs})
