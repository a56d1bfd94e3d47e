"""Damaged panoramas of train and val are all named in one error when the datasets are built."""

from __future__ import annotations

import shutil

import pytest

from visiontrain.config import load_config
from visiontrain.panorama.config import PanoramaTrainConfig
from visiontrain.panorama.data import (
    CameraSpec,
    PanoramaDataError,
    PanoramaDataset,
    check_panorama_file,
    read_view_images,
)
from visiontrain.panorama.synthetic import write_synthetic_panoramas
from visiontrain.panorama.task import PanoramaTask


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    root = tmp_path_factory.mktemp("pano") / "data"
    write_synthetic_panoramas(root, train=4, val=2, size=64, seed=0)  # 64x128 JPEGs: half is past the header
    return root


def _task(root, tmp_path) -> PanoramaTask:
    return PanoramaTask(load_config(PanoramaTrainConfig, None, [
        f"data={root}", f"out={tmp_path / 'run'}", "pano_size=16", "view_size=32", "device=cpu"]))


def test_clean_synthetic_panoramas_pass(clean, tmp_path):
    train, val = _task(clean, tmp_path).build_datasets()
    assert len(train) == 4 and len(val) == 2


def test_one_error_names_every_damaged_panorama_of_train_and_val(clean, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(clean, root)
    half = root / "train" / "00001.jpg"
    half.write_bytes(half.read_bytes()[: half.stat().st_size // 2])
    (root / "train" / "00003.jpg").write_bytes(b"")
    noise = root / "val" / "00000.jpg"
    noise.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(PanoramaDataError) as e:
        _task(root, tmp_path).build_datasets()
    msg = str(e.value)
    lines = [ln.strip() for ln in msg.splitlines()]
    assert lines[0] == "Damaged panoramas (3):" and lines[1] == "train (2):" and lines[4] == "val (1):"
    assert lines[2].startswith(f"{half}: truncated JPEG")
    assert lines[3] == f"{root / 'train' / '00003.jpg'}: empty file (0 bytes)"
    assert lines[5].startswith(f"{noise}: not a readable image")
    assert "00000.jpg" not in "".join(lines[1:4]) and "00002.jpg" not in msg and "val/00001.jpg" not in msg
    # a single file (predict panorama=) is checked the same way
    with pytest.raises(PanoramaDataError, match=r"00001\.jpg: truncated JPEG.*replace it with a valid file"):
        check_panorama_file(half)
    with pytest.raises(PanoramaDataError, match=r"Damaged panoramas \(1\)"):
        PanoramaDataset([half, root / "train" / "00000.jpg"], 16, CameraSpec(view_size=32), train=False)


def test_view_images_are_checked(clean, tmp_path):
    # the files need not be square views here: completeness is checked before anything else
    views = [shutil.copy(clean / "train" / "00000.jpg", tmp_path / f"v{i}.jpg") for i in range(4)]
    cut = tmp_path / "v2.jpg"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    with pytest.raises(PanoramaDataError, match=r"Damaged view images \(1\):\n  .*v2\.jpg: truncated JPEG"):
        read_view_images(views, 32)
