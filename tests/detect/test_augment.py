"""Augmentation is exact: a transformed box is the bounding box of the transformed pixels.

Method: draw filled white rectangles on black images, run an augmentation, then for each object run
the *same* augmentation (same generator seed) on images where only that object is drawn, and compare
the returned box with the bounds of the pixels brighter than half-white (within 1 px).
"""

from __future__ import annotations

import numpy as np
import pytest

from visiontrain.detect import augment
from visiontrain.detect.augment import (
    AugmentConfig,
    augment_train,
    flip_lr,
    flip_ud,
    hsv_jitter,
    letterbox,
    random_affine,
    scale_labels,
)

NO_COLOR = dict(hsv_h=0.0, hsv_s=0.0, hsv_v=0.0)


@pytest.fixture
def black_fill(monkeypatch):
    """Pad with black so an object touching a border has a clean 0/255 edge (gray 114 would shift the
    half-white crossing by up to 0.4 px and hide real half-pixel errors)."""
    monkeypatch.setattr(augment, "PAD_VALUE", 0)


def make_scene(rng: np.random.Generator, h: int, w: int, n: int) -> np.ndarray:
    """``[n, 5]`` labels of integer-cornered, non-overlapping rectangles inside ``h x w``."""
    boxes = []
    for _ in range(n * 50):
        if len(boxes) == n:
            break
        bw, bh = rng.integers(6, max(7, w // 3)), rng.integers(6, max(7, h // 3))
        x1, y1 = rng.integers(0, w - bw), rng.integers(0, h - bh)
        b = np.array([x1, y1, x1 + bw, y1 + bh], np.float64)
        if all(b[2] + 2 <= o[0] or o[2] + 2 <= b[0] or b[3] + 2 <= o[1] or o[3] + 2 <= b[1] for o in boxes):
            boxes.append(b)
    cls = np.arange(len(boxes), dtype=np.float32)[:, None]
    return np.concatenate([cls, np.array(boxes, np.float32).reshape(-1, 4)], 1)


def paint(h: int, w: int, labels: np.ndarray, only: int | None = None) -> np.ndarray:
    img = np.zeros((h, w, 3), np.uint8)
    for k, (_, x1, y1, x2, y2) in enumerate(labels):
        if only is None or k == only:
            img[int(y1) : int(y2), int(x1) : int(x2)] = 255
    return img


def pixel_box(img: np.ndarray) -> np.ndarray | None:
    ys, xs = np.nonzero(img[:, :, 0] > 127)
    if len(xs) == 0:
        return None
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float64)


def check_exact(run, scenes: list[tuple[np.ndarray, np.ndarray]], tol: float = 0.51) -> dict[str, int]:
    """``run(images, labels) -> (image, labels)``; labels carry the object id in column 0 (made unique
    across images). Returns counts of kept / dropped / clipped objects."""
    images = [img for img, _ in scenes]
    labels = [lab for _, lab in scenes]
    out_img, out_lab = run(images, labels)
    counts = {"kept": 0, "dropped": 0, "clipped": 0}
    kept = {int(c): row[1:] for c, *_ in out_lab for row in [out_lab[out_lab[:, 0] == c][0]]}
    for s, lab in enumerate(labels):
        for k in range(len(lab)):
            solo = [paint(*img.shape[:2], lb, only=k if j == s else -1) for j, (img, lb) in enumerate(scenes)]
            solo_img, _ = run(solo, labels)
            seen = pixel_box(solo_img)
            oid = int(lab[k, 0])
            if oid in kept:
                counts["kept"] += 1
                assert seen is not None, f"object {oid} kept but not visible"
                np.testing.assert_allclose(kept[oid], seen, atol=tol, err_msg=f"object {oid}")
                s_img = out_img.shape[0]
                counts["clipped"] += int(np.any((kept[oid] <= 0.5) | (kept[oid] >= s_img - 0.5)))
            else:
                counts["dropped"] += 1
                if seen is not None:  # a tiny or mostly cut-off leftover
                    w, h = seen[2] - seen[0], seen[3] - seen[1]
                    area0 = (lab[k, 3] - lab[k, 1]) * (lab[k, 4] - lab[k, 2])
                    small = min(w, h) <= 3 or (solo_img[:, :, 0] > 127).sum() < 0.2 * area0 * 2.25
                    assert small, f"object {oid} dropped but {w}x{h} px of it are visible"
    return counts


def unique_ids(scenes):
    off, out = 0, []
    for img, lab in scenes:
        lab = lab.copy()
        lab[:, 0] += off
        off += len(lab)
        out.append((img, lab))
    return out


def scene(seed: int, h: int, w: int, n: int = 5):
    lab = make_scene(np.random.default_rng(seed), h, w, n)
    return paint(h, w, lab), lab


def test_letterbox_boxes_exact():
    img, lab = scene(0, 90, 160, 6)
    out, ratio, pad = letterbox(img, 128)
    assert out.shape == (128, 128, 3) and pad[0] == 0 and pad[1] > 0
    assert (out[: int(pad[1])] == 114).all() and (out[-int(pad[1]) :] == 114).all()
    boxes = scale_labels(lab, ratio, pad)
    for k in range(len(lab)):
        solo, _, _ = letterbox(paint(90, 160, lab, only=k), 128)
        np.testing.assert_allclose(boxes[k, 1:], pixel_box(solo), atol=0.51)


@pytest.mark.parametrize("seed", range(4))
def test_random_affine_scale_translate_exact(seed, black_fill):
    cfg = AugmentConfig(translate=0.3, scale=0.6, **NO_COLOR)
    scenes = [scene(seed, 96, 96, 6)]

    def run(images, labels):
        return random_affine(images[0], labels[0], 96, np.random.default_rng(100 + seed), cfg)

    counts = check_exact(run, scenes)
    assert counts["kept"] > 0


def test_random_affine_rotation_and_shear_exact_inside(black_fill):
    """Rotated boxes are the bounds of the rotated rectangles (exact while they stay inside)."""
    cfg = AugmentConfig(degrees=30, shear=5, translate=0.0, scale=0.1, **NO_COLOR)
    img = np.zeros((128, 128, 3), np.uint8)
    lab = np.array([[0, 40, 44, 60, 60], [1, 70, 50, 90, 80], [2, 50, 75, 72, 88]], np.float32)
    img = paint(128, 128, lab)

    def run(images, labels):
        return random_affine(images[0], labels[0], 128, np.random.default_rng(7), cfg)

    counts = check_exact(run, [(img, lab)], tol=1.5)
    assert counts == {"kept": 3, "dropped": 0, "clipped": 0}


def test_mosaic_pipeline_exact_with_clipping_and_drops(black_fill):
    """Mosaic + affine + flips on 4 images: kept boxes match their pixels; some are clipped, some dropped."""
    cfg = AugmentConfig(translate=0.2, scale=0.5, fliplr=0.5, flipud=0.5, **NO_COLOR)
    totals = {"kept": 0, "dropped": 0, "clipped": 0}
    for seed in range(3):
        scenes = unique_ids([scene(10 * seed + j, 64 if j % 2 else 48, 64, 5) for j in range(4)])

        def run(images, labels, seed=seed):
            return augment_train(images, labels, 64, np.random.default_rng(seed), cfg, mosaic=True)

        img, _ = run([s[0] for s in scenes], [s[1] for s in scenes])
        assert img.shape == (64, 64, 3)
        for k, v in check_exact(run, scenes).items():
            totals[k] += v
    assert totals["kept"] >= 10 and totals["clipped"] >= 1 and totals["dropped"] >= 1, totals


def test_single_image_pipeline_exact(black_fill):
    cfg = AugmentConfig(translate=0.25, scale=0.5, fliplr=1.0, **NO_COLOR)
    scenes = [scene(5, 48, 64, 6)]

    def run(images, labels):
        return augment_train(images, labels, 64, np.random.default_rng(3), cfg, mosaic=False)

    assert check_exact(run, scenes)["kept"] > 0


def test_flips_exact():
    img, lab = scene(1, 40, 70, 4)
    for flip in (flip_lr, flip_ud):
        out, new = flip(img, lab)
        for k in range(len(lab)):
            solo, _ = flip(paint(40, 70, lab, only=k), lab)
            np.testing.assert_array_equal(new[k, 1:], pixel_box(solo))


def test_hsv_changes_colours_not_geometry_and_zero_gain_is_identity():
    img = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert hsv_jitter(img, np.random.default_rng(0), 0, 0, 0) is img
    a = hsv_jitter(img, np.random.default_rng(1), 0.015, 0.7, 0.4)
    b = hsv_jitter(img, np.random.default_rng(1), 0.015, 0.7, 0.4)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a.astype(int) - img).mean() > 2


def test_deterministic_by_generator_and_no_global_rng():
    cfg = AugmentConfig(degrees=10)
    scenes = unique_ids([scene(j, 64, 64) for j in range(4)])
    imgs, labs = [s[0] for s in scenes], [s[1] for s in scenes]
    np.random.seed(0)
    before = np.random.get_state()[1].copy()
    a = augment_train(imgs, labs, 64, np.random.default_rng(42), cfg, mosaic=True)
    np.random.seed(123)  # global state must not matter
    b = augment_train(imgs, labs, 64, np.random.default_rng(42), cfg, mosaic=True)
    c = augment_train(imgs, labs, 64, np.random.default_rng(43), cfg, mosaic=True)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    np.random.seed(0)
    assert np.array_equal(np.random.get_state()[1], before)


def test_empty_labels_pass_through():
    img = np.zeros((64, 64, 3), np.uint8)
    out, lab = augment_train(
        [img] * 4,
        [np.zeros((0, 5), np.float32)] * 4,
        64,
        np.random.default_rng(0),
        AugmentConfig(),
        mosaic=True,
    )
    assert out.shape == (64, 64, 3) and lab.shape == (0, 5)
