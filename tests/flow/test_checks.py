"""Flow data is checked file by file before step 1: damaged images and flow files are all named."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from visiontrain.cli import main
from visiontrain.flow.checks import check_flow_datasets
from visiontrain.flow.config import FlowTrainConfig
from visiontrain.flow.data import FlowDataError, open_flow_dataset
from visiontrain.flow.io import check_flow_file, write_flo, write_image, write_kitti_png, write_pfm
from visiontrain.flow.synthetic import write_synthetic_chairs
from visiontrain.flow.task import FlowTask

H, W = 24, 32


def cut(path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def wrong_magic(path) -> None:
    data = path.read_bytes()
    path.write_bytes(b"PIEX" + data[4:])


@pytest.fixture(scope="module")
def clean_chairs(tmp_path_factory):
    return write_synthetic_chairs(tmp_path_factory.mktemp("chairs") / "FlyingChairs", train=4, val=2,
                                  size=(32, 48), seed=0)


@pytest.fixture
def damaged_chairs(clean_chairs, tmp_path):
    """Train: pair 1 wrong .flo magic, pair 2 second image truncated. Val: pair 5 .flo truncated."""
    root = tmp_path / "FlyingChairs"
    shutil.copytree(clean_chairs, root)
    wrong_magic(root / "data/00001_flow.flo")
    cut(root / "data/00002_img2.ppm")
    cut(root / "data/00005_flow.flo", 0.7)
    return root


DAMAGED = ("00001_flow.flo", "00002_img2.ppm", "00005_flow.flo")


def named(message: str) -> set[str]:
    names = {f"{i:05d}_{k}" for i in range(1, 7) for k in ("img1.ppm", "img2.ppm", "flow.flo")}
    return {n for n in names if f"/{n}:" in message}


# ------------------------------------------------------------------------------------ one file
def test_check_flow_file_reasons(tmp_path):
    flow = np.random.default_rng(0).normal(size=(H, W, 2)).astype(np.float32)
    write_flo(tmp_path / "ok.flo", flow)
    assert check_flow_file(tmp_path / "ok.flo") is None
    shutil.copy(tmp_path / "ok.flo", tmp_path / "magic.flo")
    wrong_magic(tmp_path / "magic.flo")
    assert check_flow_file(tmp_path / "magic.flo").startswith("not a .flo file (magic b'PIEX'")
    shutil.copy(tmp_path / "ok.flo", tmp_path / "short.flo")
    cut(tmp_path / "short.flo")
    assert check_flow_file(tmp_path / "short.flo") == f"truncated .flo file: {(12 + 8 * H * W) // 2} bytes, a " \
                                                      f"{H}×{W} flow needs {12 + 8 * H * W}"
    (tmp_path / "long.flo").write_bytes((tmp_path / "ok.flo").read_bytes() + b"\0")
    assert "1 unexpected trailing bytes" in check_flow_file(tmp_path / "long.flo")
    (tmp_path / "huge.flo").write_bytes(np.array([202021.25], "<f4").tobytes() + np.array([-3, 5], "<i4").tobytes())
    assert check_flow_file(tmp_path / "huge.flo") == "invalid .flo size 5×-3 (H×W)"
    (tmp_path / "empty.flo").write_bytes(b"")
    assert "the header alone is 12" in check_flow_file(tmp_path / "empty.flo")

    write_pfm(tmp_path / "ok.pfm", np.dstack([flow, np.zeros((H, W, 1), np.float32)]))
    assert check_flow_file(tmp_path / "ok.pfm") is None
    shutil.copy(tmp_path / "ok.pfm", tmp_path / "short.pfm")
    cut(tmp_path / "short.pfm")
    assert check_flow_file(tmp_path / "short.pfm").startswith("truncated PFM")
    write_pfm(tmp_path / "grey.pfm", flow[..., 0])
    assert "1-channel" in check_flow_file(tmp_path / "grey.pfm")
    (tmp_path / "hdr.pfm").write_bytes(b"P7 1 1 -1\n" + bytes(12))
    assert check_flow_file(tmp_path / "hdr.pfm").startswith("not a PFM file")

    write_kitti_png(tmp_path / "ok.png", flow)
    assert check_flow_file(tmp_path / "ok.png") is None
    shutil.copy(tmp_path / "ok.png", tmp_path / "short.png")
    cut(tmp_path / "short.png")
    assert "truncated PNG" in check_flow_file(tmp_path / "short.png")
    write_image(tmp_path / "rgb8.png", np.zeros((H, W, 3), np.uint8))
    assert "not a KITTI flow PNG (bit depth 8" in check_flow_file(tmp_path / "rgb8.png")
    write_image(tmp_path / "j.jpg", np.zeros((H, W, 3), np.uint8))
    shutil.copy(tmp_path / "j.jpg", tmp_path / "jpeg.png")
    assert check_flow_file(tmp_path / "jpeg.png").startswith("not a PNG file")
    (tmp_path / "empty.png").write_bytes(b"")
    assert check_flow_file(tmp_path / "empty.png") == "empty file (0 bytes)"
    assert check_flow_file(tmp_path / "x.txt").startswith("unknown flow file type")
    assert check_flow_file(tmp_path / "missing.flo") == "file does not exist"


# ------------------------------------------------------------------------------------ datasets
def test_clean_synthetic_chairs_pass(clean_chairs):
    spec = f"chairs:{clean_chairs}"
    check_flow_datasets([("train", open_flow_dataset(spec, "train")), ("val", open_flow_dataset(spec, "val"))])


def test_training_stops_before_step_1_naming_every_damaged_file(damaged_chairs, tmp_path, capsys):
    # the issue: a .flo with a wrong magic number let a max_steps=1 run exit 0 when it was not sampled
    rc = main(["train", "flow", f"data=chairs:{damaged_chairs}", f"out={tmp_path / 'run'}", "max_steps=1",
               "batch_size=2", "crop=", "tensorboard=false", "progress=false", "plots=false"])
    err = capsys.readouterr().err
    assert rc == 2
    assert named(err) == set(DAMAGED)
    assert "Damaged images or flow files (3)" in err and "train data chairs:" in err and "val data chairs:" in err
    assert "magic b'PIEX'" in err and "truncated P6 image" in err and "truncated .flo file" in err
    assert not list((tmp_path / "run").rglob("*.pt"))


def test_eval_checks_its_split(damaged_chairs, tmp_path, capsys):
    from visiontrain.flow.models.raft import build_raft

    weights = tmp_path / "raft_small.pth"
    torch.save(build_raft("raft_small").state_dict(), weights)
    rc = main(["eval", "flow", f"weights={weights}", f"data=chairs:{damaged_chairs}", "split=val",
               f"out={tmp_path / 'eval'}", "device=cpu"])
    assert rc == 2 and named(capsys.readouterr().err) == {"00005_flow.flo"}


def _layouts(root) -> dict[str, tuple[str, str]]:
    """One small dataset per spec kind, each with one damaged file: ``{spec: (split, damaged file)}``."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (H, W, 3)).astype(np.uint8)
    flow = rng.normal(size=(H, W, 2)).astype(np.float32)
    out = {}
    # Sintel: a truncated .flo
    for i in range(3):
        for p in ("clean", "final"):
            write_image(_mk(root / f"sintel/Sintel/training/{p}/alley_1/frame_{i + 1:04d}.png"), img)
    for i in range(2):
        write_flo(_mk(root / f"sintel/Sintel/training/flow/alley_1/frame_{i + 1:04d}.flo"), flow)
    cut(root / "sintel/Sintel/training/flow/alley_1/frame_0002.flo")
    out[f"sintel-clean:{root / 'sintel'}"] = ("train", "frame_0002.flo")
    out[f"sintel-final:{root / 'sintel'}"] = ("train", "frame_0002.flo")
    # KITTI: a truncated flow PNG
    for i in range(2):
        write_image(_mk(root / f"kitti/KittiFlow/training/image_2/00000{i}_10.png"), img)
        write_image(_mk(root / f"kitti/KittiFlow/training/image_2/00000{i}_11.png"), img)
        write_kitti_png(_mk(root / f"kitti/KittiFlow/training/flow_occ/00000{i}_10.png"), flow)
    cut(root / "kitti/KittiFlow/training/flow_occ/000001_10.png")
    out[f"kitti:{root / 'kitti'}"] = ("train", "flow_occ/000001_10.png")
    # FlyingThings3D: a truncated .pfm
    for split in ("TRAIN", "TEST"):
        for i in range(2):
            write_image(_mk(root / f"things/FlyingThings3D/frames_cleanpass/{split}/A/0000/left/{6 + i:04d}.png"), img)
            for d, n in (("into_future", "Future"), ("into_past", "Past")):
                write_pfm(_mk(root / f"things/FlyingThings3D/optical_flow/{split}/A/0000/{d}/left/"
                                     f"OpticalFlowInto{n}_{6 + i:04d}_L.pfm"), np.dstack([flow, flow[..., :1]]))
    cut(root / "things/FlyingThings3D/optical_flow/TEST/A/0000/into_future/left/OpticalFlowIntoFuture_0006_L.pfm")
    out[f"things:{root / 'things'}"] = ("val", "OpticalFlowIntoFuture_0006_L.pfm")
    # HD1K: an image that is random bytes
    for i in range(3):
        write_image(_mk(root / f"hd1k/hd1k/hd1k_input/image_2/000000_{i:04d}.png"), img)
        write_kitti_png(_mk(root / f"hd1k/hd1k/hd1k_flow_gt/flow_occ/000000_{i:04d}.png"), flow)
    (root / "hd1k/hd1k/hd1k_input/image_2/000000_0001.png").write_bytes(rng.bytes(500))
    out[f"hd1k:{root / 'hd1k'}"] = ("train", "image_2/000000_0001.png")
    # pairs: a zero-byte flow
    for stem in ("a", "b"):
        write_image(_mk(root / f"pairs/{stem}_img1.png"), img)
        write_image(root / f"pairs/{stem}_img2.png", img)
        write_flo(root / f"pairs/{stem}_flow.flo", flow)
    (root / "pairs/b_flow.flo").write_bytes(b"")
    out[f"pairs:{root / 'pairs'}"] = ("train", "b_flow.flo")
    # pair: a truncated JPEG
    write_image(_mk(root / "pair/1.png"), img)
    write_image(root / "pair/2.jpg", img)
    cut(root / "pair/2.jpg")
    out[f"pair:{root / 'pair/1.png'},{root / 'pair/2.jpg'}"] = ("train", "pair/2.jpg")
    return out


def _mk(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def test_every_spec_kind_is_checked(tmp_path):
    for spec, (split, damaged) in _layouts(tmp_path).items():
        dataset = open_flow_dataset(spec, split)
        with pytest.raises(FlowDataError) as e:
            check_flow_datasets([(split, dataset)])
        lines = [ln for ln in str(e.value).splitlines() if ln.startswith("    /")]
        assert len(lines) == 1 and f"{damaged}: " in lines[0], (spec, str(e.value))


def test_unlabeled_frames_folder_is_checked(tmp_path):
    frames = tmp_path / "frames"
    frames.mkdir()
    img = np.random.default_rng(0).integers(0, 256, (64, 64, 3)).astype(np.uint8)
    for i in range(4):
        write_image(frames / f"f{i}.png", img)
    cut(frames / "f2.png", 0.8)
    task = FlowTask(FlowTrainConfig(method="unsupervised", model="pwc", data=f"frames:{frames}"))
    with pytest.raises(FlowDataError, match=r"train data frames:.*\n    .*f2\.png: truncated PNG"):
        task.build_datasets()
    write_image(frames / "f2.png", img)
    train, val = task.build_datasets()
    assert len(train) == 3 and val is None


def test_predict_names_a_damaged_input(tmp_path, capsys):
    from visiontrain.flow.models.raft import build_raft

    weights = tmp_path / "raft_small.pth"
    torch.save(build_raft("raft_small").state_dict(), weights)
    img = np.random.default_rng(0).integers(0, 256, (64, 64, 3)).astype(np.uint8)
    write_image(tmp_path / "1.jpg", img)
    write_image(tmp_path / "2.jpg", img)
    cut(tmp_path / "2.jpg")
    rc = main(["predict", "flow", f"weights={weights}", f"image1={tmp_path / '1.jpg'}",
               f"image2={tmp_path / '2.jpg'}", f"out={tmp_path / 'out'}", "device=cpu"])
    assert rc == 2 and "2.jpg: truncated JPEG" in capsys.readouterr().err
