"""Oriented-box data: MAR20 robndbox XML, DOTA labelTxt and YOLO-OBB readers with file-and-line errors, the
synthetic set's oriented boxes, and augmentation that moves corners exactly (flips, rotation, scale, mosaic)."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch

from visiontrain.detect import augment
from visiontrain.detect.augment import AugmentConfig, augment_train
from visiontrain.detect.data import DatasetError, DetectionDataset, collate_obb, load_labels
from visiontrain.detect.obb.geometry import xywhr_to_corners
from visiontrain.detect.synthetic import (
    AIRCRAFT,
    aircraft_polygons,
    oriented_box,
    render_image,
    write_synthetic_mar20,
)


def write_image(path, h=100, w=120):
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((h, w, 3), 90, np.uint8))


def mar20_obb(tmp_path, objects: str):
    root = tmp_path / "mar20"
    write_image(root / "JPEGImages" / "1.jpg")
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "train.txt").write_text("1\n")
    for kind in ("Horizontal", "Oriented"):
        d = root / "Annotations" / f"{kind} Bounding Boxes"
        d.mkdir(parents=True)
        (d / "1.xml").write_text(f"<annotation>\n{objects}</annotation>\n")
    return root


def robndbox(name, c):
    keys = ("left_top", "right_top", "right_bottom", "left_bottom")
    inner = "".join(f"<x_{k}>{x}</x_{k}><y_{k}>{y}</y_{k}>" for k, (x, y) in zip(keys, c))
    return f"<object>\n<name>{name}</name>\n<robndbox>{inner}</robndbox>\n</object>\n"


def test_mar20_oriented_reader(tmp_path):
    c1 = [(10, 20), (50, 10), (55, 30), (15, 40)]
    root = mar20_obb(tmp_path, robndbox("A3", c1) + robndbox("A1", [(0, 0), (5, 0), (5, 0), (0, 0)]))
    labels = load_labels(root, "train", obb=True)
    r = labels.records[0]
    assert r.classes.tolist() == [2] and labels.stats["zero_area"] == 1  # the degenerate one dropped, counted
    assert np.allclose(r.polygons[0], c1) and np.allclose(r.boxes[0], [10, 10, 55, 40])


@pytest.mark.parametrize("corners, msg", [
    ([(10, 20), (50, 10), (15, 40), (55, 30)], "not in order"),  # bow tie
    ([(10, 20), (50, 10), (55, 30), (15, "x")], "<y_left_bottom> is 'x'"),
])
def test_mar20_bad_polygon_names_file_and_line(tmp_path, corners, msg):
    root = mar20_obb(tmp_path, robndbox("A1", [(1, 1), (9, 1), (9, 9), (1, 9)]) + robndbox("A2", corners))
    with pytest.raises(DatasetError, match=rf"1\.xml line 8: .*{msg}"):
        load_labels(root, "train", obb=True)


def test_dota_reader(tmp_path):
    root = tmp_path / "dota"
    write_image(root / "train" / "images" / "P0001.png")
    write_image(root / "train" / "images" / "P0002.png")  # no label file: background
    (root / "train" / "labelTxt").mkdir(parents=True)
    (root / "train" / "labelTxt" / "P0001.txt").write_text(
        "imagesource:GoogleEarth\ngsd:0.146\n10 10 40 10 40 30 10 30 plane 0\n60 60 90 70 85 85 55 75 ship 1\n")
    labels = load_labels(root, "train")
    r = {x.image_id: x for x in labels.records}
    assert labels.layout == "dota" and r["P0001"].classes.tolist() == [0, 1]
    assert r["P0001"].difficult.tolist() == [False, True] and len(r["P0002"].classes) == 0
    (root / "train" / "labelTxt" / "P0001.txt").write_text("10 10 40 10 40 30 10 30 plane 0\n1 2 3 car 0\n")
    with pytest.raises(DatasetError, match=r"P0001\.txt line 2: expected"):
        load_labels(root, "train")
    (root / "train" / "labelTxt" / "P0001.txt").write_text("10 10 40 10 40 30 10 30 tank 0\n")
    with pytest.raises(DatasetError, match=r"P0001\.txt line 1: unknown class 'tank'"):
        load_labels(root, "train")


def test_yolo_obb_reader(tmp_path):
    root = tmp_path / "yolo"
    write_image(root / "images" / "train" / "a.jpg", h=100, w=200)
    (root / "labels" / "train").mkdir(parents=True)
    (root / "labels" / "train" / "a.txt").write_text("1 0.1 0.1 0.3 0.1 0.3 0.4 0.1 0.4\n")
    (root / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/train\nnames: [x, y]\n")
    r = load_labels(root, "train", obb=True).records[0]
    assert r.classes.tolist() == [1] and np.allclose(r.polygons[0], [[20, 10], [60, 10], [60, 40], [20, 40]])
    (root / "labels" / "train" / "a.txt").write_text("1 0.1 0.1 0.3 0.1 0.3 0.4 0.1\n")
    with pytest.raises(DatasetError, match=r"a\.txt line 1: expected 9 values"):
        load_labels(root, "train", obb=True)


def test_synthetic_oriented_boxes_are_tight_around_the_silhouette():
    rng = np.random.default_rng([0, 5])
    corners: list[np.ndarray] = []
    img, labels = render_image(rng, 320, (3, 5), corners)
    assert len(corners) == len(labels) >= 3
    for (_, x0, y0, x1, y1), c in zip(labels, corners):
        lo, hi = c.min(0), c.max(0)  # the oriented box's bounds contain the drawn pixels' bounds (±1 px rounding)
        assert lo[0] <= x0 + 1 and lo[1] <= y0 + 1 and hi[0] >= x1 - 1 and hi[1] >= y1 - 1
    # from the pose: every vertex of the silhouette lies inside, and each side touches one (0.5 px margin)
    for k, design in enumerate(AIRCRAFT[:20:3]):
        body, engines = aircraft_polygons(design)
        ang, length, cx, cy = 0.3 + k, 60.0, 100.0, 80.0
        c = oriented_box(body, engines, length, ang, cx, cy)
        rot = np.array([[math.cos(ang), -math.sin(ang)], [math.sin(ang), math.cos(ang)]]) * length
        pts = np.concatenate(body + engines) @ rot.T + [cx + 0.5, cy + 0.5]  # pixel-centre convention
        u = (c[1] - c[0]) / np.linalg.norm(c[1] - c[0])
        v = (c[3] - c[0]) / np.linalg.norm(c[3] - c[0])
        a, b = (pts - c[0]) @ u, (pts - c[0]) @ v
        for proj, side in ((a, np.linalg.norm(c[1] - c[0])), (b, np.linalg.norm(c[3] - c[0]))):
            assert proj.min() == pytest.approx(0.5, abs=1e-6) and proj.max() == pytest.approx(side - 0.5, abs=1e-6)


def test_synthetic_set_reads_as_oriented(tmp_path):
    root = write_synthetic_mar20(tmp_path / "s", train=3, val=1, imgsz=128)
    ds = DetectionDataset(root, "train", 128, augment=True, obb=True, seed=1)
    images, targets, _ = collate_obb([ds[i] for i in range(3)])
    assert targets.shape[1] == 7 and len(targets) > 3
    assert (targets[:, 4] >= targets[:, 5]).all()


def rotated_scene(rng, size, n, first_class=0):
    """``[n, 9]`` labels of rotated rectangles well inside a ``size`` image, apart from each other."""
    out = []
    for k in range(n):
        cx, cy = (k % 2 + 0.5) * size / 2 + rng.uniform(-5, 5), (k // 2 + 0.5) * size / 2 + rng.uniform(-5, 5)
        rb = np.array([cx, cy, rng.uniform(20, 40), rng.uniform(8, 16), rng.uniform(0, math.pi)])
        out.append(np.concatenate([[first_class + k], xywhr_to_corners(rb).reshape(-1)]))
    return np.array(out, np.float32)


def paint(size, labels, only=None):
    img = np.zeros((size, size, 3), np.uint8)
    for k, lab in enumerate(labels):
        if only is None or k == only:
            pts = np.round((lab[1:].reshape(4, 2) - 0.5) * 16).astype(np.int32)  # continuous -> cv2, 4 bits
            cv2.fillPoly(img, [pts], (255, 255, 255), shift=4)
    return img


def polygon_mask(size, corners):
    m = np.zeros((size, size), np.uint8)
    cv2.fillPoly(m, [np.round((corners.reshape(4, 2) - 0.5) * 16).astype(np.int32)], 1, shift=4)
    return m.astype(bool)


@pytest.mark.parametrize("mosaic", [False, True])
def test_augmentation_moves_corners_exactly(monkeypatch, mosaic):
    monkeypatch.setattr(augment, "PAD_VALUE", 0)
    size = 160
    cfg = AugmentConfig(degrees=40, scale=0.3, shear=0.0, translate=0.1, fliplr=0.5, flipud=0.5, hsv_h=0, hsv_s=0,
                        hsv_v=0)
    rng = np.random.default_rng(2)
    scenes = [rotated_scene(rng, size, 4, 4 * i) for i in range(4 if mosaic else 1)]
    seed = 11
    _, out = augment_train([paint(size, s) for s in scenes], scenes, size, np.random.default_rng(seed), cfg, mosaic)
    assert len(out) >= 3
    checked = 0
    for lab in out:
        scene_k, k = divmod(int(lab[0]), 4)  # class = 4 * scene + index in the scene
        images = [paint(size, s, only=k if i == scene_k else -1) for i, s in enumerate(scenes)]
        img, _ = augment_train(images, scenes, size, np.random.default_rng(seed), cfg, mosaic)
        white = img[..., 0] > 127
        poly = polygon_mask(size, lab[1:])
        if not (white.sum() > 50 and poly.sum() > 50) or white[[0, -1]].any() or white[:, [0, -1]].any():
            continue  # cut by the border or another scene's object of the same class
        iou = (white & poly).sum() / (white | poly).sum()
        assert iou > 0.75, iou  # thin boxes: a boundary pixel weighs a lot; the centroid below is the sharp test
        ys, xs = np.nonzero(white)
        assert np.allclose([xs.mean() + 0.5, ys.mean() + 0.5], lab[1:].reshape(4, 2).mean(0), atol=0.6)
        checked += 1
    assert checked >= 2


def test_collate_obb_rectangles():
    c = xywhr_to_corners(np.array([[50.0, 40, 30, 10, 0.4], [20, 20, 8, 16, 0.0]]))
    samples = [(torch.zeros(3, 32, 32, dtype=torch.uint8), torch.from_numpy(np.concatenate(
        [[[0.0], [1.0]], c.reshape(2, 8)], 1)).float(), {})]
    _, t, _ = collate_obb(samples)
    assert torch.allclose(t[0, 2:], torch.tensor([50.0, 40, 30, 10, 0.4]), atol=1e-4)
    assert torch.allclose(t[1, 2:], torch.tensor([20.0, 20, 16, 8, math.pi / 2]), atol=1e-4)
