"""Oriented-box verbs: predict (rbox/poly JSON, rotated boxes drawn), eval of a model or of an oriented predictions
file (polygon mAP, DOTA AP50, ProbIoU mAP, horizontal mAP), ONNX export checked in ONNX Runtime, and training."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from visiontrain.cli import main
from visiontrain.detect.data import load_labels
from visiontrain.detect.metrics import PredictionsError
from visiontrain.detect.obb.geometry import corners_to_xywhr
from visiontrain.detect.obb.metrics import read_obb_predictions, write_obb_predictions_json
from visiontrain.detect.obb.model import YOLOv8OBB
from visiontrain.detect.synthetic import MAR20_NAMES, write_synthetic_mar20

NAMES = list(MAR20_NAMES)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny synthetic MAR20 set and a random YOLOv8n-OBB (class biases raised so it predicts) saved as best.pt."""
    root = tmp_path_factory.mktemp("obbcli")
    data = write_synthetic_mar20(root / "data", train=2, val=2, imgsz=64, seed=0)
    torch.manual_seed(0)
    model = YOLOv8OBB("n", nc=20, names=NAMES)
    with torch.no_grad():
        for conv in model.head.cv3:
            conv[-1].bias.fill_(-1.0)
    best = root / "best.pt"
    torch.save({"format_version": 1, "task": "detect", "model_signature": "yolov8n-obb-nc20", "config": {},
                "task_state": {"names": NAMES, "scale": "n", "imgsz": 64, "obb": True}, "model": model.state_dict(),
                "ema": None}, best)
    return {"root": root, "data": data, "best": best, "model": model}


def test_predict_then_eval_the_predictions(files, tmp_path, capsys):
    out, src = tmp_path / "pred", tmp_path / "images"
    src.mkdir()
    for i in (1, 2):  # the training split
        shutil.copy(files["data"] / "JPEGImages" / f"{i}.jpg", src)
    assert main(["predict", "detect", f"weights={files['best']}", f"source={src}",
                 f"out={out}", "conf=0.2", "max_det=5"]) == 0
    rows = json.loads((out / "predictions.json").read_text())
    assert rows and {"image_id", "category_id", "score", "rbox", "poly"} <= rows[0].keys()
    assert len(rows[0]["rbox"]) == 5 and len(rows[0]["poly"]) == 8
    assert (out / "1.jpg").is_file()
    capsys.readouterr()
    assert main(["eval", "detect", f"predictions={out / 'predictions.json'}", f"data={files['data']}",
                 "split=train", f"out={tmp_path / 'ev'}"]) == 0
    printed = capsys.readouterr().out
    assert "DOTA VOC07 AP50" in printed and "ProbIoU-matched" in printed and "horizontal boxes" in printed
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert {"mAP50-95", "mAP50", "dota_AP50", "mAP50-95_probiou", "hbb/mAP50"} <= m.keys()


def test_eval_of_ground_truth_predictions_is_perfect(files, tmp_path):
    labels = load_labels(files["data"], "test", obb=True)
    preds = {r.image_id: np.concatenate([corners_to_xywhr(r.polygons.astype(np.float64)), np.ones((len(r.classes), 1)),
                                         r.classes[:, None]], 1) for r in labels.records}
    path = write_obb_predictions_json(tmp_path / "gt.json", preds)
    assert main(["eval", "detect", f"predictions={path}", f"data={files['data']}", f"out={tmp_path / 'ev'}"]) == 0
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["mAP50-95"] == pytest.approx(1.0) and m["dota_AP50"] == pytest.approx(1.0)
    assert m["hbb/mAP50"] == pytest.approx(1.0)
    # poly-only entries give the same
    rows = json.loads(path.read_text())
    for r in rows:
        del r["rbox"]
    back = read_obb_predictions(rows, "x.json", 20)
    for k, v in preds.items():
        assert np.allclose(back[k][:, :5], v[:, :5], atol=1e-2)


@pytest.mark.parametrize("entry, msg", [
    ({"image_id": "1", "category_id": 0, "score": 0.5}, "rbox or poly"),
    ({"image_id": "1", "category_id": 0, "score": 0.5, "rbox": [1, 2, 3]}, "rbox must be 5 finite numbers"),
    ({"image_id": "1", "category_id": 30, "score": 0.5, "rbox": [1, 2, 3, 4, 0]}, "category_id 30"),
])
def test_bad_oriented_predictions_are_named(entry, msg):
    with pytest.raises(PredictionsError, match=rf"p\.json entry 1: .*{msg}"):
        read_obb_predictions([{"image_id": "1", "category_id": 0, "score": 0.5, "rbox": [1, 2, 3, 4, 0]}, entry],
                             "p.json", 20)


def test_export_onnx_matches_torch(files, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    from visiontrain.detect.export import OnnxDetector

    path = tmp_path / "m.onnx"
    assert main(["export", "detect", f"weights={files['best']}", f"out={path}"]) == 0
    assert "angle last" in capsys.readouterr().out
    onnx = OnnxDetector(path)
    assert onnx.obb and onnx.nc == 20
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        ref = files["model"].eval()(x)
    torch.testing.assert_close(onnx(x), ref, rtol=1e-3, atol=2e-3)


@pytest.mark.slow
def test_train_obb_runs_and_evaluates(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "detect", "model=yolov8n-obb", f"out={out}", f"synth.out={tmp_path / 's'}", "synth.train=4",
                 "synth.val=2", "synth.imgsz=64", "imgsz=64", "epochs=1", "batch_size=2", "tensorboard=false",
                 "plots=false", "progress=false"]) == 0
    metrics = (out / "metrics.csv").read_text()
    assert "dota_AP50" in metrics and "hbb/mAP50" in metrics


def test_split_carries_oriented_boxes(files, tmp_path):
    out = tmp_path / "fs"
    assert main(["split", "detect", f"data={files['data']}", "base=A1..A10", "shots=1", f"out={out}", "obb=true"]) == 0
    src = {r.image_id: r for r in load_labels(files["data"], "test", obb=True).records}
    got = load_labels(out, "test", obb=True).records
    assert got and all(np.allclose(r.polygons, src[r.image_id].polygons, atol=0.01) for r in got)
    assert all((r.classes == src[r.image_id].classes).all() for r in got)


def test_train_obb_student_with_an_obb_teacher(files, tmp_path, capsys):
    out = tmp_path / "student"
    assert main(["train", "detect", "model=yolov8n-obb", f"data={files['data']}", f"distill.teacher={files['best']}",
                 f"out={out}", "imgsz=64", "max_steps=2", "batch_size=2", "eval_every=0", "tensorboard=false",
                 "plots=false", "progress=false"]) == 0
    log = (out / "metrics.csv").read_text()
    assert "pseudo_per_image" in log and "kl" in log  # the default terms: pseudo-labels and the response KL


def test_obb_class_incremental_student_keeps_the_teachers_rotated_boxes(files, tmp_path, capsys):
    """``distill.teacher=`` alone with a 10-class OBB teacher: ``frozen_base=auto`` picks the frozen teacher plus
    a novel class branch; after training, boxes, angles and base scores are the teacher's."""
    from visiontrain.detect.inference import build_detector

    torch.manual_seed(1)
    teacher = YOLOv8OBB("n", nc=10, names=NAMES[:10])
    with torch.no_grad():
        for m in teacher.modules():  # non-trivial BatchNorm statistics: a drifting one would show
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "teacher.pt"
    torch.save({"format_version": 1, "task": "detect", "model_signature": "yolov8n-obb-nc10", "config": {},
                "task_state": {"names": NAMES[:10], "scale": "n", "imgsz": 64, "obb": True},
                "model": teacher.state_dict(), "ema": None}, path)
    out = tmp_path / "student"
    assert main(["train", "detect", "model=yolov8n-obb", f"data={files['data']}", f"distill.teacher={path}",
                 f"out={out}", "imgsz=64", "max_steps=3", "batch_size=2", "lr=0.05", "eval_every=0",
                 "tensorboard=false", "plots=false", "progress=false"]) == 0
    student = build_detector(out / "checkpoints/last.pt")
    assert student.head.class_parts == (10, 10) and student.nc == 20
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        t, s = teacher.eval()(x), student(x)
    assert torch.equal(s[:, :4], t[:, :4]) and torch.equal(s[:, -1], t[:, -1])  # boxes and angles
    torch.testing.assert_close(s[:, 4:14], t[:, 4:14], rtol=0, atol=1e-7)


def test_obb_student_refuses_a_horizontal_teacher(files, tmp_path, capsys):
    from visiontrain.detect.model import YOLOv8

    teacher = tmp_path / "hbb.pt"
    torch.save({"format_version": 1, "task": "detect", "model_signature": "yolov8n-nc20", "config": {},
                "task_state": {"names": NAMES, "scale": "n", "imgsz": 64, "obb": False},
                "model": YOLOv8("n", nc=20, names=NAMES).state_dict(), "ema": None}, teacher)
    assert main(["train", "detect", "model=yolov8n-obb", f"data={files['data']}", f"distill.teacher={teacher}",
                 f"out={tmp_path / 'run'}", "imgsz=64", "max_steps=1"]) == 2
    assert "needs a teacher of the same kind" in capsys.readouterr().err
