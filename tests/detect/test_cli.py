"""The detect verbs' edges: one message for a wrong weights file, output folders that never mix old and new
results, metrics.json's source and its printed table, and --help listing only keys a verb reads."""

from __future__ import annotations

import json
import re

import pytest
import torch

from visiontrain.cli import main
from visiontrain.config import flat_keys, load_config
from visiontrain.detect.cli import VERBS
from visiontrain.detect.model import YOLOv8
from visiontrain.detect.synthetic import MAR20_NAMES, write_synthetic_mar20

NAMES = list(MAR20_NAMES)
QUIET = ["tensorboard=false", "plots=false", "progress=false", "imgsz=64", "batch_size=2"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny MAR20 set, a (random) detector saved the way the engine saves best.pt, and a flow checkpoint."""
    root = tmp_path_factory.mktemp("cli")
    data = write_synthetic_mar20(root / "data", train=4, val=2, imgsz=64, seed=0)
    torch.manual_seed(0)
    model = YOLOv8("n", nc=20, names=NAMES)
    best = root / "best.pt"
    torch.save({"format_version": 1, "task": "detect", "model_signature": "yolov8n-nc20", "config": {},
                "task_state": {"names": NAMES, "scale": "n", "imgsz": 64}, "model": model.state_dict(),
                "ema": None}, best)
    flow = root / "flow.pt"
    torch.save({"format_version": 1, "task": "flow", "model_signature": "raft_small", "model": {}}, flow)
    return {"root": root, "data": data, "best": best, "flow": flow, "image": data / "JPEGImages" / "5.jpg"}


# ---- a wrong weights file: one message, from every verb that takes weights ------------------------

@pytest.mark.parametrize("verb", ["eval", "predict", "export", "train weights=", "train distill.teacher="])
def test_a_flow_checkpoint_gets_one_message_from_every_verb(files, tmp_path, capsys, verb):
    flow, out = files["flow"], tmp_path / "out"
    argv = {
        "eval": ["eval", "detect", f"weights={flow}", f"data={files['data']}", f"out={out}"],
        "predict": ["predict", "detect", f"weights={flow}", f"source={files['image']}", f"out={out}"],
        "export": ["export", "detect", f"weights={flow}", f"out={out}"],
        "train weights=": ["train", "detect", f"weights={flow}", f"data={files['data']}", f"out={out}", *QUIET],
        "train distill.teacher=": ["train", "detect", f"distill.teacher={flow}", f"data={files['data']}",
                                   f"out={out}", *QUIET],
    }[verb]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"error: {flow} is a flow checkpoint (from `visiontrain train flow`); detect needs a detect checkpoint, " \
           "an Ultralytics .pt" in err, err
    assert not out.exists()  # found before any output (or run) folder is made


def test_an_onnx_file_is_refused_where_only_torch_weights_work(files, tmp_path, capsys):
    fake = tmp_path / "m.onnx"
    fake.write_bytes(b"not read")
    assert main(["export", "detect", f"weights={fake}"]) == 2
    assert "is already an ONNX export" in capsys.readouterr().err
    assert main(["train", "detect", f"weights={fake}", f"data={files['data']}", f"out={tmp_path / 'r'}", *QUIET]) == 2
    assert "is an ONNX export (predict and eval run it); this needs a detect checkpoint" in capsys.readouterr().err


# ---- outputs never mix; metrics.json says where its numbers come from -------------------------------

def test_eval_classes_takes_a_range_as_base_classes_does(files, tmp_path, capsys):
    argv = ["eval", "detect", f"weights={files['best']}", f"data={files['data']}", f"out={tmp_path / 'e'}"]
    assert main([*argv, "classes=[A1..A3,A7]"]) == 0
    assert "subset ['A1', 'A2', 'A3', 'A7']: mAP50-95" in capsys.readouterr().out
    assert main([*argv[:-1], f"out={tmp_path / 'e2'}", "classes=[A1..Z9]"]) == 2
    assert "classes: class range 'A1..Z9'" in capsys.readouterr().err


def test_eval_writes_a_new_folder_and_the_source_of_its_metrics(files, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = ["eval", "detect", f"weights={files['best']}", f"data={files['data']}", f"out={out}", "conf=0.001"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "(2 images at 64×64)" in printed
    rows = [line for line in printed.splitlines() if line.startswith(("all ", "A"))]
    assert rows and all(re.fullmatch(r"\S+\s+\d\.\d{4}\s+\d\.\d{4}\s+\d+", r) for r in rows), rows
    first = json.loads((out / "metrics.json").read_text())
    assert isinstance(first["mAP50"], float) and "per_class" in first  # metrics stay at the top level
    assert first["source"]["weights"] == str(files["best"]) and first["source"]["data"] == str(files["data"])
    assert first["source"]["split"] == "test" and first["source"]["imgsz"] == 64
    assert {"command", "visiontrain", "torch", "written"} <= first["source"].keys()

    (out / "keep.txt").write_text("an older result")
    assert main(argv) == 0
    assert "already holds results; writing to" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["confusion_matrix.png", "keep.txt", "metrics.json",
                                                     "pr_curve.png"]
    assert (tmp_path / "eval2" / "metrics.json").is_file() and not (tmp_path / "eval2" / "keep.txt").exists()


def test_predict_and_export_write_new_folders(files, tmp_path):
    for _ in range(2):
        assert main(["predict", "detect", f"weights={files['best']}", f"source={files['image']}",
                     f"out={tmp_path / 'pred'}"]) == 0
        assert main(["export", "detect", f"weights={files['best']}", f"out={tmp_path / 'exp'}"]) == 0
    for name, files_in in (("pred", {"predictions.json", "5.jpg"}), ("exp", {"best.onnx"})):
        assert {p.name for p in (tmp_path / name).iterdir()} == files_in
        assert {p.name for p in (tmp_path / f"{name}2").iterdir()} == files_in
    assert main(["export", "detect", f"weights={files['best']}", f"out={tmp_path / 'm.onnx'}"]) == 0
    assert (tmp_path / "m.onnx").is_file()  # a file name is written as given


# ---- --help lists only keys the verb reads ----------------------------------------------------------

class ReadRecorder:
    """Wraps a config and records which keys are read."""

    def __init__(self, cfg):
        object.__setattr__(self, "_cfg", cfg)
        object.__setattr__(self, "read", set())

    def __getattr__(self, key):
        self.read.add(key)
        return getattr(self._cfg, key)


def test_every_key_a_verb_lists_is_read_by_it(files, tmp_path):
    d, best = files["data"], files["best"]
    runs = {
        "eval": [f"weights={best}", f"data={d}", f"out={tmp_path / 'e'}", "classes=[A1]"],
        "predict": [f"weights={best}", f"source={files['image']}", f"out={tmp_path / 'p'}"],
        "export": [f"weights={best}", f"out={tmp_path / 'x.onnx'}"],
        "synth": [f"out={tmp_path / 's'}", "train=1", "val=1", "imgsz=64"],
        "split": [f"data={d}", f"out={tmp_path / 'k'}", "base=A1..A10", "shots=1"],
    }
    for verb, overrides in runs.items():
        schema, fn = VERBS[verb]
        rec = ReadRecorder(load_config(schema, None, overrides))
        assert fn(rec) == 0
        listed = {k for k, *_ in flat_keys(schema)}
        # ``format`` has one choice (onnx), checked when the config is built
        assert listed - rec.read - ({"format"} if verb == "export" else set()) == set(), verb
