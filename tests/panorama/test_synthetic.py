"""Synthetic panoramas: deterministic by seed, 2:1 JPEGs, varied and geometrically consistent content."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from visiontrain.panorama.synthetic import render_room, write_synthetic_panoramas


def test_files_are_deterministic_by_seed(tmp_path) -> None:
    a = write_synthetic_panoramas(tmp_path / "a", train=3, val=2, size=32, seed=5)
    b = write_synthetic_panoramas(tmp_path / "b", train=3, val=2, size=32, seed=5)
    c = write_synthetic_panoramas(tmp_path / "c", train=3, val=2, size=32, seed=6)
    assert [p.name for p in a["train"]] == ["00000.jpg", "00001.jpg", "00002.jpg"] and len(a["val"]) == 2
    for pa, pb, pc in zip(a["train"] + a["val"], b["train"] + b["val"], c["train"] + c["val"]):
        assert pa.read_bytes() == pb.read_bytes()
        assert pa.read_bytes() != pc.read_bytes()
    img = cv2.imread(str(a["train"][0]))
    assert img.shape == (32, 64, 3)
    # train and val scenes differ, and scenes differ from each other
    imgs = [cv2.imread(str(p)).astype(float) for p in a["train"] + a["val"]]
    assert min(np.abs(x - y).mean() for i, x in enumerate(imgs) for y in imgs[i + 1:]) > 3


def test_room_is_closed_and_continuous_across_the_seam() -> None:
    img = render_room(np.random.default_rng(3), 64)
    assert img.shape == (64, 128, 3) and 0 <= img.min() and img.max() <= 1
    # every pixel hit something (no black holes) and the left and right edges meet (same scene at ±180°)
    assert img.sum(-1).min() > 0.02
    seam = np.abs(img[:, 0] - img[:, -1]).mean()
    inner = np.abs(img[:, 1:] - img[:, :-1]).mean()
    assert seam < 3 * inner + 0.02


def test_bad_arguments(tmp_path) -> None:
    with pytest.raises(ValueError, match="even panorama height"):
        write_synthetic_panoramas(tmp_path, 1, 1, size=7)
    with pytest.raises(ValueError, match="non-negative"):
        write_synthetic_panoramas(tmp_path, -1, 1, size=16)
