from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from torchvision.datasets._optical_flow import _read_16bits_png_with_flow_and_valid_mask, _read_flo
from torchvision.datasets.utils import _read_pfm

from visiontrain.flow.io import (
    FlowFileError,
    read_flo,
    read_flow,
    read_image,
    read_kitti_png,
    read_pfm,
    read_pfm_flow,
    write_flo,
    write_image,
    write_kitti_png,
    write_pfm,
)


def _random_flow(h=13, w=17, seed=0):
    rng = np.random.default_rng(seed)
    flow = rng.normal(0, 20, (h, w, 2)).astype(np.float32)
    valid = rng.random((h, w)) > 0.3
    return flow, valid


def test_flo_round_trip_with_unknown_values(tmp_path):
    flow, valid = _random_flow()
    path = tmp_path / "a.flo"
    write_flo(path, flow, valid)
    got, got_valid = read_flo(path)
    assert got.dtype == np.float32 and got.shape == (13, 17, 2)
    np.testing.assert_array_equal(got_valid, valid)
    np.testing.assert_array_equal(got[valid], flow[valid])
    assert (got[~valid] == 0).all()
    # torchvision's reader sees the same values (and the 1e10 unknown markers)
    tv = _read_flo(str(path)).transpose(1, 2, 0)
    np.testing.assert_array_equal(tv[valid], flow[valid])
    assert (np.abs(tv[~valid]) >= 1e9).all()


def test_flo_layout_is_middlebury(tmp_path):
    path = tmp_path / "b.flo"
    flow = np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2)
    write_flo(path, flow)
    raw = path.read_bytes()
    assert raw[:4] == b"PIEH"
    assert np.frombuffer(raw, "<i4", 2, 4).tolist() == [3, 2]  # width, height
    np.testing.assert_array_equal(np.frombuffer(raw, "<f4", offset=12), flow.ravel())


def test_flo_unknown_from_other_writers_and_inf(tmp_path):
    flow = np.zeros((2, 2, 2), np.float32)
    flow[0, 0] = [1.5e9, 0]
    flow[1, 1] = [0, -np.inf]
    write_flo(tmp_path / "c.flo", flow)
    _, valid = read_flo(tmp_path / "c.flo")
    assert valid.tolist() == [[False, True], [True, False]]


def test_flo_bad_files_name_the_file(tmp_path):
    flow, _ = _random_flow(4, 5)
    good = tmp_path / "good.flo"
    write_flo(good, flow)
    raw = good.read_bytes()

    bad_magic = tmp_path / "magic.flo"
    bad_magic.write_bytes(b"XXXX" + raw[4:])
    with pytest.raises(FlowFileError, match=r"magic\.flo.*magic"):
        read_flo(bad_magic)

    truncated = tmp_path / "short.flo"
    truncated.write_bytes(raw[:-8])
    with pytest.raises(FlowFileError, match=r"short\.flo.*truncated"):
        read_flo(truncated)

    tiny = tmp_path / "tiny.flo"
    tiny.write_bytes(raw[:6])
    with pytest.raises(FlowFileError, match=r"tiny\.flo.*truncated"):
        read_flo(tiny)

    nan = flow.copy()
    nan[1, 2, 0] = np.nan
    write_flo(tmp_path / "nan.flo", nan)
    with pytest.raises(FlowFileError, match=r"nan\.flo.*1 pixels have NaN"):
        read_flo(tmp_path / "nan.flo")

    with pytest.raises(FlowFileError, match=r"missing\.flo"):
        read_flo(tmp_path / "missing.flo")


def test_kitti_png_round_trip_and_torchvision_oracle(tmp_path):
    rng = np.random.default_rng(1)
    flow = (rng.integers(-400 * 64, 400 * 64, (9, 11, 2)) / 64.0).astype(np.float32)  # exactly representable
    valid = rng.random((9, 11)) > 0.4
    path = tmp_path / "000000_10.png"
    write_kitti_png(path, flow, valid)
    got, got_valid = read_kitti_png(path)
    np.testing.assert_array_equal(got_valid, valid)
    np.testing.assert_array_equal(got[valid], flow[valid])
    assert (got[~valid] == 0).all()
    # channel order: torchvision decodes the PNG itself (RGB) -> must agree with ours (cv2, BGR)
    tv_flow, tv_valid = _read_16bits_png_with_flow_and_valid_mask(str(path))
    np.testing.assert_array_equal(tv_valid, valid)
    np.testing.assert_array_equal(tv_flow.transpose(1, 2, 0)[valid], flow[valid])
    assert read_flow(path)[0].shape == (9, 11, 2)


def test_kitti_png_quantisation_and_range(tmp_path):
    flow, _ = _random_flow(6, 7, seed=3)
    write_kitti_png(tmp_path / "q.png", flow)
    got, valid = read_kitti_png(tmp_path / "q.png")
    assert valid.all()
    assert np.abs(got - flow).max() <= 1 / 128 + 1e-6
    with pytest.raises(ValueError, match="KITTI PNG range"):
        write_kitti_png(tmp_path / "far.png", np.full((2, 2, 2), 600, np.float32))
    cv2.imwrite(str(tmp_path / "rgb8.png"), np.zeros((3, 3, 3), np.uint8))
    with pytest.raises(FlowFileError, match=r"rgb8\.png.*uint16"):
        read_kitti_png(tmp_path / "rgb8.png")


def test_pfm_round_trip_and_torchvision_oracle(tmp_path):
    rng = np.random.default_rng(2)
    data = rng.normal(0, 5, (5, 8, 3)).astype(np.float32)
    path = tmp_path / "f.pfm"
    write_pfm(path, data)
    np.testing.assert_array_equal(read_pfm(path), data)
    tv = _read_pfm(str(path), slice_channels=3).transpose(1, 2, 0)
    np.testing.assert_array_equal(tv, data)
    flow, valid = read_pfm_flow(path)
    np.testing.assert_array_equal(flow, data[..., :2])
    assert valid.all()
    # big-endian files (positive scale) read the same
    be = tmp_path / "be.pfm"
    be.write_bytes(b"PF\n8 5\n1.0\n" + np.ascontiguousarray(data[::-1]).astype(">f4").tobytes())
    np.testing.assert_array_equal(read_pfm(be), data)


def test_pfm_bad_files(tmp_path):
    (tmp_path / "hdr.pfm").write_bytes(b"P6\n2 2\n255\n" + bytes(12))
    with pytest.raises(FlowFileError, match=r"hdr\.pfm.*not a PFM"):
        read_pfm(tmp_path / "hdr.pfm")
    (tmp_path / "short.pfm").write_bytes(b"PF\n4 4\n-1.0\n" + bytes(10))
    with pytest.raises(FlowFileError, match=r"short\.pfm.*truncated"):
        read_pfm(tmp_path / "short.pfm")
    write_pfm(tmp_path / "grey.pfm", np.zeros((3, 3), np.float32))
    with pytest.raises(FlowFileError, match=r"grey\.pfm.*1-channel"):
        read_pfm_flow(tmp_path / "grey.pfm")
    nan = np.zeros((3, 3, 3), np.float32)
    nan[0, 0, 1] = np.nan
    write_pfm(tmp_path / "nan.pfm", nan)
    with pytest.raises(FlowFileError, match=r"nan\.pfm.*NaN"):
        read_pfm_flow(tmp_path / "nan.pfm")


@pytest.mark.parametrize("ext", [".png", ".ppm", ".bmp"])
def test_image_round_trip_rgb_order(tmp_path, ext):
    rng = np.random.default_rng(4)
    image = rng.integers(0, 256, (7, 9, 3)).astype(np.uint8)
    path = tmp_path / f"img{ext}"
    write_image(path, image)
    got = read_image(path)
    assert got.dtype == np.float32 and got.shape == (7, 9, 3)
    np.testing.assert_allclose(got, image / 255.0, atol=1e-7)
    # PIL (torchvision's default loader) agrees on channel order
    from PIL import Image

    np.testing.assert_array_equal(np.asarray(Image.open(path).convert("RGB")), image)


def test_image_grey_16bit_and_corrupt(tmp_path):
    cv2.imwrite(str(tmp_path / "g.png"), np.full((4, 5), 51, np.uint8))
    g = read_image(tmp_path / "g.png")
    assert g.shape == (4, 5, 3) and np.allclose(g, 0.2)
    cv2.imwrite(str(tmp_path / "h.png"), np.full((4, 5, 3), 65535, np.uint16))
    assert np.allclose(read_image(tmp_path / "h.png"), 1.0)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(30))
    with pytest.raises(FlowFileError, match=r"broken\.png.*cannot decode"):
        read_image(tmp_path / "broken.png")
    with pytest.raises(FlowFileError, match=r"nothere\.jpg.*does not exist"):
        read_image(tmp_path / "nothere.jpg")
    with pytest.raises(FlowFileError, match=r"x\.txt.*unknown flow file type"):
        read_flow(tmp_path / "x.txt")


def test_write_flo_rejects_wrong_shape(tmp_path):
    with pytest.raises(ValueError, match=r"\[H, W, 2\]"):
        write_flo(tmp_path / "x.flo", torch.zeros(2, 4, 4).numpy())
