"""visiontrain.filecheck: complete images pass, damaged ones are named with a reason."""

from __future__ import annotations

import os

import cv2
import numpy as np
import pytest
from PIL import ImageFile

from visiontrain.detect.synthetic import write_synthetic_mar20
from visiontrain.filecheck import (
    check_files,
    check_image_file,
    check_image_files,
    format_bad_files,
)
from visiontrain.flow.synthetic import write_synthetic_chairs


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """Files written by the project's generators: JPEG (MAR20), PPM (chairs) and PNG / PGM / BMP / WebP
    re-encodings of one of those images."""
    root = tmp_path_factory.mktemp("filecheck")
    mar = write_synthetic_mar20(root / "mar", train=2, val=0, imgsz=64, seed=0)
    chairs = write_synthetic_chairs(root / "chairs", train=1, val=0, size=(32, 48), seed=0)
    jpg = mar / "JPEGImages" / "1.jpg"
    img = cv2.imread(str(jpg))
    files = {"jpg": jpg, "ppm": chairs / "data" / "00001_img1.ppm"}
    for ext, data in (("png", img), ("pgm", img[..., 0]), ("bmp", img), ("webp", img), ("tif", img)):
        files[ext] = root / f"x.{ext}"
        assert cv2.imwrite(str(files[ext]), data)
    files["png16"] = root / "x16.png"
    assert cv2.imwrite(str(files["png16"]), img.astype(np.uint16) * 257)
    files["ppm16"] = root / "x16.ppm"
    assert cv2.imwrite(str(files["ppm16"]), img.astype(np.uint16) * 257)
    return files


def _copy(src, dst, cut: float | None = None, extra: bytes = b""):
    data = src.read_bytes()
    dst.write_bytes((data[: int(len(data) * cut)] if cut is not None else data) + extra)
    return dst


def test_complete_images_pass(real):
    for name, path in real.items():
        assert check_image_file(path) is None, name
        assert check_image_file(path, decode=True) is None, name


@pytest.mark.parametrize("name", ["jpg", "png", "png16", "ppm", "ppm16", "pgm", "bmp"])
def test_half_a_file_is_damaged(real, tmp_path, name):
    bad = _copy(real[name], tmp_path / f"half{real[name].suffix}", cut=0.5)
    reason = check_image_file(bad)
    assert reason is not None
    assert "truncated" in reason, reason


def test_reasons_say_what_is_wrong(real, tmp_path):
    jpg = _copy(real["jpg"], tmp_path / "half.jpg", cut=0.5)
    assert "end-of-image marker FF D9" in check_image_file(jpg)
    png = _copy(real["png"], tmp_path / "cut.png", cut=0.8)
    assert "IEND" in check_image_file(png)
    ppm = _copy(real["ppm"], tmp_path / "cut.ppm", cut=0.9)
    assert check_image_file(ppm).startswith("truncated P6 image")
    (tmp_path / "empty.jpg").write_bytes(b"")
    assert check_image_file(tmp_path / "empty.jpg") == "empty file (0 bytes)"
    (tmp_path / "noise.jpg").write_bytes(np.random.default_rng(0).bytes(4000))
    assert check_image_file(tmp_path / "noise.jpg").startswith("not a readable image")
    assert check_image_file(tmp_path / "missing.jpg") == "file does not exist"
    assert check_image_file(tmp_path) == "not a regular file"


def test_trailing_bytes_after_a_complete_image_are_accepted(real, tmp_path):
    jpg = _copy(real["jpg"], tmp_path / "trail.jpg", extra=b"\x00" * 64 + b"camera maker notes")
    assert jpg.read_bytes()[-2:] != b"\xff\xd9"
    assert check_image_file(jpg) is None  # the full decode succeeds
    assert check_image_file(_copy(real["png"], tmp_path / "trail.png", extra=b"junk")) is None
    assert check_image_file(_copy(real["ppm"], tmp_path / "trail.ppm", extra=b"\n")) is None
    # only the marker cut off: the decoder runs out of data
    (tmp_path / "cut2.jpg").write_bytes(real["jpg"].read_bytes()[:-2])
    assert "truncated" in check_image_file(tmp_path / "cut2.jpg")


def test_cut_and_zero_filled_to_the_old_length_is_damaged(real, tmp_path):
    for name in ("jpg", "png"):
        data = real[name].read_bytes()
        p = tmp_path / f"zeros{real[name].suffix}"
        p.write_bytes(data[: len(data) // 2] + bytes(len(data) - len(data) // 2))
        assert check_image_file(p) is not None, name


def test_marker_walk_skips_scans_and_stops_at_the_end_marker(real, tmp_path):
    from PIL import Image

    prog = tmp_path / "progressive.jpg"
    Image.open(real["jpg"]).save(prog, progressive=True, quality=90)  # several scans (SOS markers)
    assert check_image_file(_copy(prog, tmp_path / "p_trail.jpg", extra=b"\xff\xda\x00\x04junk")) is None
    assert check_image_file(_copy(prog, tmp_path / "p_half.jpg", cut=0.6)).startswith("truncated JPEG")
    assert check_image_file(_copy(real["jpg"], tmp_path / "trail.jpg", extra=b"\xff\xda" * 8)) is None


def test_truncated_images_are_found_even_when_pil_is_told_to_accept_them(real, tmp_path):
    bad = _copy(real["jpg"], tmp_path / "half.jpg", cut=0.5)
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        assert check_image_file(bad) is not None
        assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = False


def test_check_many_in_threads_keeps_order_and_names_only_bad_files(real, tmp_path):
    good = [_copy(real["jpg"], tmp_path / f"g{i}.jpg") for i in range(60)]
    bad = [_copy(real["jpg"], tmp_path / "b1.jpg", cut=0.5), _copy(real["png"], tmp_path / "b2.png", cut=0.3)]
    (tmp_path / "b3.jpg").write_bytes(b"")
    bad.append(tmp_path / "b3.jpg")
    paths = good[:30] + [bad[0]] + good[30:] + bad[1:] + [bad[0]]  # a path listed twice is checked once
    found = check_image_files(paths, workers=4, progress=False)
    assert [p for p, _ in found] == [str(b) for b in bad]
    assert check_image_files(good, workers=1) == []
    assert check_files(["a", "bb"], check=lambda p: "long" if len(p) > 1 else None) == [("bb", "long")]


def test_format_names_every_file_and_the_fix():
    bad = [("/d/a.jpg", "empty file (0 bytes)"), ("/d/b.png", "truncated")]
    msg = format_bad_files(bad, "images", "Replace or remove them.")
    assert msg.splitlines() == ["Damaged images (2):", "  /d/a.jpg: empty file (0 bytes)", "  /d/b.png: truncated",
                                "Replace or remove them."]
    msg = format_bad_files([], "images", "Fix.", groups=[("train", bad[:1]), ("val", []), ("test", bad[1:])])
    assert msg.splitlines() == ["Damaged images (2):", "  train (1):", "    /d/a.jpg: empty file (0 bytes)",
                                "  test (1):", "    /d/b.png: truncated", "Fix."]


@pytest.mark.skipif(not hasattr(os, "getuid") or os.getuid() == 0, reason="root reads every file")
def test_unreadable_file(real, tmp_path):
    p = _copy(real["jpg"], tmp_path / "locked.jpg")
    p.chmod(0)
    try:
        assert "Permission denied" in check_image_file(p)
    finally:
        p.chmod(0o644)
