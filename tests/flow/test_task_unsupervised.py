"""method=unsupervised wired through the flow task and CLI: train on a frames folder (no validation data),
predict, eval and export with the best.pt it leaves, plus the pieces that make it work (size fitting)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from visiontrain.cli import main
from visiontrain.flow.config import FlowTrainConfig
from visiontrain.flow.data import FlowDataError
from visiontrain.flow.frames import FramesError, UnlabeledPairs
from visiontrain.flow.io import read_flo
from visiontrain.flow.task import FlowTask

HEIGHT, WIDTH, SHIFT = 64, 96, 2


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _textured(height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = rng.uniform(0, 255, (height // 4 + 1, width // 4 + 1, 3)).astype(np.float32)
    return cv2.resize(noise, (width + 4 * SHIFT * 4, height), interpolation=cv2.INTER_CUBIC).clip(0, 255)


def _frames_dir(root: Path, frames: int = 4) -> Path:
    """``frames`` BGR PNGs 64x96: a smooth random texture moving right by SHIFT px per frame."""
    folder = root / "frames"
    folder.mkdir()
    texture = _textured(HEIGHT, WIDTH)
    offset = texture.shape[1] - WIDTH
    for i in range(frames):
        left = offset - i * SHIFT
        cv2.imwrite(str(folder / f"frame{i}.png"), texture[:, left:left + WIDTH].round().astype(np.uint8))
    return folder


def test_census_loss_is_reexported():
    from visiontrain.flow.losses import census_loss
    from visiontrain.flow.losses.census import census_loss as original

    assert census_loss is original


def test_train_on_frames_without_validation_then_predict_eval_export_its_best_pt(tmp_path: Path):
    frames = _frames_dir(tmp_path)
    run = tmp_path / "run"
    rc = main(["train", "flow", "method=unsupervised", "model=pwc", f"data=frames:{frames}", "max_steps=3",
               "batch_size=2", f"out={run}", "device=cpu", "progress=false", "tensorboard=false", "plots=false",
               "selfsup_start_step=1"])
    assert rc in (0, None)
    best = run / "checkpoints" / "best.pt"  # no validation data: the engine's best.pt holds the final weights
    assert best.is_file(), f"no best.pt in {run / 'checkpoints'}: {sorted((run / 'checkpoints').iterdir())}"
    ckpt = torch.load(best, weights_only=True)
    assert ckpt["step"] == 3 and "optimizer" not in ckpt
    assert ckpt["config"]["model"] == "pwc" and ckpt["config"]["method"] == "unsupervised"
    assert ckpt["config"]["lr"] == pytest.approx(1e-4)  # the unsupervised default (lr left empty)
    assert ckpt["config"]["warmup_steps"] == 200
    assert any(k.startswith("pyramid.") for k in ckpt["model"])

    out = tmp_path / "pred"
    rc = main(["predict", "flow", f"weights={best}", f"image1={frames / 'frame0.png'}",
               f"image2={frames / 'frame1.png'}", f"out={out}", "device=cpu"])
    assert rc in (0, None)
    flow, _ = read_flo(out / "flow.flo")
    assert flow.shape == (HEIGHT, WIDTH, 2) and np.isfinite(flow).all()
    assert (out / "flow.png").is_file()
    occlusion = cv2.imread(str(out / "occlusion.png"), cv2.IMREAD_UNCHANGED)
    assert occlusion.shape == (HEIGHT, WIDTH) and occlusion.dtype == np.uint8

    # ONNX export of the PWC checkpoint, checked against PyTorch inside the verb (fails above 1e-3 px)
    onnx_path = tmp_path / "pwc.onnx"
    rc = main(["export", "flow", f"weights={best}", "format=onnx", f"out={onnx_path}", "size=64x96"])
    assert rc in (0, None) and onnx_path.stat().st_size > 1e6
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image1", "image2"]
    assert [o.name for o in session.get_outputs()] == ["flow_fw", "flow_bw"]
    assert main(["export", "flow", f"weights={best}", "format=tflite"]) == 2

    # Evaluation with ground truth: a pairs folder whose flow is the known shift; PWC pads 70x100 to 96x128.
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    image = _textured(70, 100)[:, :100]
    cv2.imwrite(str(pairs / "a_img1.png"), image.round().astype(np.uint8))
    cv2.imwrite(str(pairs / "a_img2.png"), image.round().astype(np.uint8))
    from visiontrain.flow.io import write_flo

    gt = np.zeros((70, 100, 2), np.float32)
    gt[..., 0] = 1.5
    write_flo(pairs / "a_flow.flo", gt)
    rc = main(["eval", "flow", f"weights={best}", f"data=pairs:{pairs}", f"out={tmp_path / 'eval'}",
               "device=cpu", "pictures=1"])
    assert rc in (0, None)
    import json

    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["source"]["model"] == "pwc"
    assert abs(metrics["epe"] - 1.5) < 0.2  # 3 warmup steps at lr <= 1e-6 leave the flow near its zero init
    assert cv2.imread(str(tmp_path / "eval" / "occlusion_000.png"), cv2.IMREAD_UNCHANGED).shape == (70, 100)


class _Base(torch.utils.data.Dataset):
    def __init__(self, height: int, width: int):
        self.image = torch.arange(3 * height * width, dtype=torch.float32).reshape(3, height, width) / (3 * height * width)

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> dict:
        return {"image1": self.image, "image2": self.image, "flow": torch.zeros(2, *self.image.shape[1:]),
                "valid": torch.ones(self.image.shape[1:], dtype=torch.bool), "id": "x"}


def test_unlabeled_pairs_crop_and_resize():
    sample = UnlabeledPairs(_Base(70, 100))[0]
    assert sample["flow"] is None and sample["valid"] is None
    assert sample["image1"].shape == (3, 64, 96)
    torch.testing.assert_close(sample["image1"], _Base(70, 100).image[:, 3:67, 2:98])  # centred crop
    resized = UnlabeledPairs(_Base(70, 100), (64, 128))[0]["image2"]
    assert resized.shape == (3, 64, 128)
    with pytest.raises(FramesError, match="60×100 \\(H×W\\) is smaller than the 64×64"):
        UnlabeledPairs(_Base(60, 100))[0]


def test_export_refuses_raft_with_a_reason(tmp_path: Path, capsys):
    from visiontrain.flow.models.raft import build_raft

    path = tmp_path / "raft_small.pth"
    torch.save(build_raft("raft_small").state_dict(), path)
    assert main(["export", "flow", f"weights={path}"]) == 2
    assert "PWC model" in capsys.readouterr().err


def test_frames_smaller_than_the_pwc_input_stop_the_run_before_step_1(tmp_path: Path):
    folder = tmp_path / "small"
    folder.mkdir()
    for i in range(3):
        cv2.imwrite(str(folder / f"f{i}.png"), _textured(48, 96, seed=i)[:, :96].round().astype(np.uint8))
    task = FlowTask(FlowTrainConfig(method="unsupervised", model="pwc", data=f"frames:{folder}"))
    with pytest.raises(FlowDataError, match=r"(?s)3 images are smaller than 64×64 \(H×W\), which the PWC model "
                                            r"needs.*f0\.png: 48×96.*unsup_size=HxW"):
        task.build_datasets()
    resized = FlowTask(FlowTrainConfig(method="unsupervised", model="pwc", data=f"frames:{folder}",
                                       unsup_size="64x96"))
    train, _ = resized.build_datasets()  # resizing was asked for: no size check
    assert train[0]["image1"].shape == (3, 64, 96)


def test_unsupervised_raft_fine_tunes_torchvision_weights_on_frames_and_resumes_bit_exact(tmp_path: Path, tv_weights):
    """SMURF-style RAFT: torchvision raft_small weights, frames without ground truth, random crops with
    full-image warping, every iteration in the loss, self-supervision on from step 1; 3 steps, then the
    same run resumed from its step-2 checkpoint ends with the same weights."""
    from visiontrain.engine.checkpoint import load_checkpoint
    from visiontrain.engine.logging import read_metrics

    frames = _frames_dir(tmp_path, frames=3)
    common = ["train", "flow", "method=unsupervised", "model=raft_small", f"weights={tv_weights}",
              f"data=frames:{frames}", "max_steps=3", "batch_size=1", "num_flow_updates_train=2",
              "unsup_crop=48x64", "selfsup_start_step=1", "save_every_steps=1", "keep_last=4", "device=cpu",
              "progress=false", "tensorboard=false", "plots=false", "seed=3"]
    assert main([*common, f"out={tmp_path / 'ref'}"]) in (0, None)
    ref = tmp_path / "ref" / "checkpoints"
    metrics = read_metrics(tmp_path / "ref" / "metrics.csv")
    for key in ("train/census", "train/selfsup", "train/out_of_frame", "train/stat/mask_kept"):
        assert key in metrics and all(np.isfinite(v) for _, v in metrics[key]), key
    assert all(0.5 < v <= 1 for _, v in metrics["train/stat/mask_kept"])
    assert main([*common, f"out={tmp_path / 'resumed'}", f"resume={ref / 'step_0000002.pt'}"]) in (0, None)
    a, b = (load_checkpoint(d / "checkpoints" / "last.pt") for d in (tmp_path / "ref", tmp_path / "resumed"))
    assert a["step"] == b["step"] == 3 and a["config"]["model"] == "raft_small"
    start = torch.load(tv_weights, weights_only=True)
    assert any(not torch.equal(a["model"][k], start[k]) for k in start)  # it trained
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_unsupervised_raft_on_one_pair_trains_without_validation(tmp_path: Path):
    frames = _frames_dir(tmp_path, frames=2)
    pair = f"pair:{frames / 'frame0.png'},{frames / 'frame1.png'}"
    task = FlowTask(FlowTrainConfig(method="unsupervised", model="raft_small_convex", data=pair))
    train, val = task.build_datasets()
    assert val is None and len(train) == 1 and train[0]["flow"] is None
