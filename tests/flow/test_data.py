from __future__ import annotations

import numpy as np
import pytest
import torch

from visiontrain.flow.data import (
    FlowDataError,
    collate_flow,
    has_split,
    list_flow_items,
    open_flow_dataset,
    parse_spec,
)
from visiontrain.flow.io import FlowFileError, write_flo, write_image, write_kitti_png, write_pfm
from visiontrain.flow.synth import flow_pair
from visiontrain.flow.synthetic import pair_rng, write_synthetic_chairs

H, W = 24, 32


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (H, W, 3)).astype(np.uint8)


def _flow(seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).integers(-640, 640, (H, W, 2)) / 64).astype(np.float32)


def _check_sample(sample: dict, flow: np.ndarray | None, image1: np.ndarray, valid: np.ndarray | None = None):
    assert set(sample) == {"image1", "image2", "flow", "valid", "id"}
    assert sample["image1"].shape == (3, H, W) and sample["image1"].dtype == torch.float32
    np.testing.assert_allclose(sample["image1"].permute(1, 2, 0).numpy(), image1 / 255.0, atol=1e-6)
    if flow is None:
        assert sample["flow"] is None and sample["valid"] is None
        return
    assert sample["flow"].shape == (2, H, W) and sample["valid"].dtype == torch.bool
    v = np.ones((H, W), bool) if valid is None else valid
    np.testing.assert_array_equal(sample["valid"].numpy(), v)
    np.testing.assert_array_equal(sample["flow"].permute(1, 2, 0).numpy()[v], flow[v])


# ---------------------------------------------------------------------------- torchvision layouts
def test_chairs_dir_itself_or_parent(tmp_path):
    root = write_synthetic_chairs(tmp_path / "FlyingChairs", train=3, val=2, size=(48, 64), seed=0)
    for spec in (f"chairs:{tmp_path}", f"chairs:{root}"):
        train, val = open_flow_dataset(spec, "train"), open_flow_dataset(spec, "val")
        assert len(train) == 3 and len(val) == 2
        assert val.items[0].image1 == root / "data/00004_img1.ppm"
        assert val.items[0].flow == root / "data/00004_flow.flo"
    # a folder with another name works too (torchvision is pointed at it through a temporary link)
    other = write_synthetic_chairs(tmp_path / "mysynth", train=2, val=1, size=(48, 64), seed=0)
    ds = open_flow_dataset(f"chairs:{other}", "val")
    sample = ds[0]
    pair = flow_pair(pair_rng(0, 3), (48, 64))
    np.testing.assert_array_equal(sample["flow"].permute(1, 2, 0).numpy(), pair.flow)
    assert sample["valid"].all() and sample["id"] == "data/00003_img1.ppm"
    assert ds.items[0].image1.exists()  # paths point into the real folder, not the temporary link


def test_chairs_files_out_of_step_are_reported(tmp_path):
    root = write_synthetic_chairs(tmp_path / "FlyingChairs", train=3, val=0, size=(64, 64), seed=0)
    (root / "data/00002_img2.ppm").unlink()
    with pytest.raises(FlowDataError, match="5 .ppm images, 3 .flo flows, 3 lines"):
        open_flow_dataset(f"chairs:{root}")
    (root / "data/00003_img0.ppm").write_bytes((root / "data/00003_img1.ppm").read_bytes())  # a stray file
    with pytest.raises(FlowDataError, match="out of step"):
        open_flow_dataset(f"chairs:{root}")


def _sintel(root, n=3):
    for pass_name in ("clean", "final"):
        for i in range(n):
            write_image(root / f"Sintel/training/{pass_name}/alley_1/frame_{i + 1:04d}.png", _image(i))
    flows = [_flow(10 + i) for i in range(n - 1)]
    for i, f in enumerate(flows):
        write_flo(root / f"Sintel/training/flow/alley_1/frame_{i + 1:04d}.flo", f)
    return flows


def _mkdirs(tmp_path, rels):
    for rel in rels:
        (tmp_path / rel).mkdir(parents=True, exist_ok=True)


def test_sintel_clean_and_final(tmp_path):
    _mkdirs(tmp_path, ["Sintel/training/clean/alley_1", "Sintel/training/final/alley_1",
                       "Sintel/training/flow/alley_1"])
    flows = _sintel(tmp_path)
    for kind in ("sintel-clean", "sintel-final"):
        ds = open_flow_dataset(f"{kind}:{tmp_path}")
        assert len(ds) == 2
        _check_sample(ds[1], flows[1], _image(1))
        assert ds.items[1].image1.parent.parent.name == kind.split("-")[1]
        assert ds[1]["id"].endswith("alley_1/frame_0002.png")
    # the dataset folder itself is accepted as well
    assert len(open_flow_dataset(f"sintel-clean:{tmp_path / 'Sintel'}")) == 2
    assert not has_split(f"sintel-clean:{tmp_path}", "val")
    with pytest.raises(FlowDataError, match="no 'val' split"):
        open_flow_dataset(f"sintel-clean:{tmp_path}", "val")


def test_kitti_sparse_ground_truth(tmp_path):
    _mkdirs(tmp_path, ["KittiFlow/training/image_2", "KittiFlow/training/flow_occ"])
    valid = np.random.default_rng(5).random((H, W)) > 0.6
    flow = _flow(5)
    for i in range(2):
        write_image(tmp_path / f"KittiFlow/training/image_2/00000{i}_10.png", _image(2 * i))
        write_image(tmp_path / f"KittiFlow/training/image_2/00000{i}_11.png", _image(2 * i + 1))
        write_kitti_png(tmp_path / f"KittiFlow/training/flow_occ/00000{i}_10.png", flow, valid)
    ds = open_flow_dataset(f"kitti:{tmp_path}")
    assert len(ds) == 2
    _check_sample(ds[1], flow, _image(2), valid)


def test_things_pfm_and_val_split(tmp_path):
    for split in ("TRAIN", "TEST"):
        seq = f"FlyingThings3D/frames_cleanpass/{split}/A/0000/left"
        _mkdirs(tmp_path, [seq])
        for i in range(3):
            write_image(tmp_path / seq / f"{6 + i:04d}.png", _image(i))
        for direction in ("into_future", "into_past"):
            d = tmp_path / f"FlyingThings3D/optical_flow/{split}/A/0000/{direction}/left"
            d.mkdir(parents=True)
            for i in range(3):
                f = np.dstack([_flow(20 + i), np.zeros((H, W, 1), np.float32)])
                write_pfm(d / f"OpticalFlowInto{'Future' if direction == 'into_future' else 'Past'}_{6 + i:04d}_L.pfm",
                          f)
    train = open_flow_dataset(f"things:{tmp_path}", "train")
    assert len(train) == 4  # 2 future + 2 past
    _check_sample(train[0], _flow(20), _image(0))
    assert has_split(f"things:{tmp_path}", "val") and len(open_flow_dataset(f"things:{tmp_path}", "val")) == 4


def test_hd1k(tmp_path):
    _mkdirs(tmp_path, ["hd1k/hd1k_input/image_2", "hd1k/hd1k_flow_gt/flow_occ"])
    for i in range(3):
        write_image(tmp_path / f"hd1k/hd1k_input/image_2/000000_{i:04d}.png", _image(i))
        write_kitti_png(tmp_path / f"hd1k/hd1k_flow_gt/flow_occ/000000_{i:04d}.png", _flow(30 + i))
    ds = open_flow_dataset(f"hd1k:{tmp_path}")
    assert len(ds) == 2
    _check_sample(ds[0], _flow(30), _image(0))


@pytest.mark.parametrize("kind", ["chairs", "sintel-clean", "sintel-final", "kitti", "things", "hd1k"])
def test_missing_or_empty_dataset_folders_say_what_was_expected(tmp_path, kind):
    with pytest.raises(FlowDataError, match="does not exist.*expected"):
        open_flow_dataset(f"{kind}:{tmp_path / 'nothing'}")
    with pytest.raises(FlowDataError, match="expected"):
        open_flow_dataset(f"{kind}:{tmp_path}")


# ---------------------------------------------------------------------------------- pairs / pair
def test_pairs_folder(tmp_path):
    flows = {}
    for name, ext in (("b", ".png"), ("a", ".jpg"), ("c", ".ppm")):
        img = _image(ord(name))
        write_image(tmp_path / f"{name}_img1{ext}", img)
        write_image(tmp_path / f"{name}_img2{ext}", img)
        flows[name] = _flow(ord(name))
        write_flo(tmp_path / f"{name}_flow.flo", flows[name])
    ds = open_flow_dataset(f"pairs:{tmp_path}")
    assert [it.id for it in ds.items] == ["a", "b", "c"]
    _check_sample(ds[1], flows["b"], _image(ord("b")))
    (tmp_path / "c_flow.flo").unlink()
    with pytest.raises(FlowDataError, match="c_flow.flo is missing"):
        list_flow_items(f"pairs:{tmp_path}")
    (tmp_path / "a_img2.jpg").unlink()
    with pytest.raises(FlowDataError, match="a_img1.jpg has no partner a_img2"):
        list_flow_items(f"pairs:{tmp_path}")


def test_pairs_without_gt_and_errors(tmp_path):
    write_image(tmp_path / "x_img1.png", _image(0))
    write_image(tmp_path / "x_img2.png", _image(1))
    ds = open_flow_dataset(f"pairs:{tmp_path}")
    assert not ds.has_flow
    _check_sample(ds[0], None, _image(0))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FlowDataError, match="no <name>_img1"):
        open_flow_dataset(f"pairs:{empty}")
    with pytest.raises(FlowDataError, match="does not exist"):
        open_flow_dataset(f"pairs:{tmp_path / 'nope'}")


def test_single_pair_and_bad_files(tmp_path):
    write_image(tmp_path / "1.png", _image(0))
    write_image(tmp_path / "2.png", _image(1))
    write_flo(tmp_path / "gt.flo", _flow(0))
    ds = open_flow_dataset(f"pair:{tmp_path / '1.png'},{tmp_path / '2.png'},{tmp_path / 'gt.flo'}")
    _check_sample(ds[0], _flow(0), _image(0))
    assert not open_flow_dataset(f"pair:{tmp_path / '1.png'},{tmp_path / '2.png'}").has_flow
    with pytest.raises(FlowDataError, match="3.png does not exist"):
        open_flow_dataset(f"pair:{tmp_path / '1.png'},{tmp_path / '3.png'}")
    with pytest.raises(FlowDataError, match="2 or 3"):
        open_flow_dataset(f"pair:{tmp_path / '1.png'}")
    # corrupt image and wrong-size flow are reported with the file name when the sample is read
    (tmp_path / "2.png").write_bytes(b"not a png")
    with pytest.raises(FlowFileError, match=r"2\.png.*cannot decode"):
        open_flow_dataset(f"pair:{tmp_path / '1.png'},{tmp_path / '2.png'}")[0]
    write_image(tmp_path / "2.png", _image(1))
    write_flo(tmp_path / "small.flo", np.zeros((5, 5, 2), np.float32))
    with pytest.raises(FlowDataError, match=r"small\.flo is 5×5 \(H×W\) but .*1\.png is 24×32"):
        open_flow_dataset(f"pair:{tmp_path / '1.png'},{tmp_path / '2.png'},{tmp_path / 'small.flo'}")[0]


def test_large_flow_values_are_invalid(tmp_path):
    write_image(tmp_path / "1.png", _image(0))
    write_image(tmp_path / "2.png", _image(1))
    flow = _flow(0)
    flow[3, 4] = [1500.0, 0.0]
    write_flo(tmp_path / "gt.flo", flow)
    s = open_flow_dataset(f"pair:{tmp_path / '1.png'},{tmp_path / '2.png'},{tmp_path / 'gt.flo'}")[0]
    assert not s["valid"][3, 4] and s["valid"].sum() == H * W - 1


def test_bad_spec():
    with pytest.raises(FlowDataError, match="KIND:PATH"):
        parse_spec("flyingchairs:/x")
    with pytest.raises(FlowDataError, match="KIND:PATH"):
        parse_spec("/data/chairs")


# -------------------------------------------------------------------------------------- collate
def _tensor_sample(h, w, flow=True):
    s = {"image1": torch.rand(3, h, w), "image2": torch.rand(3, h, w), "id": f"{h}x{w}",
         "flow": torch.randn(2, h, w) if flow else None, "valid": torch.rand(h, w) > 0.2 if flow else None}
    return s


def test_collate_equal_sizes_stacks():
    samples = [_tensor_sample(8, 12) for _ in range(3)]
    batch = collate_flow(samples)
    assert batch["image1"].shape == (3, 3, 8, 12) and batch["flow"].shape == (3, 2, 8, 12)
    assert batch["valid"].shape == (3, 8, 12) and batch["id"] == ["8x12"] * 3
    torch.testing.assert_close(batch["flow"][1], samples[1]["flow"])
    assert collate_flow([_tensor_sample(8, 12, flow=False)])["flow"] is None


def test_collate_mixed_sizes_requires_pad_and_pads_correctly():
    samples = [_tensor_sample(8, 12), _tensor_sample(10, 9)]
    with pytest.raises(FlowDataError, match="different sizes"):
        collate_flow(samples)
    batch = collate_flow(samples, pad=True)
    assert batch["image1"].shape == (2, 3, 10, 12) and batch["sizes"] == [(8, 12), (10, 9)]
    torch.testing.assert_close(batch["image1"][0, :, :8], samples[0]["image1"])
    torch.testing.assert_close(batch["image1"][0, :, 8:], samples[0]["image1"][:, 7:8].expand(3, 2, 12))
    assert not batch["valid"][0, 8:].any() and not batch["valid"][1, :, 9:].any()
    assert (batch["valid"][1, :, :9] == samples[1]["valid"]).all()
    with pytest.raises(FlowDataError, match="some samples have ground-truth"):
        collate_flow([_tensor_sample(8, 12), _tensor_sample(8, 12, flow=False)])
