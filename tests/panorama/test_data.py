"""Panorama folders → views / panorama / cameras samples; jitter from sample_rng; errors name the file."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch

from visiontrain.panorama.camera import render_views
from visiontrain.panorama.data import (
    CameraSpec,
    PanoramaDataError,
    PanoramaDataset,
    list_panoramas,
    read_view_images,
    split_panoramas,
)
from visiontrain.panorama.synthetic import write_synthetic_panoramas


@pytest.fixture
def synth(tmp_path):
    write_synthetic_panoramas(tmp_path / "pano", train=4, val=2, size=64, seed=0)
    return tmp_path / "pano"


def test_eval_samples_are_fixed_and_consistent(synth) -> None:
    cam = CameraSpec(view_size=32)
    assert math.isclose(cam.f, 55.0)  # 220 px at 128-pixel views, scaled to 32
    ds = PanoramaDataset(list_panoramas(synth / "val"), pano_size=16, camera=cam, train=False)
    s = ds[0]
    assert s["views"].shape == (4, 3, 32, 32) and s["panorama"].shape == (3, 16, 32)
    assert s["views"].dtype == torch.float32 and -1 <= s["views"].min() and s["views"].max() <= 1
    assert torch.allclose(s["cameras"], torch.from_numpy(cam.fixed()).float())
    ds.set_epoch(3)
    assert torch.equal(ds[0]["views"], s["views"])  # no augmentation in evaluation
    # the views are the panorama as seen by the cameras: re-render from the file at full resolution
    bgr = cv2.imread(str(ds.paths[0]))
    src = torch.from_numpy(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB).astype(np.float32) / 127.5 - 1).permute(2, 0, 1)
    ref, _ = render_views(src[None], s["cameras"][None], 32)
    assert (ref[0].clamp(-1, 1) - s["views"]).abs().max() < 1e-5
    target = cv2.resize(src.permute(1, 2, 0).numpy(), (32, 16), interpolation=cv2.INTER_AREA)
    assert np.abs(s["panorama"].permute(1, 2, 0).numpy() - target).max() < 1e-5


def test_training_jitter_is_per_sample_reproducible_and_bounded(synth) -> None:
    cam = CameraSpec(view_size=32)
    ds = PanoramaDataset(list_panoramas(synth / "train"), pano_size=16, camera=cam, train=True, seed=7)
    a = ds[1]
    b = ds[1]
    assert torch.equal(a["views"], b["views"]) and torch.equal(a["cameras"], b["cameras"])
    ds.set_epoch(1)
    c = ds[1]
    assert not torch.equal(a["cameras"], c["cameras"])
    fixed = torch.from_numpy(cam.fixed()).float()
    cams = torch.stack([ds[i]["cameras"] for i in range(4)])
    ratio_xi = cams[..., 0] / fixed[:, 0]
    ratio_f = cams[..., 1] / fixed[:, 1]
    assert ((ratio_xi >= 0.6 - 1e-6) & (ratio_xi <= 1.4 + 1e-6)).all() and ratio_xi.std() > 0.05
    assert ((ratio_f >= 0.9 - 1e-6) & (ratio_f <= 1.1 + 1e-6)).all()
    rot = (cams[..., 2:] - fixed[:, 2:]).abs()
    assert rot.max() <= math.radians(5) + 1e-6 and rot.max() > math.radians(1)
    # another dataset with another seed jitters differently
    other = PanoramaDataset(ds.paths, pano_size=16, camera=cam, train=True, seed=8)
    assert not torch.equal(other[1]["cameras"], a["cameras"])


def test_split_by_subfolders_or_by_hash(tmp_path, synth) -> None:
    train, val = split_panoramas(synth, 0.1)
    assert len(train) == 4 and len(val) == 2
    flat = tmp_path / "flat"
    write_synthetic_panoramas(flat, train=20, val=0, size=16, seed=1)
    train, val = split_panoramas(flat / "train", 0.25)
    assert len(train) + len(val) == 20 and 1 <= len(val) <= 10
    assert not set(train) & set(val)
    assert split_panoramas(flat / "train", 0.25) == (train, val)  # stable
    with pytest.raises(PanoramaDataError, match="val_fraction"):
        split_panoramas(flat / "train", 0.0)


def test_errors_name_the_file(tmp_path) -> None:
    with pytest.raises(PanoramaDataError, match="no such folder"):
        list_panoramas(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PanoramaDataError, match="no images"):
        list_panoramas(tmp_path / "empty")
    square = tmp_path / "square.png"
    cv2.imwrite(str(square), np.zeros((20, 20, 3), np.uint8))
    with pytest.raises(PanoramaDataError, match=r"square\.png: 20×20 is not an equirectangular"):
        PanoramaDataset([square], 16, CameraSpec(view_size=32), train=False)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg at all")
    with pytest.raises(PanoramaDataError, match=r"broken\.jpg: not a readable image"):
        PanoramaDataset([broken], 16, CameraSpec(view_size=32), train=False)
    good = tmp_path / "good.png"
    cv2.imwrite(str(good), np.zeros((16, 32, 3), np.uint8))
    with pytest.raises(PanoramaDataError, match="multiple of 8"):
        PanoramaDataset([good], 12, CameraSpec(view_size=32), train=False)
    with pytest.raises(PanoramaDataError, match="expected 4 images"):
        read_view_images([good], 32)
    with pytest.raises(PanoramaDataError, match=r"good\.png: 32×16 is not a square"):
        read_view_images([good] * 4, 32)
