"""The detection workflow through the CLI: synth → train → eval → predict → export, on tiny data."""

from __future__ import annotations

import json

import pytest
import torch

from visiontrain.cli import main
from visiontrain.detect.synthetic import write_synthetic_mar20
from visiontrain.engine.checkpoint import load_checkpoint
from visiontrain.engine.task import StepInfo


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("detect")
    data = write_synthetic_mar20(root / "data", train=12, val=6, imgsz=128, seed=3)
    run = root / "run"
    rc = main(["train", "detect", f"data={data}", f"out={run}", "imgsz=128", "epochs=2", "batch_size=4",
               "tensorboard=false", "progress=false", "warmup_epochs=0"])
    assert rc == 0
    return root, data, run


def test_train_writes_checkpoint_with_task_state(tiny):
    _, _, run = tiny
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    assert ckpt["task"] == "detect" and ckpt["model_signature"] == "yolov8n-nc20"
    assert ckpt["task_state"]["names"][:2] == ["A1", "A2"] and ckpt["step"] == 6
    assert ckpt["ema"] is not None  # detection trains with EMA by default
    assert (run / "plots" / "train.png").exists() and (run / "plots" / "val_predictions.jpg").exists()


def test_eval_predict_and_predictions_file_agree(tiny):
    root, data, run = tiny
    w = run / "checkpoints" / "last.pt"
    assert main(["eval", "detect", f"weights={w}", f"data={data}", f"out={root / 'eval'}", "conf=0.001"]) == 0
    m = json.loads((root / "eval" / "metrics.json").read_text())
    assert {"mAP50-95", "mAP50", "per_class"} <= m.keys()
    assert (root / "eval" / "pr_curve.png").exists() and (root / "eval" / "confusion_matrix.png").exists()

    val = data / "JPEGImages"
    ids = (data / "ImageSets/Main/test.txt").read_text().split()
    src = root / "src"
    src.mkdir()
    for i in ids:
        (src / f"{i}.jpg").write_bytes((val / f"{i}.jpg").read_bytes())
    assert main(["predict", "detect", f"weights={w}", f"source={src}", f"out={root / 'pred'}", "conf=0.001"]) == 0
    rows = json.loads((root / "pred" / "predictions.json").read_text())
    assert all({"image_id", "category_id", "bbox", "score"} == r.keys() for r in rows)
    assert {r["image_id"] for r in rows} <= set(ids)
    assert len(list((root / "pred").glob("*.jpg"))) == len(ids)

    # evaluating the written file gives the numbers of evaluating the model
    assert main(["eval", "detect", f"predictions={root / 'pred' / 'predictions.json'}", f"data={data}",
                 f"out={root / 'eval2'}"]) == 0
    m2 = json.loads((root / "eval2" / "metrics.json").read_text())
    assert m2["mAP50-95"] == pytest.approx(m["mAP50-95"], abs=2e-3)


def test_export_onnx_and_predict_with_it(tiny):
    root, data, run = tiny
    onnx_path = root / "m.onnx"
    assert main(["export", "detect", f"weights={run / 'checkpoints' / 'last.pt'}", f"out={onnx_path}"]) == 0
    img = next((data / "JPEGImages").glob("*.jpg"))
    assert main(["predict", "detect", f"weights={onnx_path}", f"source={img}", f"out={root / 'po'}",
                 "conf=0.001"]) == 0
    assert main(["predict", "detect", f"weights={run / 'checkpoints' / 'last.pt'}", f"source={img}",
                 f"out={root / 'pt'}", "conf=0.001"]) == 0
    a = json.loads((root / "po" / "predictions.json").read_text())
    b = json.loads((root / "pt" / "predictions.json").read_text())
    assert len(a) == len(b)
    for ra, rb in zip(sorted(a, key=lambda r: -r["score"])[:20], sorted(b, key=lambda r: -r["score"])[:20]):
        assert ra["category_id"] == rb["category_id"]
        assert ra["bbox"] == pytest.approx(rb["bbox"], abs=0.05)


def test_clear_errors(tiny, capsys):
    root, data, run = tiny
    assert main(["eval", "detect", f"data={data}"]) == 2
    assert "needs weights=FILE or predictions=FILE.json" in capsys.readouterr().err
    assert main(["predict", "detect", f"weights={run / 'checkpoints' / 'last.pt'}", f"source={root / 'nope'}"]) == 2
    assert "no such image or folder" in capsys.readouterr().err
    assert main(["train", "detect", "model=yolov9n", f"data={data}"]) == 2
    assert "expected yolov8n" in capsys.readouterr().err
    flow_ckpt = root / "flow.pt"
    torch.save({"format_version": 1, "task": "flow", "model": {}}, flow_ckpt)
    assert main(["eval", "detect", f"weights={flow_ckpt}", f"data={data}"]) == 2
    assert f"{flow_ckpt} is a flow checkpoint (from `visiontrain train flow`); detect needs" in capsys.readouterr().err


def test_base_classes_remap_and_background_images(tmp_path):
    from visiontrain.config import load_config
    from visiontrain.detect.config import DetectTrainConfig
    from visiontrain.detect.task import DetectTask

    data = write_synthetic_mar20(tmp_path / "d", train=8, val=4, imgsz=96, seed=1)
    cfg = load_config(DetectTrainConfig, None, [f"data={data}", "base_classes=[A1..A10]", f"out={tmp_path}/r",
                                                "imgsz=96"])
    task = DetectTask(cfg)
    assert task.names == [f"A{i}" for i in range(1, 11)]
    train, val = task.build_datasets()
    classes = [c for r in train.labels.records for c in r.classes.tolist()]
    assert classes and max(classes) <= 9
    model = task.build_model()
    assert model.nc == 10
    # an all-background batch is a normal event: finite losses
    images = torch.rand(2, 3, 96, 96)
    model.train()
    terms = task.training_step(model, (images, torch.zeros(0, 6), [{}, {}]), StepInfo())
    assert all(torch.isfinite(v) for v in terms.values())


def test_yolov8n_learns_on_synthetic_data_within_a_few_steps(tmp_path):
    """Fast learning check: 40 steps on 64 synthetic images must cut the loss terms (seen: box and dfl
    fall by more than 30 %, cls by about 20 %)."""
    from visiontrain.config import load_config
    from visiontrain.detect.config import DetectTrainConfig
    from visiontrain.detect.task import DetectTask
    from visiontrain.engine.trainer import Trainer

    data = write_synthetic_mar20(tmp_path / "d", train=64, val=4, imgsz=128, seed=5)
    cfg = load_config(DetectTrainConfig, None, [f"data={data}", "imgsz=128", f"out={tmp_path / 'r'}",
                                                "max_steps=40", "batch_size=8", "tensorboard=false",
                                                "progress=false", "plots=false", "log_every=5",
                                                "warmup_epochs=0.5", "eval_every=0"])
    out = Trainer(DetectTask(cfg)).fit()["out"]
    rows = [line.split(",") for line in (tmp_path / "r" / "metrics.csv").read_text().splitlines()[1:]]
    assert out.endswith("r")
    for term, factor in (("box", 0.7), ("dfl", 0.7), ("cls", 0.9)):  # cls falls slowest (20 classes)
        values = [float(v) for s, e, k, v in rows if k == f"train/{term}"]
        assert values[-1] < factor * values[0], (term, values)


def test_demo_settings_are_valid_and_leave_the_last_epoch_out_of_the_warmup():
    from visiontrain.config import load_config
    from visiontrain.demo import race_winner
    from visiontrain.detect.config import DetectTrainConfig

    for epochs, warmup in ((1, 0.0), (2, 1.0), (4, 3.0), (32, 3.0)):
        cfg = load_config(DetectTrainConfig, None, [f"epochs={epochs}", *race_winner(epochs)])
        assert (cfg.warmup_epochs, cfg.momentum, cfg.warmup_bias_lr, cfg.schedule) == (warmup, 0.937, 0.1, "linear")


@pytest.mark.slow
@pytest.mark.timeout(4800)
def test_demo_reaches_map50_half(tmp_path):
    """The demo end to end: yolov8n, 32 epochs (1600 steps) at 256 px on synthetic MAR20 with the race's
    optimizer settings → mAP50 ≥ 0.5, a floor well below what it reaches (issue 20: 0.85 at 32 epochs on an
    AMX host; 16 epochs of the race's settings alone gave 0.675 on the EPYC host, BENCHMARKS.md). In fp32
    on one thread this takes about 55 min, hence slow."""
    assert main(["demo", f"out={tmp_path / 'demo'}"]) == 0
    m = json.loads((tmp_path / "demo" / "eval" / "metrics.json").read_text())
    assert m["mAP50"] >= 0.5


def test_mosaic_closes_for_the_last_epoch_of_a_max_steps_run(tmp_path):
    """8 images, batch 4: 2 steps an epoch, so max_steps=6 plans 3 epochs (epochs=30 is ignored); with
    aug.close_mosaic=1 the third epoch trains without mosaic."""
    from visiontrain.config import load_config
    from visiontrain.detect.config import DetectTrainConfig
    from visiontrain.detect.task import DetectTask
    from visiontrain.engine.trainer import fit

    data = write_synthetic_mar20(tmp_path / "d", train=8, val=2, imgsz=64, seed=0)
    cfg = load_config(DetectTrainConfig, None, [f"data={data}", "imgsz=64", "batch_size=4", "max_steps=6", "epochs=30",
                                                "aug.close_mosaic=1", "eval_every=0", f"out={tmp_path / 'r'}",
                                                "tensorboard=false", "progress=false", "plots=false"])
    seen = []

    class Recording(DetectTask):
        def on_epoch_start(self, model, info):
            super().on_epoch_start(model, info)
            samples = [self.train_set[i][2]["mosaic"] for i in range(len(self.train_set))]
            seen.append((info.epoch, info.total_epochs, self.train_set.mosaic, any(samples)))

    fit(Recording(cfg))
    assert seen == [(0, 3, True, True), (1, 3, True, True), (2, 3, False, False)]


def test_the_task_leaves_its_config_as_given(tmp_path):
    """The synthetic data root, the class names and the mosaic switch live on the task, not in the config."""
    from visiontrain.config import load_config, to_dict
    from visiontrain.detect.config import DetectTrainConfig
    from visiontrain.detect.task import DetectTask

    cfg = load_config(DetectTrainConfig, None, [f"synth.out={tmp_path / 's'}", "synth.train=2", "synth.val=1",
                                                "synth.imgsz=64", "imgsz=64", "base_classes=[A1..A10]",
                                                f"out={tmp_path / 'r'}"])
    before = to_dict(cfg)
    task = DetectTask(cfg)
    model = task.build_model()
    task.build_datasets()
    task.on_epoch_start(model, StepInfo(epoch=29, total_epochs=30))
    assert task.data == str(tmp_path / "s") and task.train_set.mosaic is False
    assert to_dict(cfg) == before


# ---- COCO: a folder with train.json / val.json, val_data=, and a warning when validating on training data

def write_coco(root, split: str, ids: range) -> None:
    """``root/<split>.json`` and ``root/images/<split>/<id>.jpg``: one 'plane' box per image."""
    import cv2
    import numpy as np

    (root / "images" / split).mkdir(parents=True)
    images, anns = [], []
    for i in ids:
        img = np.full((64, 64, 3), 90, np.uint8)
        img[10:30, 12:40] = 250
        cv2.imwrite(str(root / "images" / split / f"{i}.jpg"), img)
        images.append({"id": i, "file_name": f"{i}.jpg", "width": 64, "height": 64})
        anns.append({"id": i, "image_id": i, "category_id": 1, "bbox": [12, 10, 28, 20], "iscrowd": 0})
    (root / f"{split}.json").write_text(json.dumps({"images": images, "annotations": anns,
                                                    "categories": [{"id": 1, "name": "plane"}]}))


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco") / "coco"
    write_coco(root, "train", range(1, 5))
    write_coco(root, "val", range(5, 7))
    return root


def coco_task(*overrides: str):
    from visiontrain.config import load_config
    from visiontrain.detect.config import DetectTrainConfig
    from visiontrain.detect.task import DetectTask

    return DetectTask(load_config(DetectTrainConfig, None, ["imgsz=64", *overrides]))


def same_data_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "validation data is the training data" in r.getMessage()]


def test_a_coco_folder_with_train_and_val_json(coco, caplog):
    from visiontrain.detect.data import detect_layout

    assert detect_layout(coco) == "coco"
    task = coco_task(f"data={coco}")
    assert task.train_labels.source.endswith("train.json") and len(task.train_labels) == 4
    assert task.val_labels.source.endswith("val.json") and len(task.val_labels) == 2  # val_split=test finds val
    assert task.names == ["plane"] and same_data_warnings(caplog) == []


def test_val_data_gives_the_validation_file(coco, caplog):
    task = coco_task(f"data={coco / 'train.json'}", f"val_data={coco / 'val.json'}")
    assert task.train_labels.source.endswith("train.json") and task.val_labels.source.endswith("val.json")
    assert [r.image_id for r in task.val_labels.records] == ["5", "6"]
    assert same_data_warnings(caplog) == []


def test_validating_on_the_training_file_warns_once(coco, caplog):
    task = coco_task(f"data={coco / 'train.json'}")
    assert task.val_labels.source == task.train_labels.source  # a .json file is one split
    (message,) = same_data_warnings(caplog)
    assert "train.json is one COCO file" in message and "val_data=" in message
    caplog.clear()
    coco_task(f"data={coco}", "val_split=train")  # the same split named twice
    (message,) = same_data_warnings(caplog)
    assert "val_split='train'" in message


def test_warmup_bias_lr_gives_biases_their_own_falling_warmup(tmp_path):
    """Ultralytics' warmup: biases start at warmup_bias_lr and fall to lr while weights rise from 0."""
    from visiontrain.config import load_config
    from visiontrain.detect.config import DetectTrainConfig
    from visiontrain.detect.task import DetectTask
    from visiontrain.engine.trainer import Trainer

    data = write_synthetic_mar20(tmp_path / "d", train=8, val=2, imgsz=64, seed=0)
    args = [f"data={data}", "imgsz=64", "batch_size=4", "epochs=4", "warmup_epochs=2", "lr=0.002",
            "eval_every=0", "tensorboard=false", "progress=false", "plots=false"]
    plain = Trainer(DetectTask(load_config(DetectTrainConfig, None, [*args, f"out={tmp_path / 'a'}"])))
    assert len(plain.optimizer.param_groups) == 2  # default: the engine's groups
    t = Trainer(DetectTask(load_config(DetectTrainConfig, None, [*args, "warmup_bias_lr=0.1",
                                                                     f"out={tmp_path / 'b'}"])))
    groups = t.optimizer.param_groups
    names = {id(p): n for n, p in t.model.named_parameters()}
    assert all(names[id(p)].endswith(".bias") for p in groups[2]["params"])
    assert sum(len(g["params"]) for g in groups) == sum(len(g["params"]) for g in plain.optimizer.param_groups)
    lrs = []
    for step in (0, 2, 4):  # warmup is 2 epochs x 2 steps
        t.step = step
        t._set_lr()
        lrs.append([g["lr"] for g in groups])
    assert lrs[0][0] == 0.0 and lrs[0][2] == pytest.approx(0.1)
    assert lrs[1][0] == pytest.approx(0.001) and lrs[1][2] == pytest.approx(0.051)
    assert lrs[2][0] == pytest.approx(lrs[2][2])  # after the warmup every group follows the schedule
